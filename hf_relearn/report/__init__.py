"""A study's answer, read from results.csv without torch: findings by position, depth, width and swap arm,
the plots, report.md, and the analyses that replay published curves."""
