"""What is done to a model: load or build it, name its blocks, reset and freeze them, prove the frozen weights
unchanged, swap encoders, and the arms (what trains besides the block). The only place that knows architectures."""
