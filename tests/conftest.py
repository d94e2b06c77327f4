"""Shared fixtures. Ray and MLflow fixtures start real local instances, as a user would."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# The report's map by PCA: UMAP's numba compile costs 30-40 s per process on the 2-core CI box
# (tests/test_curate.py lays out one map with UMAP where umap-learn is installed).
os.environ.setdefault("CLUSTER_SERVICE_MAP_LAYOUT", "pca")
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
        # as runtime.ray_session starts a local Ray: workers' own lines stay in Ray's log files
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2, log_to_driver=False)
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


# ---- a small ImageNet-like pipeline input: generated images and a random MoCo checkpoint ------------

from cluster_service.datasets import IMAGENET_CLASSES, write_image_folder  # noqa: E402,F401


@pytest.fixture(scope="session")
def imagenet_tree(tmp_path_factory):
    """train/ (4 classes x 25 images) and val/ (4 x 8) ImageFolder splits and a randomly initialised
    ResNet-50 saved in the official MoCo v2 checkpoint format."""
    from torch import nn
    from torchvision.models import resnet50

    from feature_extraction.moco import save_moco_checkpoint

    root = tmp_path_factory.mktemp("imagenet")
    train = write_image_folder(root / "train", 25, seed=0)
    val = write_image_folder(root / "val", 8, seed=1)
    torch.manual_seed(0)
    model = resnet50(weights=None)
    model.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128))
    ckpt = root / "moco_v2_random.pth.tar"
    save_moco_checkpoint(model.eval(), ckpt)
    return {"train": root / "train", "val": root / "val", "checkpoint": ckpt, "train_ids": train, "val_ids": val}


# A schedule for ~100 rows that still splits and merges, so a 2-worker fit takes seconds, not minutes.
SMALL_FIT = {"k_init": 1, "seed": 0, "net": {"min_steps_per_epoch": 2},
             "schedule": {"epochs": 20, "warmup_epochs": 2, "subcluster_start": 2, "first_split": 4,
                          "move_period": 4, "freeze_epochs": 1, "final_epochs": 3}}


def imagenet_job_config(tree, work_dir) -> dict:
    """The imagenet job config of the end-to-end tests (paths absolute)."""
    return {
        "imagenet": {"train": str(tree["train"]), "val": str(tree["val"]), "work_dir": str(work_dir)},
        "extract": {"checkpoint": str(tree["checkpoint"]), "image_size": 32, "batch_size": 32,
                    "rows_per_shard": 50, "num_actors": 1},
        "train": {"workers": 2, "checkpoint_every": 10, "max_failures": 0},
        "fit": SMALL_FIT,
        "assign": {"local": True},
        "tracking": {"experiment": "imagenet-e2e"},
    }
