"""`make bench`: speed and quality beside peers measured in the same run -> BENCHMARKS.md.

Sections (each a function returning markdown):
  quality   this fit vs sklearn BayesianGaussianMixture (DP, full covariance, 2x true K
            components) vs FAISS k-means given the true K, on generated mixtures and digits
  assign    rows/s of exact vs shortlist assignment (cluster_service.bench.assign.bench_assign)
  epochs    epoch time with 1 and 2 CPU workers, all_reduce share (cluster_service.runtime.trainer)
  methods   kl vs ajs, with and without the autoencoder (cluster_service.train.autoencoder)
  speed     time to K with the defaults vs sklearn BGM, median of 3 (cluster_service.bench.speed)
  scale     (opt-in: --sections scale) one epoch at 1.28M x 128, K 1000 and a full fit at 1M x 32,
            K 100 on this CPU, with peak RSS
  krecovery K found on real embeddings and hard mixtures vs BGM / GMM / k-means (bench.krecovery),
            3 seeds, mean (min-max)
  krecovery_large  (opt-in: --sections krecovery_large) the same for the 200k x 64, K 200 mixture:
            about an hour on 2 cores
  rowsperdim  K and NMI against rows per dimension (0.5 .. 4) on generated overlap mixtures, the
            defaults beside the full NIW at a fixed kappa and FAISS k-means given K (bench.rowsperdim)
  truncation  dense vs truncated E-step fits, same seed (bench.truncation), and the dense fit of the
            data moved by one float rounding step (the floor); truncation_large (opt-in) the same on
            the 200-component mixture, without the floor
  workers   one process vs 2 Ray Train workers: K and the agreement of their assignments, beside
            the one-process fit at another thread count (the floor)
  imagenet_proxy  (opt-in) the whole job (shards, fit in one process and with --workers 2, assign of
            a held-back tenth) on datasets.make_imagenet_proxy, vs FAISS k-means given the true K
  pipeline  the smoke ImageNet pipeline's stage times (cluster_service.bench.pipeline)
  gpu       (--gpu) one epoch at N=1.28M, d=128, K=1000 vs the flop-count limit
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

from cluster_service.config import FitConfig
from cluster_service.datasets import load_digits_pca, make_mixture
from cluster_service.io.atomic import write_text_atomic
from cluster_service.report.evaluate import score
from cluster_service.train.fit import fit


def _device_line() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    import os

    return (
        f"Date {time.strftime('%Y-%m-%d')}; CPU {cpu} ({os.cpu_count()} cores); GPU {gpu}; "
        f"torch {torch.__version__}; Python {platform.python_version()}"
    )


def _row(name: str, seconds: float, labels: np.ndarray, clusters: np.ndarray) -> dict:
    s = score(labels, clusters)
    return {"method": name, "seconds": seconds, **s.as_dict()}


def quality_rows(x: np.ndarray, y: np.ndarray, seed: int = 0, bgm_iter: int = 200) -> list[dict]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import BayesianGaussianMixture

    from cluster_service import index

    k_true = int(np.unique(y).size)
    rows = []
    t = time.perf_counter()
    res = fit(x, FitConfig(seed=seed))
    rows.append(_row("cluster_service (DeepDPM, K_init=1)", time.perf_counter() - t, y, res.clusters))
    t = time.perf_counter()
    res_e = fit(x, FitConfig(seed=seed, responsibilities="estep"))
    rows.append(_row("cluster_service (E-step responsibilities)", time.perf_counter() - t, y, res_e.clusters))
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        bgm = BayesianGaussianMixture(
            n_components=2 * k_true,
            covariance_type="full",
            weight_concentration_prior_type="dirichlet_process",
            max_iter=bgm_iter,
            random_state=seed,
        ).fit(x)
    pred = bgm.predict(x)
    rows.append(_row(f"sklearn BGM (DP, full, {2 * k_true} comps)", time.perf_counter() - t, y, pred))
    t = time.perf_counter()
    centroids = index.kmeans(x, k_true, seed=seed, n_iter=50)
    rows.append(
        _row(f"faiss k-means (true K={k_true})", time.perf_counter() - t, y, index.assign_nearest(x, centroids))
    )
    return rows


def quality_section() -> str:
    data = [
        ("mixture N=20k d=16 K=12 (imbalance 4)", *make_mixture(20000, 16, 12, seed=0)),
        ("mixture N=60k d=32 K=37 (imbalance 4)", *make_mixture(60000, 32, 37, seed=1)),
        ("sklearn digits PCA-16 (K=10)", *load_digits_pca(16)),
    ]
    lines = ["## Quality and speed vs peers (CPU)", ""]
    for name, x, y in data:
        rows = quality_rows(x, y)
        base = rows[2]["seconds"]
        lines += [
            f"### {name}",
            "",
            "| method | K found | NMI | ARI | ACC | wall s | time / BGM |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['method']} | {r['k_found']} (true {r['k_true']}) | {r['nmi']:.3f} | {r['ari']:.3f} | "
                f"{r['acc']:.3f} | {r['seconds']:.1f} | {r['seconds'] / base:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def optional_section(title: str, module: str, func: str, **kwargs) -> str:
    """Sections provided by other modules; a missing module is reported, not fatal."""
    try:
        mod = __import__(module, fromlist=[func])
        result = getattr(mod, func)(**kwargs)
    except Exception:  # noqa: BLE001 - a benchmark section failing must not lose the others
        return f"## {title}\n\nnot measured: {traceback.format_exc(limit=1).strip().splitlines()[-1]}\n"
    if isinstance(result, str):
        return f"## {title}\n\n{result}\n"
    if isinstance(result, dict):
        result = [result]
    keys = list(result[0].keys()) if result else []
    lines = [f"## {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in result:
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(lines) + "\n"


# section key -> (title, module, function) of each table it writes, in the file's order
SECTIONS: list[tuple[str, list[tuple[str, str, str]]]] = [
    ("speed", [("Time to K: defaults vs sklearn BGM (CPU, median of 3)", "cluster_service.bench.speed",
                "bench_speed")]),
    ("scale", [("Scale on this CPU (each row its own process)", "cluster_service.bench.speed", "bench_scale")]),
    ("quality", []),  # quality_section, in this module
    ("assign", [("Assignment throughput (d=128, K=1000)", "cluster_service.bench.assign", "bench_assign")]),
    ("epochs", [("Distributed epoch time (CPU workers)", "cluster_service.bench.distributed",
                 "bench_epoch_distributed")]),
    ("workers_scaling", [("Workers: per-worker memory, bytes and epoch time (Ray Train CPU workers, small proxy)",
                          "cluster_service.bench.distributed", "bench_workers_scaling")]),
    ("scaling_table", [("Workers and rows: per-worker memory, bytes and epoch time beside the cost model",
                        "cluster_service.bench.distributed", "bench_scaling_table")]),
    ("methods", [("Methods: kl vs ajs, with/without autoencoder", "cluster_service.bench.methods", "bench_methods")]),
    ("scaling", [("Epoch time vs N, K, d (CPU), with fitted exponents", "cluster_service.bench.perf", "bench_scaling"),
                 ("Top ops of one epoch (torch.profiler, N=20k d=32 K=32, CPU)", "cluster_service.bench.perf",
                  "profile_epoch_md")]),
    ("krecovery", [("K recovery: defaults vs peers given the true K", "cluster_service.bench.krecovery",
                    "bench_k_recovery")]),
    ("krecovery_large", [("K recovery: the 200-component mixture (one seed)", "cluster_service.bench.krecovery",
                          "bench_k_recovery_large")]),
    ("rowsperdim", [("Rows per dimension: K and NMI of the defaults and of the full NIW at a fixed kappa",
                     "cluster_service.bench.rowsperdim", "bench_rows_per_dim")]),
    ("truncation", [("Truncated vs dense E-step: the same fit? (same seed)", "cluster_service.bench.truncation",
                     "bench_truncation")]),
    ("truncation_large", [("Truncated vs dense E-step: the 200-component mixture", "cluster_service.bench.truncation",
                           "bench_truncation_large")]),
    ("workers", [("One process vs 2 Ray Train workers (defaults, same seed)", "cluster_service.bench.truncation",
                  "bench_workers")]),
    ("imagenet_proxy", [("The whole job on the ImageNet-scale proxy (1.28M x 128, 1,000 components)",
                         "cluster_service.bench.imagenet_proxy", "bench_imagenet_proxy")]),
    ("pipeline", [("Smoke ImageNet pipeline: stage times (CPU, 2 workers)", "cluster_service.bench.pipeline",
                   "bench_pipeline")]),
    ("features", [("Feature extraction and shard reading", "feature_extraction.bench", "bench_features")]),
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    ap.add_argument("--sections", default="speed,quality,krecovery,rowsperdim,truncation,workers,scaling,assign,"
                    "epochs,methods,"
                    "pipeline,features",
                    help="comma-separated")
    ap.add_argument("--gpu", action="store_true", help="run the GPU sections (needs CUDA)")
    ap.add_argument("--append", action="store_true", help="append the sections to the existing file")
    args = ap.parse_args(argv)
    # progress of the long sections (krecovery logs each fit's epochs) goes to stderr
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    sections = args.sections.split(",")
    parts = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` ({'with' if args.gpu else 'without'} --gpu). {_device_line()}",
        "",
    ]
    if args.gpu:
        parts.append(optional_section("GPU epoch at ImageNet scale", "cluster_service.bench.perf", "bench_gpu_epoch"))
    for key, entries in SECTIONS:
        if key not in sections:
            continue
        if key == "quality":
            parts.append(quality_section())
        for title, module, func in entries:
            parts.append(optional_section(title, module, func))
    text = "\n".join(parts) + "\n"
    if args.append and args.out.exists():
        text = args.out.read_text() + "\n" + "\n".join(parts[2:]) + "\n"
    write_text_atomic(text, args.out)
    print(text)


if __name__ == "__main__":
    main()
