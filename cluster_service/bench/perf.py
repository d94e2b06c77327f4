"""Epoch cost: where the time goes, how it scales in N, K and d, and the GPU epoch at ImageNet scale.

    python -m cluster_service.bench.perf --scaling      # CPU/GPU scaling table with fitted exponents
    python -m cluster_service.bench.perf --profile      # top ops of one epoch (torch.profiler)
    python -m cluster_service.bench.perf --gpu          # N=1.28M, d=128, K=1000 vs the flop-count limit

One "epoch" here is exactly what training runs: net training pass (E-step targets per batch),
statistics (responsibilities, cluster and subcluster scatters), all-reduce, M-step.
The flop-count model (DESIGN §5): log-densities 2 N K d^2 + statistics 2 N K d^2.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from cluster_service.config import FitConfig
from cluster_service.core.schedule import EpochPlan
from cluster_service.train.engine import Engine


def synthetic_engine(n: int, d: int, k: int, device: str, seed: int = 0) -> Engine:
    """An engine initialised with K clusters (k-means) on a K-component mixture (no training)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=g) * 4
    z = torch.randint(0, k, (n,), generator=g)
    x = means[z] + torch.randn(n, d, generator=g)
    cfg = FitConfig(init="kmeans", k_init=k, seed=seed, device=device).replace(**{"moves.prune_below": 0.0})
    eng = Engine(cfg, x)
    eng.initialize()
    return eng


def time_epoch(eng: Engine, repeats: int = 2) -> dict:
    """Median wall time of one planned epoch without moves, and its parts."""
    plan = EpochPlan(epoch=eng.cfg.schedule.warmup_epochs + 1, m_step=True, train_subnets=True, move=None)
    recs = []
    for _ in range(repeats):
        if eng.device.type == "cuda":
            torch.cuda.synchronize()
        recs.append(eng.run_epoch(plan))
        if eng.device.type == "cuda":
            torch.cuda.synchronize()
    best = sorted(recs, key=lambda r: r.time_total)[len(recs) // 2]
    return {
        "epoch_s": best.time_total,
        "train_s": best.time_train,
        "stats_s": best.time_stats,
        "mstep_s": best.time_mstep,
        "estep_s": best.time_estep,
        "log-densities": best.log_densities,
        "K": best.n_clusters,
    }


def flops(n: int, d: int, k: int) -> float:
    return 4.0 * n * k * d * d


def bench_scaling(device: str = "cpu", base=(20000, 32, 32)) -> list[dict]:
    """Epoch time vs N, K and d around `base`, each with a fitted exponent (log-log slope)."""
    n0, d0, k0 = base
    grid = {
        "N": [(n, d0, k0) for n in (n0 // 2, n0, n0 * 2, n0 * 4)],
        "K": [(n0, d0, k) for k in (k0 // 2, k0, k0 * 2, k0 * 4)],
        "d": [(n0, d, k0) for d in (d0 // 2, d0, d0 * 2, d0 * 4)],
    }
    rows = []
    for axis, points in grid.items():
        xs, ts = [], []
        for n, d, k in points:
            t = time_epoch(synthetic_engine(n, d, k, device))
            xs.append({"N": n, "K": k, "d": d}[axis])
            ts.append(t["epoch_s"])
            rows.append(
                {
                    "vary": axis,
                    "N": n,
                    "d": d,
                    "K": k,
                    **{key: round(v, 4) for key, v in t.items() if key != "K"},
                    "GFLOP/s (model)": round(flops(n, d, k) / t["epoch_s"] / 1e9, 2),
                }
            )
        slope = float(np.polyfit(np.log(xs), np.log(ts), 1)[0])
        for r in rows[-len(points) :]:
            r["exponent"] = round(slope, 2)
    return rows


def profile_epoch(n: int = 20000, d: int = 32, k: int = 32, device: str = "cpu", top: int = 12) -> str:
    """torch.profiler table of the top ops (self time) of one epoch."""
    from torch.profiler import ProfilerActivity, profile

    eng = synthetic_engine(n, d, k, device)
    time_epoch(eng, repeats=1)  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        time_epoch(eng, repeats=1)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top)


def profile_epoch_md() -> str:
    return "```\n" + profile_epoch() + "\n```"


def bench_gpu_epoch(n: int = 1_280_000, d: int = 128, k: int = 1000) -> dict | str:
    """One epoch at ImageNet scale on one GPU, its ratio to the flop-count limit, and peak memory."""
    if not torch.cuda.is_available():
        return "no CUDA device on this machine; run `make bench-gpu` on a GPU machine"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.cuda.reset_peak_memory_stats()
    eng = synthetic_engine(n, d, k, "cuda")
    t = time_epoch(eng, repeats=3)
    name = torch.cuda.get_device_name(0)
    peak_tflops = 400.0 if "H100" in name or "H200" in name else 100.0  # dense TF32 (no sparsity)
    limit = flops(n, d, k) / (peak_tflops * 1e12)
    return {
        "device": name,
        "N": n,
        "d": d,
        "K": k,
        **{key: round(v, 3) for key, v in t.items() if key != "K"},
        "flop-limit s": round(limit, 4),
        "epoch / limit": round(t["epoch_s"] / limit, 1),
        "peak GPU GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "500 epochs (min)": round(500 * t["epoch_s"] / 60, 1),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scaling", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.scaling:
        for r in bench_scaling(args.device):
            print(r)
    if args.profile:
        print(profile_epoch(device=args.device))
    if args.gpu:
        print(bench_gpu_epoch())
    if not (args.scaling or args.profile or args.gpu):
        ap.print_help()


if __name__ == "__main__":
    main()
