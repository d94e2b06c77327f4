"""Would heavier-tailed clusters absorb the small broad clusters of a fit? (issue 16, MNIST UMAP)

For every pair of bordering clusters (some row of one has the other as its runner-up) whose rows
both exceed d + 1, compare by BIC
  separate: the larger part as one multivariate t (nu fitted) + the smaller as a Gaussian
  merged:   both parts as one multivariate t (nu fitted)
with the fitted model's hard assignment. dBIC > 0 favours the merge: the small cluster is then
just the heavy tail of the large one. Multivariate t by EM (Liu and Rubin 1995: weights
u = (nu + d) / (nu + delta), nu by its one-dimensional fixed-point equation). Also the modes of
the fitted mixture (modal EM from every mean): do the small clusters make modes of their own?

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


def mixture_modes(means: np.ndarray, chol: np.ndarray, log_weights: np.ndarray, iters: int = 500,
                  tol: float = 1e-9) -> np.ndarray:
    """Modal EM (Li, Ray and Lindsay 2007) from every component mean of a Gaussian mixture:
    x <- (sum_k p_k(x) P_k)^-1 sum_k p_k(x) P_k mu_k, p_k(x) the posterior, P_k = Sigma_k^-1,
    a hill climb of the mixture density. means (K, d), chol (K, d, d) Cholesky factors of the
    covariances, log_weights (K,) -> labels (K,): components whose climbs end at the same mode
    (within 1e-3 of the smallest component scale) share a label."""
    import torch

    from cluster_service.core.gaussian import WhitenedGaussians
    from cluster_service.core.niw import GaussianParams

    mu, L = torch.as_tensor(means, dtype=torch.float64), torch.as_tensor(chol, dtype=torch.float64)
    lw = torch.as_tensor(log_weights, dtype=torch.float64)
    gauss = WhitenedGaussians(GaussianParams(lw, mu, L), torch.float64)
    prec = torch.cholesky_inverse(L)  # (K, d, d)
    prec_mu = (prec @ mu[:, :, None])[..., 0]
    x = mu.clone()
    for _ in range(iters):
        post = torch.softmax(gauss.log_joint(x), 1)  # (S, K)
        new = torch.linalg.solve(torch.einsum("sk,kij->sij", post, prec), post @ prec_mu)
        step = float((new - x).norm(dim=1).max())
        x = new
        if step < tol:
            break
    scale = float(torch.diagonal(L, dim1=-2, dim2=-1).min())
    dist = torch.cdist(x, x)
    labels = np.full(len(x), -1)
    for i in range(len(x)):
        if labels[i] < 0:
            labels[(dist[i] < 1e-3 * scale).numpy() & (labels < 0)] = labels.max() + 1
    return labels


def bordering_pairs(model, x: np.ndarray) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, where some row of x (n, d) has one as its MAP cluster and the other as
    its runner-up (what export.cluster_tree counts as bordering)."""
    top = np.argpartition(-model.log_joint(x), 1, axis=1)[:, :2]  # the two best, either order
    return sorted({(int(min(a, b)), int(max(a, b))) for a, b in np.unique(top, axis=0)})


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
    modes = mixture_modes(model.means, model.chol, model.log_weights)
    print(f"{model.n_clusters} clusters, {modes.max() + 1} modes of the fitted mixture (modal EM from every mean)")
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
