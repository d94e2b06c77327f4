"""Fingerprints of fits, to show that a refactor leaves every fit bit-identical: for each set, K, the
MD5 of the int32 cluster column (what assignments.parquet holds), the final log marginal, and an MD5
of every epoch's log marginal. Run it before and after a change on the same machine (one torch
thread by default: float sums depend on the thread count).

    python -m cluster_service.bench.fingerprint [--sets k37,k37-dense,imagenet50,digits,proxy10] [--threads 1]

k37: the 60k x 32 overlap mixture of 37 components (bench.krecovery) at the defaults; k37-dense: the
same with candidates=0 (every row scored against all K); imagenet50: the shared ImageNet-50 MoCo
features (skipped without ../shared/data); digits: sklearn digits PCA-16; proxy10: the fit rows of
the 1/10-scale proxy job (bench.imagenet_proxy --n 128000 --k 100).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

import numpy as np

SETS = ("k37", "k37-dense", "imagenet50", "digits", "proxy10")


def load(name: str) -> np.ndarray | None:
    """The rows (n, d) float32 of a set, or None where the set is not on this machine."""
    from cluster_service.bench.krecovery import datasets
    from cluster_service.datasets import make_imagenet_proxy

    if name == "proxy10":
        x, _ = make_imagenet_proxy(128_000, n_clusters=100)
        perm = np.random.default_rng(0).permutation(128_000)
        return x[np.sort(perm[128_000 // 10 :])]
    key = {"k37": "K 37", "k37-dense": "K 37", "imagenet50": "ImageNet-50", "digits": "digits"}[name]
    found = [load for set_name, (load, _k) in datasets().items() if key in set_name]
    return found[0]()[0] if found else None


def fingerprint(name: str, seed: int = 0) -> dict | None:
    from cluster_service.config import FitConfig
    from cluster_service.train.fit import fit

    x = load(name)
    if x is None:
        return None
    cfg = FitConfig(seed=seed, candidates=0) if name.endswith("-dense") else FitConfig(seed=seed)
    t = time.perf_counter()
    res = fit(x, cfg)
    marginals = np.array([r.log_marginal for r in res.history])
    return {"set": name, "K": res.n_clusters,
            "clusters_md5": hashlib.md5(np.asarray(res.clusters, dtype=np.int32).tobytes()).hexdigest(),
            "log_marginal": repr(float(marginals[-1])), "history_md5": hashlib.md5(marginals.tobytes()).hexdigest(),
            "epochs": len(res.history), "seconds": round(time.perf_counter() - t, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="k37,k37-dense,imagenet50,digits", help=f"comma-separated, of {SETS}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    for name in args.sets.split(","):
        if name not in SETS:
            raise SystemExit(f"unknown set {name!r}; one of {SETS}")
        row = fingerprint(name, args.seed)
        print(json.dumps(row if row is not None else {"set": name, "skipped": "data not on this machine"}), flush=True)


if __name__ == "__main__":
    main()
