"""Progress that reads in any log.

A fit that runs elsewhere (Ray Train workers): rank 0 appends its epoch records to
RUN_DIR/progress.jsonl (`ProgressFile`), the driver tails the file (`follow_progress`) into a progress
bar (`cluster-service fit --workers N`) or job-log lines (`epoch_printer`). Where the output is not a
terminal (nohup, a Ray job's driver log, Kubernetes logs) the CLI prints plain lines instead of a bar:
one per epoch (`epoch_line`), and for row counts (assign, extract) one every `RateLines.every_s`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

# Seconds between two plain progress lines of assign and extract (a line per batch floods a log).
LINE_EVERY_S = 30.0


def duration(seconds: float) -> str:
    """Seconds as a person reads them: 42s, 3m05s, 1h02m."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def epoch_line(rec: dict, epochs: int, elapsed: float, per_epoch: float | None = None) -> str:
    """One epoch record as a plain log line: epoch, K, loss, elapsed and the ETA at the planned epochs
    from `per_epoch` seconds ("?" until known: the first epoch's time includes the start, minutes at
    scale); an upper bound, since the fit may stop early once K and the marginal settle; the last line
    then counts the epochs run and says why it stopped, as the bar does."""
    done = rec["epoch"] + 1
    if rec.get("stopped"):  # the last epoch: the planned epochs were a cap
        epochs, eta = done, f"done ({rec['stopped']})"
    elif done >= epochs:
        eta = "done"
    else:
        eta = "?" if per_epoch is None else "<= " + duration(per_epoch * (epochs - done))
    return (f"fit: epoch {done}/{epochs} K={rec['n_clusters']} loss={rec['loss_cluster']:.3f} "
            f"elapsed {duration(elapsed)} ETA {eta}")


class RateLines:
    """`(done, total)` -> a plain line (rows done, rate, ETA) at most every `every_s` seconds, and the
    last one; for assign and extract where the output is not a terminal."""

    def __init__(self, what: str, unit: str = "rows", every_s: float = LINE_EVERY_S,
                 emit: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.what, self.unit, self.every_s, self.clock = what, unit, every_s, clock
        self.emit = emit or (lambda line: print(line, flush=True))
        self.start = self.clock()
        self.last = self.start

    def __call__(self, done: int, total: int | None) -> None:
        now = self.clock()
        finished = total is not None and done >= total
        if now - self.last < self.every_s and not finished:
            return
        self.last = now
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        of = f"/{total}" if total else ""
        eta = ("done" if finished else duration((total - done) / rate) if total and rate > 0 else "?")
        self.emit(f"{self.what}: {done}{of} {self.unit}, {rate:,.0f} {self.unit}/s, "
                  f"elapsed {duration(elapsed)} ETA {eta}")


class ProgressFile:
    """Rank 0's epoch records as JSON lines in RUN_DIR/progress.jsonl, for the driver's progress bar
    (`cluster-service fit --workers N` shows the same bar as a one-process fit; see `follow_progress`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)

    def __call__(self, record, engine) -> None:
        if engine.comm.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record.as_dict()) + "\n")


def epoch_printer(epochs: int, emit: Callable[[str], None] | None = None):
    """A progress feed for logs (job drivers, `fit` when the output is not a terminal): one
    `epoch_line` per epoch record, rank 0's in a distributed fit."""
    emit = emit or (lambda line: print(line, flush=True))
    start = time.monotonic()
    first: list[tuple[int, float]] = []  # (epoch, time) of the first record: epochs after it are timed

    def show(rec: dict) -> None:
        now = time.monotonic()
        first[:] = first or [(rec["epoch"], now)]
        timed = rec["epoch"] - first[0][0]
        emit(epoch_line(rec, epochs, now - start, (now - first[0][1]) / timed if timed > 0 else None))

    return show


@contextlib.contextmanager
def follow_progress(path: str | os.PathLike, on_record, poll_s: float = 0.5):
    """Call `on_record(dict)` for every line appended to `path` while the block runs (a thread tails it)."""
    import threading

    path, done, seen = Path(path), threading.Event(), [0]

    def drain() -> None:
        if path.is_file():
            lines = path.read_text().splitlines()
            for line in lines[seen[0]:]:
                on_record(json.loads(line))
            seen[0] = len(lines)

    def loop() -> None:
        while not done.wait(poll_s):
            drain()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        drain()
