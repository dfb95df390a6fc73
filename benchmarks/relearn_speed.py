"""Per-step and eval speed of a re-learn against a plain Trainer, with and without the frozen-prefix cache.

    python benchmarks/relearn_speed.py                       # CPU, GPT-2 8x256 (under 2 minutes)
    python benchmarks/relearn_speed.py --device cuda --gpt2-small --batch 8 --seq 1024
    python benchmarks/relearn_speed.py --sweep               # + the wall time of a whole L-sweep vs base training
    python benchmarks/relearn_speed.py --profile last        # + a torch.profiler table of one cached step

Same model, data and batches for every arm, timed interleaved (round robin), so machine noise hits all alike:
  (a) plain     transformers.Trainer, every parameter trainable
  (b) block:L   RelearnTrainer, only block L trainable (prefix_cache=false)
  (c) cached:L  the same with the prefix cache (rows filled beforehand; the fill is timed on its own)
for L = first, middle, last. A step is Trainer.training_step (forward + backward) + optimizer.step + zero_grad.
Also: evaluation of the validation set with (c) and without (b) the cache (the cache filled by an earlier
evaluation), and memory — on CUDA the peak allocated per arm; on CPU the bytes backward keeps (saved activations,
counted with saved_tensors_hooks), gradients + AdamW state, and the cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import Trainer

from hf_relearn.data.datasets import DataArguments, build_datasets
from hf_relearn.data.tokenization import byte_tokenizer
from hf_relearn.model.modeling import load_model
from hf_relearn.relearn.arguments import HfRelearnTrainingArguments, RelearnArguments
from hf_relearn.relearn.runner import _quiet
from hf_relearn.relearn.trainer import RelearnTrainer

NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # the cache is exact (and on by default) then
VOCAB = 259  # the byte tokenizer's
SWEEP_ARMS = ("false", "auto", "auto+baseline")  # no cache; one shared cache; + the base's baseline measured once


def _args(cls, out: str, device: str, batch: int, **kw):
    settings = dict(
        output_dir=out, per_device_train_batch_size=batch, per_device_eval_batch_size=batch, learning_rate=1e-4,
        disable_tqdm=True, report_to=[], use_cpu=device == "cpu", seed=0, logging_strategy="no",
    )  # fmt: skip
    return cls(**{**settings, **kw})


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _state_bytes(model) -> int:
    """Gradients + AdamW's two moments of the trainable parameters."""
    return sum(3 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _saved_bytes(trainer, batch) -> int:
    """Bytes autograd keeps for backward in one training step (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.training_step(trainer.model, dict(batch))
    trainer.model.zero_grad(set_to_none=True)
    return sum(seen.values())


SWEEP_LR = 1e-3  # the sweep base's peak learning rate, and its relearns' unless an arm names another (MODE@LR)


def _sweep_arms(text: str) -> list[str]:
    """--sweep-arms (MODE or MODE@LR), checked when parsed (not after the base has trained for minutes)."""
    arms = text.split(",")
    if unknown := {a.partition("@")[0] for a in arms} - set(SWEEP_ARMS):
        raise argparse.ArgumentTypeError(f"unknown {sorted(unknown)}; choose from {', '.join(SWEEP_ARMS)}")
    for arm in arms:
        try:
            rate = _arm_lr(arm)
        except ValueError:
            rate = 0.0
        if not rate > 0:
            raise argparse.ArgumentTypeError(f"{arm}: the learning rate after @ must be a positive number")
    return arms


def _arm_lr(arm: str) -> float:
    return float(arm.partition("@")[2] or SWEEP_LR)


def _config(args) -> tuple[dict, DataArguments]:
    """The model's config overrides and the data, shared by the per-step arms and the sweep."""
    overrides = dict(
        n_layer=args.n_layer, n_embd=args.n_embd, n_head=max(1, args.n_embd // 64), n_positions=args.seq,
        vocab_size=VOCAB, **NO_DROPOUT,
    )  # fmt: skip
    if args.gpt2_small:
        overrides.update(n_layer=12, n_embd=768, n_head=12, n_positions=max(1024, args.seq))
    return overrides, DataArguments(block_size=args.seq, generated_chars=args.chars, max_eval_samples=args.eval_rows)


def build(args) -> tuple[dict, list, dict]:
    torch.manual_seed(0)
    overrides, data = _config(args)
    n = overrides["n_layer"]
    tokenizer = byte_tokenizer()
    train, evals, collator = build_datasets(data, tokenizer, "clm")
    layers = {"first": 0, "middle": n // 2, "last": n - 1}
    tmp = tempfile.mkdtemp(prefix="relearn-speed-")
    trainers = {}
    model = load_model("gpt2", overrides, seed=0)
    targs = _args(HfRelearnTrainingArguments, f"{tmp}/plain", args.device, args.batch)
    trainers["(a) plain"] = Trainer(model=model, args=targs, train_dataset=train, eval_dataset=evals,
                                    data_collator=collator)  # fmt: skip
    for where, layer in layers.items():
        for arm, cache in (("(b) block", "false"), ("(c) cached", "auto")):
            rargs = _args(RelearnArguments, f"{tmp}/{arm}{layer}", args.device, args.batch, block=f"decoder.{layer}",
                          prefix_cache=cache)  # fmt: skip
            trainer = RelearnTrainer(model=load_model("gpt2", overrides, seed=0), args=rargs, train_dataset=train,
                                     eval_dataset=evals, data_collator=collator)  # fmt: skip
            trainer.prepare_relearn()  # baseline eval, reset, freeze, after-reset eval (this fills the eval cache)
            if cache == "auto" and not trainer.prefix_cache_info["enabled"] and layer > 0:
                raise SystemExit(f"prefix cache off for layer {layer}: {trainer.prefix_cache_info['reason']}")
            trainers[f"{arm}:{where}({layer})"] = trainer
    for trainer in trainers.values():
        _quiet(trainer)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which we do not run
        trainer.create_optimizer()
        trainer.model.train()
    # the same rows for every arm, collated by each trainer's own collator (the cached arms add row indices)
    rows = list(range(args.batches * args.batch))
    batches = {
        name: [
            t.data_collator([t.train_dataset[i] for i in rows[k : k + args.batch]])
            for k in range(0, len(rows), args.batch)
        ]
        for name, t in trainers.items()
    }
    return trainers, batches, {"layers": layers, "overrides": overrides, "n_layer": n}


def step(trainer, batch) -> None:
    trainer.training_step(trainer.model, dict(batch))
    trainer.optimizer.step()
    trainer.model.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-layer", type=int, default=8)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--gpt2-small", action="store_true", help="GPT-2 small: 12 layers x 768 (for a GPU)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="steps per arm per round")
    ap.add_argument("--chars", type=int, default=300_000, help="generated corpus size")
    ap.add_argument("--eval-rows", type=int, default=64)
    ap.add_argument("--profile", choices=["first", "middle", "last"], help="profile one cached step at this layer")
    ap.add_argument("--sweep", action="store_true", help="also time a whole L-sweep against its base training")
    ap.add_argument("--only-sweep", action="store_true", help="skip the per-step arms")
    ap.add_argument("--profile-sweep", action="store_true", help="cProfile the cached sweep (where its time goes)")
    ap.add_argument("--sweep-base-steps", type=int, default=300, help="base training steps of the --sweep study")
    ap.add_argument(
        "--sweep-until-converged",
        action="store_true",
        help="train the sweep's base until its validation loss stops improving (--sweep-base-steps is then a cap)",
    )
    ap.add_argument(
        "--sweep-arms",
        type=_sweep_arms,
        default="false,auto,auto+baseline",
        help="sweep arms, comma-separated: false (no cache), auto (one shared cache), auto+baseline (as a study); "
        f"MODE@LR re-learns at rate LR instead of the base's peak {SWEEP_LR:g}",
    )
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args()
    if args.only_sweep:
        result = {"device": args.device, "sweep": sweep(args)}
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return
    t_build = time.perf_counter()
    trainers, batches, info = build(args)
    print(f"set-up (models, baseline and after-reset evals): {time.perf_counter() - t_build:.1f} s")

    # fill the training rows of the cached arms once, timed: one eval-mode forward of the frozen prefix per row
    fill = {}
    for name, t in trainers.items():
        if name.startswith("(c)") and t.prefix_cache is not None:
            _sync(args.device)
            t0 = time.perf_counter()
            for batch in batches[name]:
                step(t, batch)
            _sync(args.device)
            fill[name] = (time.perf_counter() - t0) / len(batches[name])
    for name, t in trainers.items():  # warm-up
        step(t, batches[name][0])

    times: dict[str, list[float]] = {name: [] for name in trainers}
    for r in range(args.rounds):
        for name, t in trainers.items():
            _sync(args.device)
            t0 = time.perf_counter()
            for s in range(args.steps):
                step(t, batches[name][(r * args.steps + s) % len(batches[name])])
            _sync(args.device)
            times[name].append((time.perf_counter() - t0) / args.steps)

    # evaluation: (b) without the cache vs (c) with it (filled by prepare_relearn's after-reset evaluation)
    eval_times: dict[str, list[float]] = {}
    for _ in range(3):
        for name, t in trainers.items():
            if name.startswith("(a)"):
                continue
            _sync(args.device)
            t0 = time.perf_counter()
            t.evaluate()
            _sync(args.device)
            eval_times.setdefault(name, []).append(time.perf_counter() - t0)

    memory = {}
    for name, t in trainers.items():
        batch = batches[name][0]
        cache = t.prefix_cache.memory_bytes + t.prefix_cache.disk_bytes if getattr(t, "prefix_cache", None) else 0
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            step(t, batch)
            memory[name] = {"peak_allocated": torch.cuda.max_memory_allocated(), "cache": cache}
        else:
            memory[name] = {"saved_activations": _saved_bytes(t, batch), "grads_and_adam": _state_bytes(t.model),
                            "cache": cache}  # fmt: skip

    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    )
    o = info["overrides"]
    print(
        f"\nGPT-2 {o['n_layer']}x{o['n_embd']}, batch {args.batch}x{args.seq}, {device}; median of {args.rounds} "
        f"rounds x {args.steps} steps, interleaved"
    )
    plain = statistics.median(times["(a) plain"])
    tokens = args.batch * args.seq
    mb = 1 / 2**20
    mem_head = "peak MiB" if args.device.startswith("cuda") else "saved act. MiB | grads+Adam MiB | cache MiB"
    print(f"\n| arm | ms/step | tokens/s | speed-up vs (a) | eval s | eval speed-up (c) vs (b) | {mem_head} |")
    print("|---|---:|---:|---:|---:|---:|---|")
    rows = {}
    for name in trainers:
        ms = statistics.median(times[name])
        ev = statistics.median(eval_times[name]) if name in eval_times else None
        ev_ratio = None
        if name.startswith("(c)"):
            ev_ratio = statistics.median(eval_times[name.replace("(c) cached", "(b) block")]) / ev
        m = memory[name]
        if args.device.startswith("cuda"):
            mem = f"{m['peak_allocated'] * mb:.0f}"
        else:
            mem = f"{m['saved_activations'] * mb:.1f} \\| {m['grads_and_adam'] * mb:.1f} \\| {m['cache'] * mb:.1f}"
        rows[name] = {"ms_per_step": 1000 * ms, "tokens_per_s": tokens / ms, "speedup": plain / ms, "eval_s": ev,
                      "eval_speedup": ev_ratio, "fill_ms_per_batch": 1000 * fill[name] if name in fill else None,
                      "memory": m}  # fmt: skip
        print(
            f"| {name} | {1000 * ms:.1f} | {tokens / ms:,.0f} | {plain / ms:.2f}x | "
            f"{'' if ev is None else f'{ev:.3f}'} | {'' if ev_ratio is None else f'{ev_ratio:.2f}x'} | {mem} |"
        )
    for name, f in fill.items():
        print(f"cache fill {name}: {1000 * f:.1f} ms per batch (once per row; then served)")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        layer = info["layers"][args.profile]
        name = f"(c) cached:{args.profile}({layer})"
        t = trainers[name]
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        with profile(activities=acts) as prof:
            for batch in batches[name]:
                step(t, batch)
        sort = "cuda_time_total" if args.device.startswith("cuda") else "cpu_time_total"
        print(f"\nprofile of {len(batches[name])} steps of {name}:")
        print(prof.key_averages().table(sort_by=sort, row_limit=18))
        with profile(activities=acts) as prof:
            t.evaluate()
        print(f"\nprofile of one evaluation of {name}:")
        print(prof.key_averages().table(sort_by=sort, row_limit=12))

    result = {"device": device, "config": info["overrides"], "batch": args.batch, "seq": args.seq, "arms": rows}
    if args.sweep:
        result["sweep"] = sweep(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def sweep(args) -> dict:
    """Wall time of a small study's L-sweep (every layer re-learned to recovery) vs its base training."""
    import shutil

    from hf_relearn.relearn.arguments import ModelArguments, PretrainArguments
    from hf_relearn.relearn.runner import pretrain, relearn

    tmp = Path(tempfile.mkdtemp(prefix="relearn-sweep-"))
    overrides, data = _config(args)
    n = overrides["n_layer"]
    converge = dict(until_converged=True, convergence_patience=6) if args.sweep_until_converged else {}
    pargs = _args(PretrainArguments, str(tmp / "base"), args.device, args.batch, max_steps=args.sweep_base_steps,
                  eval_steps=50, learning_rate=SWEEP_LR, **converge)  # fmt: skip
    # wall time and this process's CPU time: on a shared machine the CPU time is the steadier of the two
    t0, c0 = time.perf_counter(), time.process_time()
    info = pretrain(ModelArguments(model="gpt2", config_overrides=overrides), data, pargs, quiet=True)
    base_s, base_cpu = time.perf_counter() - t0, time.process_time() - c0
    # a converged base's budget is its best checkpoint's step (what a relearn's share is of); it trained past it
    base_steps = info["budget_steps"]
    out = {"base_steps": base_steps, "base_trained_steps": info["steps"], "base_s": base_s,
           "base_cpu_s": base_cpu, "layers": n, "base_warnings": info["warnings"],
           "base_stopped": info["stopped"], "base_final_eval_loss": info["final_eval_loss"]}  # fmt: skip
    print(f"base: {info['stopped']} at step {info['steps']}, budget {base_steps}, {base_s:.1f} s", flush=True)
    import cProfile
    import pstats

    from hf_relearn.relearn.prefix_cache import PrefixCache

    arms = args.sweep_arms
    for arm in arms:
        # "auto+baseline": as a study does, the intact model measured by the first run only and handed to the others
        mode = arm.partition("@")[0]
        shared = PrefixCache(capture_all=True) if mode != "false" else None
        baseline = None
        profiler = cProfile.Profile() if args.profile_sweep and arm == "auto" else None
        if profiler:
            profiler.enable()
        t0, c0 = time.perf_counter(), time.process_time()
        steps = []
        for layer in reversed(range(n)):  # top first: its fill stores every lower boundary too
            rargs = _args(RelearnArguments, str(tmp / f"{arm}{layer}"), args.device, args.batch,
                          block=f"decoder.{layer}", original_run=str(tmp / "base"), max_steps=base_steps,
                          learning_rate=_arm_lr(arm), eval_steps=10, prefix_cache=mode.split("+")[0],
                          save_final_model=False)  # fmt: skip
            r = relearn(
                ModelArguments(model=str(tmp / "base")),
                DataArguments(),
                rargs,
                quiet=True,
                prefix_cache=shared,
                baseline=baseline,
            )
            if mode == "auto+baseline":
                baseline = {"eval_loss": r.baseline_eval_loss}
            steps.append(r.steps_trained)
            print(f"  {arm} layer {layer}: {r.steps_trained} steps, recovered {r.recovered}", flush=True)
        if profiler:
            profiler.disable()
            print("\nwhere the cached sweep's time goes (cumulative):")
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(
                r"(trainer|runner|prefix_cache|modeling|surgery|data|evaluation_loop|training_step|from_pretrained)"
            )
        out[f"sweep_s_cache_{arm}"] = time.perf_counter() - t0
        out[f"sweep_cpu_s_cache_{arm}"] = time.process_time() - c0
        out[f"steps_cache_{arm}"] = steps
        if shared is not None:
            out["shared_cache"] = shared.summary()
            shared.close()
    shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\nL-sweep of {n} layers, top first, each to recovery (at most {base_steps} steps), vs the base training "
        f"(budget {base_steps} steps, {out['base_trained_steps']} trained): wall {base_s:.1f} s, CPU {base_cpu:.1f} s"
    )
    for warning in out["base_warnings"]:
        print(f"  base warning: {warning}")
    labels = {
        "false": "without the cache",
        "auto": "with one shared cache",
        "auto+baseline": "with one shared cache and one baseline evaluation (as a study runs it)",
    }
    for arm in arms:
        wall, cpu = out[f"sweep_s_cache_{arm}"], out[f"sweep_cpu_s_cache_{arm}"]
        print(
            f"  {labels[arm.partition('@')[0]]}, relearn rate {_arm_lr(arm):g}: wall {wall:.1f} s = "
            f"{wall / base_s:.2f}x, CPU {cpu:.1f} s = {cpu / base_cpu:.2f}x of the base; "
            f"steps per layer {out[f'steps_cache_{arm}']}"
        )
    return out


if __name__ == "__main__":
    main()
