"""Epoch progress of a fit that runs elsewhere (Ray Train workers): rank 0 appends its epoch records
to RUN_DIR/progress.jsonl (`ProgressFile`), the driver tails the file (`follow_progress`) into a
progress bar (`cluster-service fit --workers N`) or job-log lines (`epoch_printer`)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


class ProgressFile:
    """Rank 0's epoch records as JSON lines in RUN_DIR/progress.jsonl, for the driver's progress bar
    (`cluster-service fit --workers N` shows the same bar as a one-process fit; see `follow_progress`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)

    def __call__(self, record, engine) -> None:
        if engine.comm.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record.as_dict()) + "\n")


def epoch_printer(epochs: int):
    """A progress feed for job logs: one line per ~5% of the epochs, and the last."""
    step = max(1, epochs // 20)

    def show(rec: dict) -> None:
        if (rec["epoch"] + 1) % step == 0 or rec["epoch"] + 1 == epochs:
            print(f"fit: epoch {rec['epoch'] + 1}/{epochs} K={rec['n_clusters']} "
                  f"loss={rec['loss_cluster']:.3f} log_marginal={rec['log_marginal']:.4g}", flush=True)

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
