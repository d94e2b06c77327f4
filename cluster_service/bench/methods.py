"""Methods benchmark: kl vs ajs losses, with and without the autoencoder (make bench: methods)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from cluster_service.config import FitConfig
from cluster_service.datasets import load_digits_pca, make_embedded_mixture
from cluster_service.report.evaluate import score
from cluster_service.train.autoencoder import fit_autoencoder
from cluster_service.train.fit import fit

# AE settings for CPU benchmarks and tests: the (500, 500, 2000) default is the ImageNet-scale
# architecture; on a few thousand points a smaller AE learns the same latent space in seconds.
SMALL_AE = {
    "autoencoder.hidden": (256, 256, 512),
    "autoencoder.pretrain_epochs": 30,
    "autoencoder.rounds": 2,
    "autoencoder.finetune_epochs": 5,
    "autoencoder.round_epochs": 40,
}


def bench_methods(
    seeds: Sequence[int] = (0, 1, 2),
    n_samples: int = 3000,
    ae_overrides: dict | None = None,
    datasets: Sequence[str] = ("mixture", "digits"),
) -> list[dict]:
    """kl vs ajs, with and without the AE, on the embedded mixture and sklearn digits.

    Returns one row per (dataset, method): K, NMI, ARI, ACC as mean and std over seeds, and
    seconds per fit. `ae_overrides` (dotted config keys) default to SMALL_AE; `datasets` picks
    "mixture" (make_embedded_mixture, 10 clusters, 8-d -> 64-d) and/or "digits" (PCA 16).
    """

    overrides = SMALL_AE if ae_overrides is None else ae_overrides
    loaders = {
        "mixture": (
            f"mixture 10 in 8-d -> 64-d (n={n_samples})", lambda s: make_embedded_mixture(n_samples, seed=s)
        ),
        "digits": ("digits (PCA 16)", lambda s: load_digits_pca(16, seed=s)),
    }
    unknown = sorted(set(datasets) - set(loaders))
    if unknown:
        raise ValueError(f"bench_methods: unknown data set(s) {unknown}; choose from {sorted(loaders)}")
    rows = []
    for name, load in (loaders[d] for d in datasets):
        for ae in (False, True):
            for loss in ("kl", "ajs"):
                runs = []
                for s in seeds:
                    x, y = load(s)
                    cfg = FitConfig().replace(seed=s, **{"net.loss": loss})
                    t0 = time.perf_counter()
                    if ae:
                        res = fit_autoencoder(x, cfg.replace(**{"autoencoder.enabled": True, **overrides}))
                    else:
                        res = fit(x, cfg)
                    sc = score(y, res.clusters)
                    runs.append((sc.k_found, sc.nmi, sc.ari, sc.acc, time.perf_counter() - t0))
                r = np.asarray(runs)
                mean, std = r.mean(0).tolist(), r.std(0).tolist()  # plain floats
                rows.append({
                    "dataset": name, "method": f"{'AE + ' if ae else ''}{loss}", "seeds": len(seeds),
                    "k_mean": mean[0], "k_std": std[0], "nmi_mean": mean[1], "nmi_std": std[1],
                    "ari_mean": mean[2], "ari_std": std[2], "acc_mean": mean[3], "acc_std": std[3],
                    "seconds": mean[4],
                })
    return rows
