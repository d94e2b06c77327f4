"""Shared fixtures. Ray and MLflow fixtures start real local instances, as a user would."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def mixture_small():
    """A 6-cluster generated mixture, d=8, 3000 points."""
    from cluster_service.datasets import make_mixture

    return make_mixture(3000, 8, 6, seed=1)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the whole test session (2 CPUs, no dashboard); shut down at
    the end. Tests that run Ray Train / Ray Data / Tune take this fixture instead of calling
    ray.init themselves."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def mlflow_store_outside_checkout(tmp_path_factory):
    """Fits that tests run log to MLflow (tracking is on by default); send those runs to a temporary
    sqlite store instead of ./mlflow.db in the checkout. Tests of the default store chdir to
    tmp_path and unset MLFLOW_TRACKING_URI themselves."""
    if "MLFLOW_TRACKING_URI" in os.environ:
        yield os.environ["MLFLOW_TRACKING_URI"]
        return
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    os.environ.pop("MLFLOW_TRACKING_URI", None)
