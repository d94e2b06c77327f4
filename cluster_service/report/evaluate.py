"""Clustering metrics against ground truth. Never imported by training code."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def cluster_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Unsupervised accuracy: best one-to-one matching of clusters to labels (Hungarian)."""
    labels = np.asarray(labels)
    clusters = np.asarray(clusters)
    _, li = np.unique(labels, return_inverse=True)
    _, ci = np.unique(clusters, return_inverse=True)
    counts = np.zeros((ci.max() + 1, li.max() + 1), dtype=np.int64)
    np.add.at(counts, (ci, li), 1)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / labels.size)


@dataclass(frozen=True)
class Scores:
    """Label scores of one assignment. nmi/ari/acc are over the labelled rows only (None when no
    row is labelled); k_found counts the clusters of every row, k_true the known classes."""

    nmi: float | None
    ari: float | None
    acc: float | None
    k_found: int
    k_true: int
    n_labelled: int  # rows with a known label: the rows the three scores are over

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.4f}"

        return (f"K found {self.k_found} (true {self.k_true})  NMI {fmt(self.nmi)}  ARI {fmt(self.ari)}  "
                f"ACC {fmt(self.acc)}  ({self.n_labelled} labelled rows)")


def known_labels(labels: np.ndarray) -> np.ndarray:
    """Which rows of labels (n,) have a known label: (n,) bool. Unknown is negative (the readers
    write a null label as -1) or NaN."""
    labels = np.asarray(labels)
    return labels >= 0  # NaN >= 0 is False


def score(labels: np.ndarray, clusters: np.ndarray) -> Scores:
    """NMI / ARI / ACC of clusters (n,) against labels (n,) over the rows with a known label
    (`known_labels`): a row whose label is unknown is no evidence either way, so it is left out
    rather than counted as a class of its own. The one scoring function of the service."""
    labels = np.asarray(labels)
    clusters = np.asarray(clusters)
    if labels.shape != clusters.shape:
        raise ValueError(f"labels {labels.shape} and clusters {clusters.shape} differ in length")
    known = known_labels(labels)
    y, z = labels[known].astype(np.int64), clusters[known]
    scored = bool(known.any())
    return Scores(
        nmi=float(normalized_mutual_info_score(y, z)) if scored else None,
        ari=float(adjusted_rand_score(y, z)) if scored else None,
        acc=cluster_accuracy(y, z) if scored else None,
        k_found=int(np.unique(clusters).size),
        k_true=int(np.unique(y).size),
        n_labelled=int(known.sum()),
    )


def model_choice(n_samples: int, n_features: int, k_found: int, prior: dict) -> dict:
    """The summary's account of the model the evidence chose: covariance family, kappa, rows per
    dimension of the clusters found, and, when the fit returned one cluster, why and what would help."""
    family = str(prior.get("family", "full"))
    rows = n_samples / max(1, k_found) / max(1, n_features)
    out = {"covariance": family, "kappa": float(f"{float(prior['kappa']):.3g}"), "rows_per_dim": round(rows, 2)}
    if k_found == 1:
        out["note"] = (
            f"one cluster: the evidence preferred a single {family}-covariance Gaussian to every partition tried "
            f"({n_samples} rows in {n_features} dimensions; a cluster of sqrt(n) rows would have "
            f"{n_samples ** 0.5 / n_features:.2g} rows per dimension). If you expect structure: fewer dimensions "
            "(`extract --pca-dim D`), more rows"
            + (", or a simpler family (`--set prior.covariance=diag`)" if family == "full" else
               f" ({family} is already the simplest family offered)")
            + ". Clusters that overlap heavily can leave one Gaussian the most probable model in every family.")
    return out


def run_summary(n_samples: int, n_features: int, k_found: int, seconds: float, history: list, out,
                scores: Scores | None = None, **extra) -> dict:
    """The one summary.json of a run (one-process fit, Ray Train fit, update): sizes, K, wall seconds,
    epochs run and why the fit stopped (from `history`, EpochRecords or dicts), the run directory,
    `extra` fields, then the label `scores` of the run's clusters when the data has labels (their
    k_found counts the clusters that hold rows; scores are null when no row is labelled)."""
    from cluster_service.io.runs import stop_summary

    summary = {"n_samples": int(n_samples), "n_features": int(n_features), "k_found": int(k_found),
               "seconds": round(seconds, 2), **stop_summary(history), "out": str(out), **extra}
    if scores is not None:  # scores to 4 decimals: what a person compares (the third moves between seeds)
        summary.update({k: round(v, 4) if isinstance(v, float) else v for k, v in scores.as_dict().items()})
    return summary
