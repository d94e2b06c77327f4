"""The fitted model as an MLflow pyfunc model, and model URIs for `assign`.

The only MLflow touch point besides cluster_service/runtime/tracking.py. The pyfunc model carries the model
directory (model.json, arrays.npz) as its artifact "model_dir"; `predict` takes

    a DataFrame with one column of feature vectors (named "feature", or the only column),
    a DataFrame of d numeric columns, or an (n, d) array / list of lists,

and returns a DataFrame with cluster (int32), log_prob (float32: log pi_k + log N(x; mu_k, Sigma_k)
of that cluster) and margin (float32: best minus second-best score), one row per input row.
Loading it back needs cluster_service importable (the wrapper class lives here), not Ray.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd

from cluster_service.config import NOVELTY_FPR
from cluster_service.io.checks import check_model_features, nonfinite_message
from cluster_service.serve.assign import DEFAULT_TOP_M, METHODS, make_assigner
from cluster_service.serve.model import ModelError, load_model

MODEL_DIR_ARTIFACT = "model_dir"
PYFUNC_NAME = "pyfunc_model"
_REQUIREMENTS = ["numpy", "pandas", "pyarrow", "torch", "faiss-cpu", "mlflow"]


def features_from_input(data, n_features: int) -> np.ndarray:
    """pyfunc input -> (n, d) float32; raises ModelError naming what was expected."""
    if isinstance(data, pd.DataFrame):
        if data.shape[1] == 1 or "feature" in data.columns:
            col = data["feature"] if "feature" in data.columns else data.iloc[:, 0]
            if len(col) and np.ndim(col.iloc[0]) == 1:  # one vector per row
                try:
                    x = np.stack([np.asarray(v, dtype=np.float32) for v in col])
                except ValueError as e:
                    raise ModelError(f"column {col.name!r}: feature vectors of unequal length ({e})") from e
                return _checked(x, n_features, f"column {col.name!r}")
        non_numeric = [c for c in data.columns if not pd.api.types.is_numeric_dtype(data[c])]
        if non_numeric:
            raise ModelError(f"columns {non_numeric[:5]} are not numeric; expected {n_features} numeric "
                             "columns or one column of feature vectors")
        return _checked(data.to_numpy(np.float32), n_features, "DataFrame")
    return _checked(np.asarray(data, dtype=np.float32), n_features, "array")


def _checked(x: np.ndarray, n_features: int, what: str) -> np.ndarray:
    check_model_features(x, n_features, what, ModelError)
    message = nonfinite_message(x, what)
    if message is not None:
        raise ModelError(message)
    return x


class ClusterModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: assigns rows with `method` (shortlist | exact | net) on the CPU."""

    def __init__(self, method: str = "shortlist", top_m: int = DEFAULT_TOP_M):
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        self.method, self.top_m = method, top_m

    def load_context(self, context) -> None:
        self.model = load_model(context.artifacts[MODEL_DIR_ARTIFACT])
        self.assign = make_assigner(self.model, self.method, self.top_m, "cpu")

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        a = self.assign(features_from_input(model_input, self.model.n_features))
        novelty, novel = self.model.novelty_of(a.cluster, a.log_prob, NOVELTY_FPR)  # as `assign` writes them
        return pd.DataFrame({
            "cluster": a.cluster.astype(np.int32),
            "log_prob": a.log_prob.astype(np.float32),
            "margin": a.margin.astype(np.float32),
            "novelty": novelty.astype(np.float32),
            "novel": novel,
        })


def log_pyfunc_model(
    model_dir: str | os.PathLike,
    registered_name: str | None = None,
    method: str = "shortlist",
    top_m: int = DEFAULT_TOP_M,
    tracking_uri: str | None = None,
):
    """Log MODEL_DIR as a pyfunc model in the active run (or a new one, at `tracking_uri` when given)
    and optionally register it. Returns MLflow's ModelInfo (model_uri; registered_model_version)."""
    load_model(model_dir)  # refuse a broken directory before anything is logged
    kwargs = dict(
        name=PYFUNC_NAME,
        python_model=ClusterModel(method, top_m),
        artifacts={MODEL_DIR_ARTIFACT: str(Path(model_dir).resolve())},
        registered_model_name=registered_name,
        pip_requirements=_REQUIREMENTS,  # explicit: inference would load the model in a subprocess
    )
    if mlflow.active_run() is not None:
        return mlflow.pyfunc.log_model(**kwargs)
    with tracking_at(tracking_uri), mlflow.start_run(run_name=f"pyfunc {Path(model_dir).name}"):
        return mlflow.pyfunc.log_model(**kwargs)


@contextlib.contextmanager
def tracking_at(tracking_uri: str | None):
    """MLflow's tracking and registry URIs set to `tracking_uri` inside the block and restored after it
    (MLflow keeps them process-global; a library call must not change them for its caller)."""
    if tracking_uri is None:
        yield
        return
    old_tracking, old_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_tracking)
        mlflow.set_registry_uri(old_registry)


def download_model_dir(
    uri: str, tracking_uri: str | None = None, dst: str | os.PathLike | None = None
) -> Path:
    """Download an MLflow model (models:/name/version, runs:/run_id/path, ...) and return the model
    directory inside it: a pyfunc model's artifact, or a plain model directory logged by `fit`."""
    with tracking_at(tracking_uri):
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst))
        except mlflow.exceptions.MlflowException as e:
            where = mlflow.get_tracking_uri()
            raise ModelError(f"{uri}: cannot download from MLflow at {where} ({e.message})") from e
    found = sorted(local.rglob("model.json"), key=lambda p: len(p.parts))
    if not found:
        raise ModelError(f"{uri}: the MLflow model holds no model.json (not a cluster_service model)")
    return found[0].parent
