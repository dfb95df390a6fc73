"""End-to-end wall time of short `hf-relearn relearn` commands, as a user waits for them: start-up, data, surgery,
training, evaluation, saving. Each command is a fresh process (imports included).

    python benchmarks/relearn_startup.py --base runs/base --train_file ../shared/data/tinyshakespeare.txt

Runs, one after the other on the same base and file:
  1. `hf-relearn --help`
  2. a 10-step relearn with the token-stream cache empty (the first run on this text and tokenizer)
  3. the same relearn again (the token stream read back from the cache)
  4. the same relearn again (a second warm measurement)
With --data: only the datasets a relearn builds, three times in one process (cold cache first).
The cache lives in a temporary HF_HOME so the first run really is cold; the model weights are local.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _timed(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _data_times(base: str, train_file: str) -> list[float]:
    """In this process: building the datasets of a relearn (read, tokenise, cut, to 🤗 datasets) three times."""
    from hf_relearn.data.datasets import DataArguments, build_datasets
    from hf_relearn.data.tokenization import get_tokenizer

    tokenizer = get_tokenizer("auto", base)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        build_datasets(DataArguments(train_file=train_file, block_size=64, max_eval_samples=256), tokenizer, "clm")
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="a base run folder (hf-relearn pretrain output)")
    parser.add_argument("--train_file", required=True)
    parser.add_argument("--block", default="decoder.1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", action="store_true", help="only time building the datasets, in-process")
    args = parser.parse_args()
    if args.data:
        with tempfile.TemporaryDirectory() as home:
            os.environ["HF_HOME"] = home  # before datasets / huggingface_hub read it: a cold cache
            first, second, third = _data_times(args.base, args.train_file)
        print(f"build_datasets: first {first:.2f} s, again {second:.2f} s, again {third:.2f} s")
        return
    cli = [sys.executable, "-m", "hf_relearn"]
    with tempfile.TemporaryDirectory() as home, tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "HF_HOME": home, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        relearn = [
            *cli, "relearn", "--model", args.base, "--original_run", args.base, "--train_file", args.train_file,
            "--block_size", "64", "--max_eval_samples", "256", "--block", args.block, "--max_steps", "10",
            "--eval_steps", "5", "--disable_tqdm", "true",
        ]  # fmt: skip
        times = {"--help": _timed([*cli, "--help"], env)}
        for name in ("relearn, cold token cache", "relearn, warm", "relearn, warm again"):
            times[name] = _timed([*relearn, "--output_dir", str(Path(out) / name.replace(" ", "_"))], env)
    for name, seconds in times.items():
        print(f"{name:<28} {seconds:6.2f} s")


if __name__ == "__main__":
    main()
