"""Re-learning one block: the argument dataclasses, `RelearnTrainer` and its callbacks, the result contract and the
recovery rule, the frozen-prefix cache, and the runs a user starts (`pretrain`, `relearn`, `probe`)."""
