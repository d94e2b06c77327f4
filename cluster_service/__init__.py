"""cluster_service: DeepDPM clustering that infers K, as a library and a service.

    from cluster_service import DeepDPM          # the scikit-learn estimator (ops/estimator.py)

The subpackages and which may import which: docs/ARCHITECTURE.md.
"""

from __future__ import annotations

__all__ = ["DeepDPM"]


def __getattr__(name: str):
    # Lazy, so `import cluster_service.io.shards` (a Ray worker, a reader) does not import sklearn.
    if name == "DeepDPM":
        from cluster_service.ops.estimator import DeepDPM

        return DeepDPM
    raise AttributeError(f"module 'cluster_service' has no attribute {name!r}")
