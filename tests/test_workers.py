"""Local worker processes (workers.py): threads per worker, claims taken once, a failing worker stops the rest.

The worker functions live at module level here: a spawned process imports them by name.
"""

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from hf_relearn.errors import RelearnError
from hf_relearn.study.workers import claimer, run_workers


class Bar:
    """What run_workers needs of a tqdm bar, recording what the workers sent."""

    def __init__(self):
        self.lines, self.postfix, self.n = [], None, 0

    def write(self, line):
        self.lines.append(line)

    def set_postfix_str(self, text):
        self.postfix = text

    def refresh(self):
        pass


def _report_threads(bar):
    import torch

    bar.write(f"{torch.get_num_threads()} {os.environ['OMP_NUM_THREADS']}")
    bar.set_postfix_str("done")
    bar.n = 7  # as on a tqdm bar: the runs finished, shown on refresh
    bar.refresh()


def _race(folder, bar):
    claim = claimer(Path(folder))
    for k in range(20):
        if claim(f"piece/{k}"):
            bar.write(f"piece/{k}")


def _fail_or_sleep(folder, bar):
    if claimer(Path(folder))("the one that fails"):
        raise ValueError("this worker fails on purpose")
    time.sleep(90)  # the other: stopped by run_workers, long before this ends


def _heartbeat(folder, bar):
    beat = Path(folder) / f"worker-{os.getpid()}"
    for _ in range(600):  # 2 minutes, far longer than the test waits
        beat.write_text(str(time.monotonic()))
        time.sleep(0.2)


def test_workers_end_when_their_caller_is_killed(tmp_path):
    """``kill -9`` of a study leaves no worker writing into its folder (a restarted study would share it)."""
    import signal
    import subprocess
    import sys

    here = Path(__file__).parent
    caller = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(here)!r}); from test_workers import Bar, "
         f"_heartbeat; from hf_relearn.study.workers import run_workers; run_workers(_heartbeat, ({str(tmp_path)!r},), "
         "workers=2, threads=1, bar=Bar())"],
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("worker-*"))) < 2:
        assert caller.poll() is None and time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.2)
    caller.send_signal(signal.SIGKILL)
    caller.wait()
    time.sleep(3)  # the workers notice within a second
    beats = {p: p.read_text() for p in tmp_path.glob("worker-*")}
    time.sleep(1.5)  # a live worker would have written 7 more beats meanwhile
    assert {p: p.read_text() for p in tmp_path.glob("worker-*")} == beats


def test_each_worker_runs_with_the_threads_it_was_given():
    bar, before = Bar(), os.environ.get("OMP_NUM_THREADS")
    run_workers(_report_threads, (), workers=3, threads=2, bar=bar)
    assert bar.lines == ["2 2"] * 3  # torch's threads and OpenMP's, in each of the 3 processes
    assert bar.postfix == "done" and bar.n == 7
    assert os.environ.get("OMP_NUM_THREADS") == before  # the caller's setting is left as it was


def test_every_piece_of_work_is_claimed_by_exactly_one_worker(tmp_path):
    bar = Bar()
    run_workers(_race, (str(tmp_path / "claims"),), workers=4, threads=1, bar=bar)
    assert sorted(bar.lines) == sorted(f"piece/{k}" for k in range(20))  # none twice, none lost
    assert len(list((tmp_path / "claims").iterdir())) == 20


def test_a_failing_worker_stops_the_others_and_is_named(tmp_path):
    start = time.monotonic()
    with pytest.raises(RelearnError, match=r"worker-\d \(exit code 1\) failed.*Run the same command again"):
        run_workers(_fail_or_sleep, (str(tmp_path / "claims"),), workers=2, threads=1, bar=Bar())
    assert time.monotonic() - start < 60  # did not wait for the sleeping worker (normally about 5 s)
    assert multiprocessing.active_children() == []  # and left none running


def test_bad_worker_counts_are_refused():
    for workers, threads in ((0, 1), (0, None), (2, 0)):
        with pytest.raises(RelearnError, match="at least 1"):
            run_workers(_report_threads, (), workers=workers, threads=threads, bar=Bar())


def test_by_default_the_cores_are_shared_out(monkeypatch):
    import hf_relearn.study.workers

    monkeypatch.setattr(hf_relearn.study.workers, "_cores", lambda: 8)
    bar = Bar()
    run_workers(_report_threads, (), workers=2, threads=None, bar=bar)
    assert bar.lines == ["4 4"] * 2


def test_workers_on_a_gpu_machine_are_told_they_share_the_first_gpu(monkeypatch, caplog):
    import logging

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # here only: the spawned workers see the CPU
    with caplog.at_level(logging.WARNING, logger="hf_relearn"):
        run_workers(_report_threads, (), workers=2, threads=1, bar=Bar())
    assert "2 workers all train on the first GPU; `accelerate launch ... --parallel runs`" in caplog.text
