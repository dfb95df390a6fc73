"""Local worker processes for a study: N fresh Python processes on this machine, one console.

``run_workers`` starts ``target`` in N spawned processes, each limited to a fixed number of CPU threads, and
shows their progress on the caller's one progress bar: a worker reports through a ``WorkerBar`` (the calls a
study makes on its bar), whose messages the caller's process prints. Nothing here knows what a study is;
which process does which piece of work is decided by the workers themselves (``study.py`` claims each piece
with an exclusive file create). ``barrier`` and ``leave_launch_group`` are the two things a study does with the
processes of an ``accelerate launch``: wait for all of them, or let each train alone.

Why processes, not threads in one: a small model's step is dominated by per-operation overhead, so two
processes of one thread each do nearly twice the work of one process with two threads (measured for the demo's
4 x 32 GPT-2: 2 threads are 1.1-1.4x one thread; ``docs/benchmarks.md``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import RelearnError


class WorkerBar:
    """The part of a tqdm bar a study's loop uses, sent to the process that shows the real bar."""

    def __init__(self, messages: Any) -> None:
        self._messages = messages
        self.n = 0  # runs finished (as tqdm's ``n``), sent on ``refresh``

    def write(self, line: str) -> None:
        self._messages.put(("line", line))

    def set_postfix_str(self, text: str) -> None:
        self._messages.put(("postfix", text))

    def refresh(self) -> None:
        self._messages.put(("finished", self.n))


def _child(target: Callable[..., None], args: tuple, threads: int, messages: Any, parent: int) -> None:
    import torch

    _exit_with(parent)
    torch.set_num_threads(threads)
    target(*args, WorkerBar(messages))


def _exit_with(parent: int) -> None:
    """End this worker as soon as ``parent`` (the process that started it) is gone. Killed by a signal (``kill``,
    SIGKILL, a closed terminal), the parent runs no clean-up, and its workers would go on writing into a study folder
    that the same study, started again, shares with them."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)  # as if killed with the parent: a result file is written atomically or not at all

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_workers(target: Callable[..., None], args: tuple, workers: int, threads: int | None, bar: Any) -> None:
    """Run ``target(*args, worker_bar)`` in ``workers`` spawned processes of ``threads`` CPU threads each (default:
    this process's cores shared out, at least 1).

    Guarantees: returns when every worker has exited with status 0, their lines written through ``bar`` in the
    order they arrived; if one fails (an exception, a kill), the others are stopped and a RelearnError names it
    (the worker's own traceback is on stderr above it); on any exit from here, no worker is left running, and a worker
    whose caller is killed (even by SIGKILL) ends within a second.
    """
    if workers >= 1 and threads is None:
        threads = max(1, _cores() // workers)
    if workers < 1 or threads < 1:
        raise RelearnError(f"workers and threads per worker must be at least 1, got {workers} and {threads}")
    import torch

    if torch.cuda.is_available():  # asks the driver; creates no CUDA context in this process
        logging.getLogger("hf_relearn").warning(
            "%d workers all train on the first GPU; `accelerate launch ... --parallel runs` gives each process its own",
            workers,
        )
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch state forked mid-use
    messages = context.Queue()
    procs = [
        context.Process(target=_child, args=(target, args, threads, messages, os.getpid()), name=f"worker-{i}")
        for i in range(workers)
    ]
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by the child's OpenMP at import, before set_num_threads
    try:
        for proc in procs:
            proc.start()
        _restore("OMP_NUM_THREADS", saved)
        while any(proc.is_alive() for proc in procs):
            _show(messages, bar, timeout=0.5)
            _refuse_failed(procs)
        while _show(messages, bar, timeout=0.1):  # what the last worker sent before exiting
            pass
        _refuse_failed(procs)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join()
        _restore("OMP_NUM_THREADS", saved)


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _show(messages: Any, bar: Any, timeout: float) -> bool:
    """Print one worker message on ``bar``; False when none came within ``timeout`` seconds."""
    try:
        kind, value = messages.get(timeout=timeout)
    except queue.Empty:
        return False
    if kind == "line":
        bar.write(value)
    elif kind == "finished":
        bar.n = value
        bar.refresh()
    else:
        bar.set_postfix_str(value)
    return True


def _refuse_failed(procs: list) -> None:
    failed = [p for p in procs if p.exitcode not in (None, 0)]
    if failed:
        names = ", ".join(f"{p.name} (exit code {p.exitcode})" for p in failed)
        raise RelearnError(
            f"{names} failed; its traceback is above. The other workers were stopped. "
            "Run the same command again: finished work is kept."
        )


def claimer(folder: Path) -> Callable[[str], bool]:
    """``claim(key)``: True for exactly one of the processes that share ``folder`` (an exclusive create of a file
    named after ``key``, holding the claiming host and process id), on one machine or a shared filesystem."""

    def claim(key: str) -> bool:
        folder.mkdir(exist_ok=True)
        try:
            fd = os.open(folder / key.replace("/", "__"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        return True

    return claim


def quiet_libraries() -> None:
    """One study progress bar, not one per tokenisation, load and save: datasets' bars and transformers' info off."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_LAUNCH_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "ACCELERATE_USE_CPU",
)


def barrier() -> None:
    """Wait for every process of a launch (nothing without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def leave_launch_group() -> None:
    """For ``parallel="runs"``: hide the launch from this process's Trainers, so each trains its runs alone.

    The process group that building TrainingArguments set up is closed and accelerate's shared
    state reset; each process keeps one GPU of its own where there are several.
    """
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState

    local = os.environ.get("LOCAL_RANK")
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    for key in _LAUNCH_ENV:
        os.environ.pop(key, None)
    if local is not None and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = local  # before CUDA is initialised: one GPU per process
