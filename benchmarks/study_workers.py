"""Wall time of a whole study: one process of T threads against `--workers W` processes of T/W threads each.

    python benchmarks/study_workers.py                     # the demo's model and data, fixed work (about 7 min)
    python benchmarks/study_workers.py --rounds 1 --relearn-steps 50

The work is fixed so both arms do the same number of steps: the demo's recipe (`hf_relearn/recipes/demo.yaml`,
4-layer x 32 GPT-2 on the standard-library source, 2 seeds, every layer x {block, all}: 16 runs) with the bases
trained a fixed `--base-steps` (not until converged) and every relearn a fixed `--relearn-steps` (no stop at
recovery), evaluating every 10 steps as the demo does. (With the demo's own stopping rules the arms would not do
the same work: the thread count changes floating-point sums and so the training path.) Each arm is one
`hf-relearn study` command, start-up included, in a fresh folder; arms alternate round by round, so the machine's
noise hits both alike. Reports the median wall time per arm and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

DEMO = Path(__file__).resolve().parents[1] / "hf_relearn" / "recipes" / "demo.yaml"


def _recipe(base_steps: int, relearn_steps: int) -> dict:
    recipe = yaml.safe_load(DEMO.read_text())
    recipe["name"] = "demo-fixed-work"
    recipe["pretrain"].update(until_converged=False, max_steps=base_steps, eval_steps=base_steps)
    recipe["pretrain"].pop("convergence_patience", None)
    recipe["relearn"].update(max_steps=relearn_steps, stop_at_recovery=False)
    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--base-steps", type=int, default=400)
    parser.add_argument("--relearn-steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all (default 2: this machine)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    arms = {
        f"1 process x {args.threads} threads": ["--workers", "1", "--threads-per-worker", str(args.threads)],
        f"{args.workers} workers x {args.threads // args.workers} thread(s)": [
            "--workers", str(args.workers), "--threads-per-worker", str(args.threads // args.workers),
        ],
    }  # fmt: skip
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(_recipe(args.base_steps, args.relearn_steps)))
        env = {**os.environ, "HF_HOME": os.environ.get("HF_HOME", str(Path(tmp) / "hf_home"))}
        for round_ in range(args.rounds):
            for i, (arm, flags) in enumerate(arms.items()):
                out = Path(tmp) / f"study-{round_}-{i}"
                argv = [sys.executable, "-m", "hf_relearn", "study", str(recipe), "--output-dir", str(out)]
                start = time.perf_counter()
                subprocess.run([*argv, *flags, "--no-progress"], env=env, check=True, stdout=subprocess.DEVNULL)
                times[arm].append(time.perf_counter() - start)
                print(f"round {round_ + 1}: {arm}: {times[arm][-1]:.1f} s", flush=True)
    steps = 2 * args.base_steps + 16 * args.relearn_steps
    print(f"\nfixed work: {steps} training steps (2 bases x {args.base_steps}, 16 runs x {args.relearn_steps})")
    print(f"{'arm':32} {'median s':>9} {'vs first':>9}")
    first = statistics.median(next(iter(times.values())))
    for arm, values in times.items():
        median = statistics.median(values)
        print(f"{arm:32} {median:9.1f} {first / median:8.2f}x")


if __name__ == "__main__":
    main()
