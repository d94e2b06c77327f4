"""Would heavier-tailed clusters absorb the small broad clusters of a fit? (issue 16, MNIST UMAP)

For every pair of bordering clusters (some row of one has the other as its runner-up) whose rows
both exceed d + 1, compare by BIC
  separate: the larger part as one multivariate t (nu fitted) + the smaller as a Gaussian
  merged:   both parts as one multivariate t (nu fitted)
with the fitted model's hard assignment. dBIC > 0 favours the merge: the small cluster is then
just the heavy tail of the large one. Multivariate t by EM (Liu and Rubin 1995: weights
u = (nu + d) / (nu + delta), nu by its one-dimensional fixed-point equation).

    python -m cluster_service.bench.tails RUN_DIR DATA.npz   (X: the fit's rows)
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq
from scipy.special import digamma, gammaln


def gaussian_loglik(x: np.ndarray) -> float:
    """Maximised Gaussian log-likelihood of rows x (n, d)."""
    mu = x.mean(0)
    cov = np.cov(x.T, bias=True) + 1e-9 * np.eye(x.shape[1])
    chol = np.linalg.cholesky(cov)
    z = np.linalg.solve(chol, (x - mu).T)
    return float((-0.5 * (z**2).sum(0) - np.log(np.diag(chol)).sum() - 0.5 * x.shape[1] * math.log(2 * math.pi)).sum())


def fit_t(x: np.ndarray, iters: int = 100, nu: float = 10.0) -> tuple[float, np.ndarray, np.ndarray, float]:
    """Multivariate t by EM -> (log-likelihood, mean (d,), scale matrix (d, d), nu)."""
    n, d = x.shape
    mu, scale = x.mean(0), np.cov(x.T, bias=True) + 1e-9 * np.eye(d)
    for _ in range(iters + 1):
        chol = np.linalg.cholesky(scale)
        delta = (np.linalg.solve(chol, (x - mu).T) ** 2).sum(0)
        if _ == iters:
            break
        u = (nu + d) / (nu + delta)
        mu = (u[:, None] * x).sum(0) / u.sum()
        diff = x - mu
        scale = (u[:, None] * diff).T @ diff / n + 1e-9 * np.eye(d)
        c = 1 + np.mean(np.log(u) - u) + digamma((nu + d) / 2) - math.log((nu + d) / 2)

        def score(v, c=c):
            return -digamma(v / 2) + math.log(v / 2) + c

        nu = brentq(score, 0.05, 1e4) if score(0.05) * score(1e4) < 0 else (1e4 if score(1e4) > 0 else 0.05)
    ll = (gammaln((nu + d) / 2) - gammaln(nu / 2) - d / 2 * math.log(nu * math.pi) - np.log(np.diag(chol)).sum()
          - (nu + d) / 2 * np.log1p(delta / nu))
    return float(ll.sum()), mu, scale, float(nu)


def tail_merge_bic(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """dBIC (merged t minus separate t + Gaussian; > 0 favours the merge) and the merged t's nu."""
    big, small = (a, b) if len(a) >= len(b) else (b, a)
    n, d = len(a) + len(b), a.shape[1]
    separate = (fit_t(big)[0] + gaussian_loglik(small)
                + len(big) * math.log(len(big) / n) + len(small) * math.log(len(small) / n))
    merged, _, _, nu = fit_t(np.vstack([a, b]))
    extra = d + d * (d + 1) / 2 + 1  # the Gaussian's mean and covariance, and the mixing weight
    return merged - separate + 0.5 * extra * math.log(n), nu


def bordering_pairs(model, x: np.ndarray) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, where some row of x (n, d) has one as its MAP cluster and the other as
    its runner-up (what Engine.cluster_tree counts as bordering)."""
    import torch

    xs = torch.as_tensor(x, dtype=torch.float64)
    ll = torch.stack([model_logpdf(model, xs, k) for k in range(model.n_clusters)], 1)
    top = ll.topk(2, 1).indices.numpy()
    return sorted({(int(min(a, b)), int(max(a, b))) for a, b in top})


def model_logpdf(model, xs, k: int):
    """log pi_k + log N(x; mu_k, Sigma_k) of the rows xs (n, d) float64 tensor -> (n,)."""
    import torch

    chol = torch.as_tensor(model.chol[k])
    z = torch.linalg.solve_triangular(chol, (xs - torch.as_tensor(model.means[k])).T, upper=False)
    return (float(model.log_weights[k]) - 0.5 * z.square().sum(0) - torch.log(torch.diagonal(chol)).sum())


def main(argv: list[str] | None = None) -> None:
    import argparse

    from cluster_service.serve.model import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("data", help=".npz with X (the rows the run was fitted on) and optionally y")
    args = ap.parse_args(argv)
    model = load_model(f"{args.run_dir}/model")
    z = np.load(args.data)
    x = z["X"].astype(np.float64)
    clusters, _ = model.predict(x)
    y = z["y"] if "y" in z.files else None
    print("pair  rows  majority label  dBIC (> 0: merge)  nu of the merged t")
    for i, j in bordering_pairs(model, x):
        a, b = x[clusters == i], x[clusters == j]
        if min(len(a), len(b)) <= x.shape[1] + 1:
            continue
        dbic, nu = tail_merge_bic(a, b)
        maj = "" if y is None else f"{np.bincount(y[clusters == i]).argmax()} {np.bincount(y[clusters == j]).argmax()}"
        print(f"{i}-{j}  {len(a)} {len(b)}  {maj}  {dbic:.0f}  {nu:.1f}")


if __name__ == "__main__":
    main()
