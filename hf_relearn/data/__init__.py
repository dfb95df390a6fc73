"""What a model reads: the objectives' registry (rows, collator, loss), tokenisers, corpora, text loading and
`DataArguments` / `build_datasets`."""
