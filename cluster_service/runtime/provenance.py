"""Provenance tags of a tracked run: the git commit of this checkout, package versions, the device
and host. Plain dicts of strings; runtime/tracking.py sets them on the MLflow run."""

from __future__ import annotations

import platform
import socket
import subprocess
from pathlib import Path

_PACKAGES = ("cluster_service", "torch", "numpy", "mlflow", "ray", "faiss-cpu", "faiss-gpu-cu12", "pyarrow")


def git_commit() -> dict[str, str]:
    """Commit (and whether the tree is dirty) of the checkout this package runs from, if any."""
    root = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5)
        if sha.returncode != 0:
            return {}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        return {"git.commit": sha.stdout.strip(), "git.dirty": str(bool(dirty.stdout.strip())).lower()}
    except (OSError, subprocess.SubprocessError):
        return {}


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def device_tags(device) -> dict[str, str]:
    import torch

    dev = torch.device(device)
    tags = {"device": str(dev), "host": socket.gethostname()}
    if dev.type == "cuda":
        tags["device.name"] = torch.cuda.get_device_name(dev)
    else:
        tags["device.name"] = platform.processor() or platform.machine()
        tags["device.threads"] = str(torch.get_num_threads())
    return tags


def run_tags(manifest_hash: str | None) -> dict[str, str]:
    """The tags every run starts with: commit, `versions.*` and the data's manifest hash."""
    return {**git_commit(), **{f"versions.{k}": v for k, v in package_versions().items()},
            "data.manifest_hash": manifest_hash or "none"}
