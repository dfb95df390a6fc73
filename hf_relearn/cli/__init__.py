"""The `hf-relearn` command line: `main` dispatches; `runs` holds the commands parsed by `HfArgumentParser`
(pretrain, relearn, probe)."""
