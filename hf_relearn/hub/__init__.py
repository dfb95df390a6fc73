"""What a run publishes: model cards built from values, the recovery-curve plot, and pushes to the Hub (with
`load_relearned` to get a pushed model back)."""
