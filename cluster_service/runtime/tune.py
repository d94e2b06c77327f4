"""Ray Tune sweeps over priors and schedule settings, each trial a fit logged to MLflow.

    parent MLflow run "sweep"          base config, sweep settings, best trial's config/metrics,
      ├─ child run per trial            trials.json, best_config.yaml
      │    (tag mlflow.parentRunId)     a normal fit run: params, per-epoch metrics, plots
      └─ ...

Trials are chosen by a label-free criterion: the mean exact log-density
log sum_k pi_k N(x; mu_k, Sigma_k) of a held-out fraction of the rows (the fit sees only the
rest). With labels, each trial also reports NMI/ARI/ACC on its training rows; they are shown,
never used to choose.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import logsumexp

from cluster_service.config import FitConfig
from cluster_service.io.atomic import write_text_atomic
from cluster_service.runtime.ray_session import ensure_ray

log = logging.getLogger(__name__)

METRIC = "heldout_loglik"  # maximised


def search_space() -> dict[str, Any]:
    """The sweep's search space, in dotted config keys (the one place it is defined)."""
    from ray import tune

    return {
        "prior.alpha": tune.loguniform(1.0, 100.0),
        "prior.kappa": tune.loguniform(1e-5, 1e-2),
        "prior.nu_offset": tune.uniform(1.0, 10.0),
        "prior.psi_scale": tune.loguniform(1e-3, 5e-2),
        "k_init": tune.choice([1, 2, 5, 10]),
        "net.lr": tune.loguniform(5e-4, 1e-2),
        "net.sub_lr": tune.loguniform(1e-3, 2e-2),
    }


def split_heldout(n_samples: int, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random (train, held-out) split of row indices; the held-out part has round(frac * n)."""
    if not 0 < frac < 1:
        raise ValueError(f"held-out fraction must be in (0, 1), got {frac}")
    n_out = int(round(frac * n_samples))
    if n_out < 1 or n_samples - n_out < 2:
        raise ValueError(f"{n_samples} rows are too few for a held-out fraction of {frac}")
    perm = np.random.default_rng(seed).permutation(n_samples)
    return np.sort(perm[n_out:]), np.sort(perm[:n_out])


def heldout_log_likelihood(model, x: np.ndarray) -> float:
    """Mean log p(x) = mean_i logsumexp_k (log pi_k + log N(x_i; mu_k, Sigma_k)) under a FittedModel."""
    return float(logsumexp(model.log_joint(x), axis=1).mean())


@dataclass
class TrialData:
    """What every trial needs; shipped once through Ray's object store (tune.with_parameters)."""

    x_train: np.ndarray  # (n_train, d)
    x_heldout: np.ndarray  # (n_heldout, d)
    labels_train: np.ndarray | None  # (n_train,)
    base_config: dict[str, Any]
    manifest_hash: str | None
    tracking_uri: str | None
    experiment: str | None
    parent_run_id: str | None
    tracking: bool
    threads: int = 1


def run_trial(params: dict[str, Any], data: TrialData, trial_name: str = "trial") -> dict[str, Any]:
    """One trial: fit on the training rows with `params` over the base config, score the held-out
    rows, log it all as a child MLflow run. Returns the trial's metrics."""
    import torch

    from cluster_service.runtime.tracking import Tracker
    from cluster_service.train.fit import fit

    torch.set_num_threads(data.threads)
    x_heldout = np.array(data.x_heldout)  # arrays from Ray's object store are read-only
    cfg = FitConfig.from_dict(data.base_config).replace(**params)
    tracker = Tracker(cfg, data.tracking_uri, data.experiment, run_name=trial_name, enabled=data.tracking,
                      parent_run_id=data.parent_run_id, tags={"tune.trial": trial_name})
    tracker.start(data.manifest_hash, {"data.n_train": len(data.x_train), "data.n_heldout": len(x_heldout)})
    t0 = time.perf_counter()
    with tracker:
        result = fit(data.x_train, cfg, callbacks=[tracker], manifest_hash=data.manifest_hash)
        metrics = {METRIC: heldout_log_likelihood(result.model, x_heldout),
                   "fit_seconds": time.perf_counter() - t0}
        metrics.update(tracker.log_result(result, data.x_train, data.labels_train, extra_metrics=metrics))
    metrics["n_clusters"] = int(result.n_clusters)
    metrics["mlflow_run_id"] = tracker.run_id or ""
    return metrics


def _trainable(config: dict[str, Any], data: TrialData) -> None:
    from ray import tune

    ctx = tune.get_context()
    tune.report(run_trial(config, data, trial_name=ctx.get_trial_name() or "trial"))


@dataclass
class SweepResult:
    trials: list[dict[str, Any]]  # per trial: the sampled params, metrics, mlflow_run_id; best first
    best_params: dict[str, Any]
    best_config: FitConfig
    parent_run_id: str | None
    errors: list[str] = field(default_factory=list)

    @property
    def best(self) -> dict[str, Any]:
        return self.trials[0]


def run_sweep(
    x: np.ndarray,
    labels: np.ndarray | None = None,
    base_cfg: FitConfig | None = None,
    num_samples: int = 8,
    max_concurrent: int | None = None,
    cpus_per_trial: int = 1,
    heldout_frac: float = 0.2,
    seed: int = 0,
    out_dir: str | Path = "runs/tune",
    tracking: bool = True,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    manifest_hash: str | None = None,
    space: dict[str, Any] | None = None,
) -> SweepResult:
    """Sweep `space` (default `search_space()`) with Ray Tune on x (n, d); each trial fits on the
    same (1 - heldout_frac) of the rows. Uses the running Ray instance or starts a local one."""
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from cluster_service.runtime.tracking import Tracker, resolve_tracking_uri

    base_cfg = (base_cfg or FitConfig()).validate()
    space = space if space is not None else search_space()
    x = np.asarray(x)
    train_idx, held_idx = split_heldout(len(x), heldout_frac, seed)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(tracking_uri)  # absolute: trials run in other working directories

    parent = Tracker(base_cfg, uri, experiment, run_name=f"sweep-{out_dir.name}", enabled=tracking,
                     tags={"tune.role": "parent"})
    parent.start(manifest_hash, {"tune.num_samples": num_samples, "tune.max_concurrent": max_concurrent,
                                 "tune.heldout_frac": heldout_frac, "tune.metric": METRIC,
                                 "tune.space": json.dumps({k: str(v) for k, v in space.items()})})
    with parent:
        data = TrialData(
            x_train=x[train_idx], x_heldout=x[held_idx],
            labels_train=None if labels is None else np.asarray(labels)[train_idx],
            base_config=base_cfg.to_dict(), manifest_hash=manifest_hash, tracking_uri=uri,
            experiment=parent.experiment, parent_run_id=parent.run_id, tracking=parent.active,
            threads=cpus_per_trial,
        )
        started_ray = ensure_ray()
        try:
            tuner = tune.Tuner(
                tune.with_resources(tune.with_parameters(_trainable, data=data), {"cpu": cpus_per_trial}),
                param_space=space,
                tune_config=tune.TuneConfig(
                    metric=METRIC, mode="max", num_samples=num_samples,
                    search_alg=BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent or 0),
                ),
                run_config=tune.RunConfig(name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}",
                                          storage_path=str(out_dir / "ray_results"), verbose=0),
            )
            grid = tuner.fit()
        finally:
            if started_ray:
                ray.shutdown()
        result = _collect(grid, space, base_cfg, parent.run_id)
        _log_parent(parent, result)
    (out_dir / "trials.json").write_text(json.dumps(result.trials, indent=1, default=str))
    _write_yaml(out_dir / "best_config.yaml", {"fit": result.best_config.to_dict()})
    return result


def _collect(grid, space: dict[str, Any], base_cfg: FitConfig, parent_run_id: str | None) -> SweepResult:
    errors = [f"{r.path}: {type(r.error).__name__}: {r.error}" for r in grid if r.error is not None]
    trials = []
    for r in grid:
        if r.error is not None or not r.metrics or METRIC not in r.metrics:
            continue
        row = {k: r.config[k] for k in space if k in r.config}
        keep = (METRIC, "n_clusters", "nmi", "ari", "acc", "fit_seconds", "mlflow_run_id")
        row.update({k: r.metrics[k] for k in keep if k in r.metrics})
        trials.append(row)
    if not trials:
        raise RuntimeError("every trial failed:\n" + "\n".join(errors))
    for e in errors:
        log.warning("trial failed: %s", e)
    trials.sort(key=lambda t: -t[METRIC])
    best_params = {k: trials[0][k] for k in space if k in trials[0]}
    return SweepResult(trials, best_params, base_cfg.replace(**best_params), parent_run_id, errors)


def _log_parent(parent, result: SweepResult) -> None:
    best = result.best
    metrics = {f"best/{k}": float(best[k]) for k in (METRIC, "n_clusters", "nmi", "ari", "acc") if k in best}
    parent.log_metrics({**metrics, "trials_ok": len(result.trials), "trials_failed": len(result.errors)})
    parent.set_tags({"tune.best_run_id": best.get("mlflow_run_id", ""),
                     **{f"best.{k}": v for k, v in result.best_params.items()}})
    import yaml

    parent.guarded("render sweep plot", _log_sweep_plot, parent, result)
    best_yaml = yaml.safe_dump({"fit": result.best_config.to_dict()}, sort_keys=False)
    trials_json = json.dumps(result.trials, indent=1, default=str)
    parent.log_texts({"trials.json": trials_json, "best_config.yaml": best_yaml})


def _log_sweep_plot(parent, result: SweepResult) -> None:
    import tempfile

    from cluster_service.report import plots

    with tempfile.TemporaryDirectory(prefix="cs-sweep-") as tmp:
        plots.save_figure(plots.plot_sweep(result.trials, METRIC, list(result.best_params)),
                          Path(tmp) / "plots" / "sweep.png")
        parent.log_artifact_dir(tmp)


def _write_yaml(path: Path, data: dict) -> None:
    import yaml

    write_text_atomic(yaml.safe_dump(data, sort_keys=False), path)
