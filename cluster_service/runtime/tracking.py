"""MLflow experiment tracking: the one module that talks to MLflow (besides the pyfunc wrapper). What
goes into a run is rendered elsewhere: tags by runtime/provenance.py, artifact files by
runtime/artifacts.py.

Every fit is one MLflow run:

    params     every config field, dotted (prior.alpha, schedule.epochs, ...) + data shape
    metrics    per epoch (step = epoch): K, losses, log marginal likelihood, moves, size
               entropy, epoch time and its parts; NMI/ARI/ACC every `eval_every` epochs and at the
               end when labels exist (computed here, after the engine's epoch: training never sees them)
    artifacts  model/ (the fitted model directory), config.yaml (resolved; loadable with --config),
               schedule_plan.txt, history.json, plots/*.png
    tags       data manifest hash, git commit, package versions, device

Defaults need no setup: a sqlite store ./mlflow.db with artifacts under ./mlartifacts in the
working directory; MLFLOW_TRACKING_URI (or an explicit URI) overrides. Only rank 0 logs.
Tracking never kills a fit: every MLflow call is wrapped, failures are logged as warnings, an
unreachable server disables tracking up front, and repeated failures disable it mid-run.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cluster_service.config import EXPERIMENT, FitConfig
from cluster_service.runtime.artifacts import write_plots, write_run_files
from cluster_service.runtime.provenance import device_tags, run_tags

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = EXPERIMENT
DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
# Consecutive failed MLflow calls after which tracking is switched off for the rest of the run.
MAX_CONSECUTIVE_FAILURES = 3
# Seconds to wait for a tracking server's /health before giving up on it.
HEALTH_TIMEOUT_S = 3.0
# Bounded HTTP behaviour for a server that dies mid-run (MLflow's defaults retry for minutes).
_HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}

# EpochRecord field -> metric name ("/" groups charts in the MLflow UI).
METRIC_NAMES = {
    "n_clusters": "n_clusters",
    "loss_cluster": "loss/cluster",
    "loss_sub": "loss/sub",
    "log_marginal": "log_marginal",
    "size_entropy": "size_entropy",
    "splits_proposed": "moves/splits_proposed",
    "splits_accepted": "moves/splits_accepted",
    "merges_proposed": "moves/merges_proposed",
    "merges_accepted": "moves/merges_accepted",
    "pruned": "moves/pruned",
    "deletes_proposed": "moves/deletes_proposed",
    "deletes_accepted": "moves/deletes_accepted",
    "frozen": "frozen",
    "time_total": "time/epoch",
    "time_train": "time/train",
    "time_stats": "time/stats",
    "time_reduce": "time/reduce",
    "time_mstep": "time/mstep",
    "time_moves": "time/moves",
    "time_estep": "time/estep",
    "log_densities": "estep/log_densities",
    "truncated": "estep/truncated",
    "comm_bytes": "comm/bytes",
    "grad_bytes": "comm/grad_bytes",
    "peak_memory": "memory/peak_rss",
    "peak_device_memory": "memory/peak_device",
}


def epoch_metrics(record) -> dict[str, float]:
    """An EpochRecord (or its dict) as {metric name: value}; every numeric field but the epoch."""
    d = record if isinstance(record, Mapping) else record.as_dict()
    return {METRIC_NAMES.get(k, k): float(v) for k, v in d.items()
            if k != "epoch" and isinstance(v, int | float)}


# ---- where runs go ------------------------------------------------------------------------------


def resolve_tracking_uri(uri: str | None = None, workdir: str | os.PathLike | None = None) -> str:
    """Explicit URI > MLFLOW_TRACKING_URI > sqlite file ./mlflow.db (made absolute, so Ray
    workers whose working directory differs write to the same store)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri:
        return f"sqlite:///{(Path(workdir or Path.cwd()) / DEFAULT_DB).resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///"):]
        if rel and rel != ":memory:":
            return f"sqlite:///{(Path(workdir or Path.cwd()) / rel).resolve()}"
    return uri


def default_artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a sqlite store go to mlartifacts/<experiment>/ beside the database file; a
    server or other store chooses its own."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
        return (db.parent / DEFAULT_ARTIFACTS / folder).resolve().as_uri()
    return None


def server_reachable(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> str | None:
    """None if an http(s) tracking server answers /health (or the URI is not http), else why not."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status >= 400:
                return f"HTTP {resp.status} from {uri}/health"
    except (TimeoutError, urllib.error.URLError, OSError) as e:
        return f"{uri} is unreachable ({getattr(e, 'reason', e)})"
    return None


# ---- the tracker ------------------------------------------------------------------------------------


class Tracker:
    """One MLflow run; an epoch callback for `fit`; end-of-run artifacts via `log_result`.

        with Tracker(cfg, rank=rank) as tracker:
            result = fit(x, cfg, callbacks=[tracker], manifest_hash=h)
            tracker.log_result(result, x, labels, model_dir)

    Ranks other than 0, `enabled=False`, and any start-up failure give an inactive tracker whose
    methods do nothing. `labels` (n,) and `eval_every` > 0 add NMI/ARI/ACC every that many epochs,
    from `engine.assign()` in this callback (single-process fits, where the engine holds all rows).
    """

    def __init__(
        self,
        cfg: FitConfig,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        run_name: str | None = None,
        rank: int = 0,
        enabled: bool = True,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        labels: np.ndarray | None = None,
        eval_every: int = 0,
    ):
        self.cfg = cfg
        self.uri = resolve_tracking_uri(tracking_uri)
        self.experiment = experiment or DEFAULT_EXPERIMENT
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.extra_tags = {k: str(v) for k, v in (tags or {}).items()}
        self.labels = None if labels is None else np.asarray(labels)
        self.eval_every = eval_every
        self.active = enabled and rank == 0
        self.client = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.scores: dict[int, dict[str, float]] = {}  # epoch -> label scores (for the plot)
        self._failures = 0
        self._device_tagged = False

    # ---- failure policy ----------------------------------------------------------------------

    def guarded(self, what: str, fn: Callable, *args, **kwargs) -> Any:
        """Run one MLflow call; on failure warn, and switch tracking off after repeated failures."""
        if not self.active:
            return None
        try:
            out = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never kill a fit
            self._failures += 1
            first_line = (str(e).splitlines() or [""])[0][:300]
            log.warning("MLflow %s failed (%s: %s)", what, type(e).__name__, first_line)
            if self._failures >= MAX_CONSECUTIVE_FAILURES or self.run_id is None:
                why = f"{self._failures} consecutive failure(s)" if self.run_id else "could not start a run"
                self.disable(why)
            return None
        self._failures = 0
        return out

    def disable(self, why: str) -> None:
        if self.active:
            log.warning("MLflow tracking disabled for this run: %s", why)
        self.active = False

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self, manifest_hash: str | None = None, params: Mapping[str, Any] | None = None) -> str | None:
        """Create the run; log config params (+ `params`) and tags. Returns the run id or None."""
        if not self.active:
            return None
        for k, v in _HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(k, v)
        problem = server_reachable(self.uri)
        if problem:
            self.disable(problem)
            return None
        self.guarded("start", self._start, manifest_hash, dict(params or {}))
        return self.run_id

    def _start(self, manifest_hash: str | None, params: dict[str, Any]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            location = default_artifact_location(self.uri, self.experiment)
            self.experiment_id = _create_experiment(self.client, self.experiment, location)
        else:
            self.experiment_id = exp.experiment_id
        tags = {**run_tags(manifest_hash), **self.extra_tags}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        all_params = {**self.cfg.flat(), **params}
        batch = [Param(k, str(v)[:6000]) for k, v in all_params.items()]
        for i in range(0, len(batch), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=batch[i : i + 100])

    def end(self, status: str = "FINISHED") -> None:
        """Close the run, also when tracking was switched off mid-run (best effort)."""
        if self.run_id is not None and self.client is not None:
            self.active = True
            self._failures = MAX_CONSECUTIVE_FAILURES - 1  # one try
            self.guarded("end run", self.client.set_terminated, self.run_id, status)
        self.active = False

    def __enter__(self) -> Tracker:
        if self.run_id is None:
            self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type is not None else "FINISHED")

    # ---- logging --------------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        if not self.active or self.run_id is None or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None and np.isfinite(v)]
        self.guarded("log metrics", self.client.log_batch, self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active or self.run_id is None:
            return
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self.guarded("set tags", self.client.log_batch, self.run_id, tags=batch)

    def __call__(self, record, engine) -> None:
        """Epoch callback: the record's metrics at step=epoch (plus label scores every eval_every)."""
        if not self.active or self.run_id is None:
            return
        if not self._device_tagged:
            self._device_tagged = True
            self.set_tags({**device_tags(engine.device), "world_size": engine.comm.world_size})
        metrics = epoch_metrics(record)
        last = bool(record.stopped)  # the last record of every fit, early-stopped or at the cap
        if self.labels is not None and self.eval_every > 0 and (record.epoch % self.eval_every == 0 or last):
            metrics.update(self._label_scores(record.epoch, engine))
        self.log_metrics(metrics, step=record.epoch)

    def _label_scores(self, epoch: int, engine) -> dict[str, float]:
        from cluster_service.report.evaluate import score

        clusters, _ = engine.assign()
        if len(clusters) != len(self.labels):  # a worker holding part of the rows: skip
            return {}
        s = score(self.labels, clusters)
        if s.n_labelled == 0:
            return {}
        self.scores[epoch] = {"nmi": s.nmi, "ari": s.ari, "acc": s.acc}
        return {f"eval/{k}": v for k, v in self.scores[epoch].items()}

    def log_artifact_dir(self, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.active and self.run_id is not None:
            self.guarded(f"log artifacts {artifact_path or local_dir}", self.client.log_artifacts, self.run_id,
                       str(local_dir), artifact_path)

    def log_texts(self, files: Mapping[str, str]) -> None:
        """Small text artifacts {relative path: content} (tables, configs)."""
        if not self.active or self.run_id is None:
            return
        with tempfile.TemporaryDirectory(prefix="cs-mlflow-") as tmp:
            for name, text in files.items():
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / name).write_text(text)
            self.log_artifact_dir(tmp)

    def log_result(
        self,
        result,
        x: np.ndarray,
        labels: np.ndarray | None = None,
        model_dir: str | os.PathLike | None = None,
        extra_metrics: Mapping[str, float] | None = None,
        scores=None,
    ) -> dict[str, float]:
        """End-of-run logging: final metrics (label scores when labels exist: `scores`, a
        report.evaluate.Scores of result.clusters, when the caller has them), model directory,
        resolved config, schedule plan, history, plots. Returns the final metrics."""
        final: dict[str, float] = {"final/n_clusters": float(result.n_clusters), **(extra_metrics or {})}
        if result.history:
            final["final/log_marginal"] = result.history[-1].log_marginal
            final["final/epochs"] = float(len(result.history))
        if scores is None and labels is not None:
            from cluster_service.report.evaluate import score

            scores = score(np.asarray(labels), result.clusters)
        if scores is not None:
            final["k_true"] = float(scores.k_true)
            if scores.n_labelled:
                final.update({"nmi": scores.nmi, "ari": scores.ari, "acc": scores.acc})
        if not self.active or self.run_id is None:
            return final
        step = result.history[-1].epoch if result.history else 0
        self.log_metrics(final, step=step)
        if result.history and result.history[-1].stopped:
            self.set_tags({"stopped": result.history[-1].stopped})  # why the fit ended (early stop or cap)
        with tempfile.TemporaryDirectory(prefix="cs-mlflow-") as tmp:
            tmp = Path(tmp)
            write_run_files(tmp, self.cfg, result.history)
            self.guarded("render plots", write_plots, tmp / "plots", result, x, labels, self.scores, self.cfg.seed)
            self.log_artifact_dir(tmp)
        if model_dir is not None:
            self.log_artifact_dir(model_dir, "model")
        return final


def _create_experiment(client, name: str, artifact_location: str | None) -> str:
    """Create the experiment; if another process created it meanwhile, use theirs."""
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
