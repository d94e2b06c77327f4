"""Does the delete move earn its place by default? `moves.delete_largest` 0 against 2 on generated
sets made for the question (a balanced mixture, one with sizes over a factor 20 whose large
clusters are the delete move's targets, an overlapping one, a non-linearly embedded one): K, NMI,
deletes accepted and seconds per fit, three fit seeds each, one torch thread.

    python -m cluster_service.bench.deletes [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cluster_service.config import FitConfig
from cluster_service.datasets import make_embedded_mixture, make_mixture, make_overlap_mixture
from cluster_service.report.evaluate import score
from cluster_service.train.fit import fit

SETS = {
    "mixture 5k x 8, K 10": lambda: make_mixture(5000, 8, 10, seed=11),
    "mixture 6k x 8, K 15, sizes over a factor 20": lambda: make_mixture(6000, 8, 15, seed=12, imbalance=20.0),
    "overlap mixture 6k x 16, K 20": lambda: make_overlap_mixture(6000, 16, 20, seed=13),
    "embedded mixture 4k, K 10 (8-d -> 32-d)": lambda: make_embedded_mixture(4000, 10, 8, 32, seed=14),
}


def bench_deletes(seeds: tuple[int, ...] = (0, 1, 2)) -> list[dict]:
    rows = []
    for name, make in SETS.items():
        x, y = make()
        for seed in seeds:
            for n_delete in (0, 2):
                t = time.perf_counter()
                res = fit(x, FitConfig(seed=seed).replace(**{"moves.delete_largest": n_delete}))
                s = score(y, res.clusters)
                rows.append({"data": name, "seed": seed, "delete_largest": n_delete, "K": res.n_clusters,
                             "true K": s.k_true, "NMI": round(s.nmi, 4), "epochs": len(res.history),
                             "deletes accepted": sum(r.deletes_accepted for r in res.history),
                             "s": round(time.perf_counter() - t, 1)})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated fit seeds")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for row in bench_deletes(tuple(int(s) for s in args.seeds.split(","))):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
