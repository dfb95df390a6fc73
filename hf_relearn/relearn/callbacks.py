"""Trainer callbacks of hf-relearn: convergence of a base run, recovery of a re-learn, examples seen, the swap
warm-up. Each one is small and reads only the Trainer's state and its own settings."""

from __future__ import annotations

import torch
from transformers import EarlyStoppingCallback, TrainerCallback
from transformers.trainer_callback import ExportableState

from ..errors import RelearnError
from .result import first_reach, stretch_start


class ConvergenceCallback(EarlyStoppingCallback):
    """Stop a base run once it has converged: over its last stretch its best validation loss improved by less than
    ``threshold`` (relative): best_now > best_then x (1 - threshold).

    The stretch is the longer of the last ``patience`` evaluations and the last ``window`` share of the steps so far
    (default a quarter, the span the under-trained warning judges), so a slow steady fall late in a long run is not
    mistaken for a plateau. ``converged`` says whether this rule (not the ``max_steps`` cap) ended the run. The
    history of (step, best so far) is part of the callback's state, so a resumed run judges the same stretch.
    """

    def __init__(
        self,
        patience: int = 8,
        threshold: float = 0.005,
        window: float = 0.25,
        best_history: list[list[float]] | None = None,
    ):
        super().__init__(early_stopping_patience=patience, early_stopping_threshold=threshold)
        self.window = window
        self.best_history = [list(point) for point in best_history or []]

    def check_metric_value(self, args, state, control, metric_value):
        value = -metric_value if args.greater_is_better else metric_value  # compare as a loss
        best = min(value, self.best_history[-1][1]) if self.best_history else value
        self.best_history.append([state.global_step, best])
        start = stretch_start(self.best_history, self.early_stopping_patience, self.window)
        stalled = start >= 0 and best > self.best_history[start][1] - abs(self.best_history[start][1]) * (
            self.early_stopping_threshold
        )
        self.early_stopping_patience_counter = self.early_stopping_patience if stalled else 0

    @property
    def converged(self) -> bool:
        return self.early_stopping_patience_counter >= self.early_stopping_patience

    def state(self) -> dict:
        # the Trainer rebuilds a resumed callback as type(cb)(**args): the args are __init__'s own parameters
        return {
            "args": {
                "patience": self.early_stopping_patience,
                "threshold": self.early_stopping_threshold,
                "window": self.window,
                "best_history": self.best_history,
            },
            "attributes": {"early_stopping_patience_counter": self.early_stopping_patience_counter},
        }


class ExamplesSeen(TrainerCallback, ExportableState):
    """Counts training examples; saved in checkpoints so a resumed run keeps counting from where it was."""

    def __init__(self, examples_seen: int = 0):
        self.examples_seen = examples_seen

    def state(self) -> dict:
        return {"args": {}, "attributes": {"examples_seen": self.examples_seen}}


class RecoveryCallback(TrainerCallback):
    """Stops training at recovery: the metric, smoothed over ``window`` evaluations (``start``, the value right
    after the reset, counts as the first), within ``threshold`` for ``patience`` consecutive evaluations.

    Stateless apart from its settings: it reads the evaluations so far from ``state.log_history``, which a resumed
    run restores, so an interrupted and resumed run stops at the same step.
    """

    def __init__(
        self,
        metric_key: str,
        threshold: float,
        higher_is_better: bool,
        patience: int,
        stop: bool,
        window: int = 1,
        start: float | None = None,
    ):
        self.metric_key, self.threshold, self.higher_is_better = metric_key, threshold, higher_is_better
        self.patience, self.stop, self.window, self.start = patience, stop, window, start
        self.recovered_step: int | None = None

    @classmethod
    def for_run(cls, args, threshold: float, start: float) -> RecoveryCallback:
        """The callback of a run with ``RelearnArguments`` ``args``: its metric, direction, patience, window and stop
        setting, the run's recovery ``threshold`` and its value right after the reset (``start``)."""
        rule = (args.metric_key, threshold, args.higher_is_better, args.patience, args.stop_at_recovery)
        return cls(*rule, window=args.recovery_window, start=start)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics is None or self.metric_key not in metrics:
            have = ", ".join(sorted(k for k in (metrics or {}) if k.startswith("eval_")))
            raise RelearnError(f"recovery metric {self.metric_key!r} was not computed by evaluation; it gave: {have}")
        curve = [(e["step"], e[self.metric_key]) for e in state.log_history if self.metric_key in e]
        if self.start is not None:
            curve = [(0, self.start), *curve]
        self.recovered_step = first_reach(curve, self.threshold, self.higher_is_better, self.patience, self.window)
        if self.recovered_step is not None and self.stop:
            control.should_training_stop = True
        return control


class SwapWarmupCallback(TrainerCallback):
    """Unfreezes ``params`` at the start of the first optimizer step after ``steps`` (the end of a swap warm-up).

    Steps 1..``steps`` train only what was trainable before; from step ``steps + 1`` on, ``params`` train too. It
    reads ``state.global_step``, so a run resumed past the warm-up unfreezes them before its first step.
    """

    def __init__(self, params: list[torch.nn.Parameter], steps: int):
        self.params, self.steps = params, steps
        self.unfrozen_at: int | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.unfrozen_at is None and state.global_step >= self.steps:
            for p in self.params:
                p.requires_grad_(True)
            self.unfrozen_at = state.global_step
        return control


class ConsoleCallback(TrainerCallback):
    """What a single relearn shows while it runs (in place of the Trainer's raw log dictionaries and nested bars):
    one progress bar over the steps, and one line per evaluation: the step, the recovery metric and its distance to
    the recovery threshold."""

    def __init__(self, metric_key: str, threshold: float, higher_is_better: bool):
        self.metric_key, self.threshold, self.higher_is_better = metric_key, threshold, higher_is_better
        self.bar = None
        self.started: tuple[float, int] | None = None  # (time, step) when training began, for the pace estimate

    def on_train_begin(self, args, state, control, **kwargs):
        import time

        from tqdm.auto import tqdm

        self.started = (time.perf_counter(), state.global_step)
        if state.is_world_process_zero and not args.disable_tqdm:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="relearn", unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.metric_key)
        if value is None or not state.is_world_process_zero:
            return
        gap = (self.threshold - value) if self.higher_is_better else (value - self.threshold)
        where = "within the threshold" if gap <= 0 else f"{gap:.4f} above the threshold {self.threshold:.4f}"
        if self.higher_is_better and gap > 0:
            where = f"{gap:.4f} below the threshold {self.threshold:.4f}"
        line = f"step {state.global_step}: {self.metric_key} {value:.4f} ({where})"
        if self.started is not None and state.global_step > self.started[1]:  # the first evaluation: the pace
            import time

            took = time.perf_counter() - self.started[0]
            left = (state.max_steps - state.global_step) * took / (state.global_step - self.started[1])
            line += f"; at this pace the remaining {state.max_steps - state.global_step} steps take about "
            line += f"{left / 60:.1f} min, evaluations included (less if it recovers)"
            self.started = None
        (self.bar.write if self.bar is not None else print)(line)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
