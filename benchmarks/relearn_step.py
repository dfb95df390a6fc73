"""Time one training step with only block L trainable against full training, same model and batch.

    python benchmarks/relearn_step.py                 # CPU, small GPT-2 (about a minute)
    python benchmarks/relearn_step.py --device cuda --n-layer 12 --n-embd 768 --batch 16 --seq 512

Arms (interleaved, round-robin, so machine noise hits all of them alike):
  full      every parameter trainable (what a plain Trainer run does)
  block:L   only layer L trainable (RelearnTrainer's default arm), for L = first, middle, last
A step is forward + backward + AdamW step + zero_grad, as inside Trainer.training_step. Reports the median
per-step time over rounds, tokens/s and the ratio to `full` (>1 = faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_relearn.model.modeling import load_model
from hf_relearn.model.surgery import freeze_except, reset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="steps per arm per round")
    args = ap.parse_args()
    torch.manual_seed(0)
    n = args.n_layer
    overrides = dict(
        n_layer=n, n_embd=args.n_embd, n_head=max(1, args.n_embd // 64), vocab_size=259, n_positions=args.seq
    )
    layers = {"first": 0, "middle": n // 2, "last": n - 1}
    arms = {"full": None, **{f"block:{k}({v})": v for k, v in layers.items()}}
    models, opts = {}, {}
    for name, layer in arms.items():
        model = load_model("gpt2", overrides, seed=0).to(args.device).train()
        if layer is not None:
            reset(model, f"decoder.{layer}", seed=0)
            freeze_except(model, f"decoder.{layer}")
        models[name] = model
        opts[name] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 259, (args.batch, args.seq), device=args.device)

    def step(name: str) -> None:
        loss = models[name](input_ids=ids, labels=ids).loss
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    for name in arms:  # warm-up
        step(name)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name in arms:
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            sync()
            times[name].append((time.perf_counter() - t0) / args.steps)
    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(
        f"GPT-2 {n}x{args.n_embd}, batch {args.batch}x{args.seq}, {device}, median of {args.rounds} rounds x {args.steps} steps"
    )
    print(f"{'arm':<18} {'ms/step':>9} {'tokens/s':>10} {'vs full':>8}  trainable")
    full = statistics.median(times["full"])
    for name in arms:
        med = statistics.median(times[name])
        trainable = sum(p.numel() for p in models[name].parameters() if p.requires_grad)
        print(f"{name:<18} {1000 * med:9.1f} {args.batch * args.seq / med:10.0f} {full / med:7.2f}x  {trainable:,}")


if __name__ == "__main__":
    main()
