"""K and NMI against rows per dimension (make bench: rowsperdim): generated mixtures whose
components have `ratio` x d rows each, fitted with the defaults and with the full-covariance NIW
at a fixed kappa (the family and prior that the evidence start chose before prior.covariance and
prior.kappa_mode), beside FAISS k-means given the true K.

    python -m cluster_service.bench.rowsperdim [--ratios 0.5,1,1.5,2,4] [--seeds 0] [--d 48] [--k 60]
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

CONFIGS = {
    "defaults": {},
    "full NIW, fixed kappa": {"prior.covariance": "full", "prior.kappa_mode": "fixed"},
}


def rows_per_dim_rows(ratios: Sequence[float], seeds: Sequence[int], d: int, k: int,
                      bayes: Sequence[float] = (0.97, 0.8)) -> list[dict]:
    """One row per (overlap, ratio, seed, method): K found, NMI, family and kappa chosen, seconds."""
    from cluster_service import index
    from cluster_service.config import FitConfig
    from cluster_service.datasets import make_overlap_mixture
    from cluster_service.report.evaluate import score
    from cluster_service.train.fit import fit

    out = []
    for b in bayes:
        for ratio in ratios:
            for seed in seeds:
                x, y = make_overlap_mixture(int(ratio * d * k), d, k, seed=seed, bayes_target=b, imbalance=2.0,
                                            calib_samples=4000)
                base = {"bayes": b, "ratio": ratio, "seed": seed, "n": x.shape[0]}
                t = time.perf_counter()
                km = index.assign_nearest(x, index.kmeans(x, k, seed))
                out.append({**base, "method": "FAISS k-means, true K", "K": k, "NMI": score(y, km).nmi,
                            "family": "", "kappa": float("nan"), "seconds": time.perf_counter() - t})
                for name, sets in CONFIGS.items():
                    t = time.perf_counter()
                    res = fit(x, FitConfig(seed=seed).replace(**sets))
                    s = score(y, res.clusters)
                    out.append({**base, "method": name, "K": res.n_clusters, "NMI": s.nmi,
                                "family": res.engine.prior.family, "kappa": res.engine.prior.kappa,
                                "seconds": time.perf_counter() - t})
                    log.info("%s", out[-1])
    return out


def table(rows: list[dict], d: int, k: int) -> str:
    """Markdown: one row per (Bayes accuracy, rows per dimension), means over seeds."""
    seeds = ", ".join(map(str, sorted({r["seed"] for r in rows})))
    lines = [f"Overlap mixtures (`datasets.make_overlap_mixture`, {k} components in {d}-d, sizes within 2:1), "
             f"`rows / dim` x {d} rows a component, seeds {seeds} (means). kappa: the one the defaults chose.", "",
             "| Bayes acc | rows / dim | FAISS k-means given K: NMI | defaults: K, NMI, family, kappa "
             "| before: K, NMI |",
             "|---|---|---|---|---|"]

    def of(b: float, ratio: float, method: str) -> list[dict]:
        return [r for r in rows if (r["bayes"], r["ratio"], r["method"]) == (b, ratio, method)]

    for b, ratio in dict.fromkeys((r["bayes"], r["ratio"]) for r in rows):
        km, de, be = (of(b, ratio, m) for m in ("FAISS k-means, true K", *CONFIGS))
        fam = "/".join(sorted({r["family"] for r in de}))
        lines.append(f"| {b} | {ratio:g} | {np.mean([r['NMI'] for r in km]):.3f} | "
                     f"{np.mean([r['K'] for r in de]):.0f}, {np.mean([r['NMI'] for r in de]):.3f}, {fam}, "
                     f"{np.mean([r['kappa'] for r in de]):.3g} | "
                     f"{np.mean([r['K'] for r in be]):.0f}, {np.mean([r['NMI'] for r in be]):.3f} |")
    return "\n".join(lines)


def bench_rows_per_dim(ratios: Sequence[float] = (0.5, 1, 1.5, 2, 4), seeds: Sequence[int] = (0,),
                       d: int = 48, k: int = 60) -> str:
    return table(rows_per_dim_rows(ratios, seeds, d, k), d, k)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.5,1,1.5,2,4")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--d", type=int, default=48)
    ap.add_argument("--k", type=int, default=60)
    ap.add_argument("--bayes", default="0.97,0.8")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    rows = rows_per_dim_rows([float(r) for r in args.ratios.split(",")], [int(s) for s in args.seeds.split(",")],
                             args.d, args.k, [float(b) for b in args.bayes.split(",")])
    print(table(rows, args.d, args.k))


if __name__ == "__main__":
    main()
