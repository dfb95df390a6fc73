"""Studies: a recipe expands into trained bases and relearn runs (a plan), which local worker processes carry out
and resume; each run becomes one typed row of results.csv."""
