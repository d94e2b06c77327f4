"""Run plots: pure functions from arrays / epoch records to matplotlib Figures.

No pyplot and no global backend: figures are `matplotlib.figure.Figure` objects rendered with
the Agg canvas, so importing this module never changes a user's matplotlib session. The
tracking module saves them as PNGs and logs them to MLflow.

    plot_k_history(history)            K over epochs with split / merge / prune markers
    plot_cluster_sizes(clusters)       cluster sizes, largest first
    plot_projection(x, clusters, y)    2-D PCA of a sample, coloured by cluster (and by label)
    plot_confusion(labels, clusters)   labels x clusters, clusters ordered by best match
    plot_merge_tree(linkage, ...)      the model's merge hierarchy as a dendrogram (scipy)
    plot_sweep(trials, metric, params) a Tune sweep: the criterion against each swept parameter
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from scipy.optimize import linear_sum_assignment

SPLIT_COLOR, MERGE_COLOR, PRUNE_COLOR, REJECT_COLOR = "#2ca02c", "#d62728", "#9467bd", "#7f7f7f"


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _records(history: Sequence) -> list[Mapping]:
    return [h if isinstance(h, Mapping) else h.as_dict() for h in history]


def plot_k_history(history: Sequence, scores: Mapping[int, Mapping[str, float]] | None = None) -> Figure:
    """Top: K per epoch (after the epoch's moves) with accepted splits (▲), merges (▼), prunes (×)
    and rejected proposals (small grey marks); frozen epochs shaded. Bottom: total log marginal
    likelihood, and NMI / ACC against labels at the epochs where `scores` has them.

    history: EpochRecords or their dicts; scores: {epoch: {"nmi": ..., "acc": ...}}.
    """
    recs = _records(history)
    fig = new_figure(9, 6.2)
    ax_k, ax_l = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    if not recs:
        ax_k.text(0.5, 0.5, "no epochs", ha="center", va="center", transform=ax_k.transAxes)
        return fig
    ep = np.array([r["epoch"] for r in recs])
    k = np.array([r["n_clusters"] for r in recs])
    for r in recs:
        if r.get("frozen"):
            ax_k.axvspan(r["epoch"] - 0.5, r["epoch"] + 0.5, color="#1f77b4", alpha=0.07, lw=0)
    ax_k.step(ep, k, where="post", color="#1f77b4", lw=2, label="K", zorder=2)

    def marks(key_acc: str, key_prop: str, marker: str, color: str, label: str) -> None:
        rows = [r for r in recs if r.get(key_acc, 0) > 0]
        if rows:
            ax_k.scatter([r["epoch"] for r in rows], [r["n_clusters"] for r in rows], marker=marker, s=90,
                         color=color, edgecolor="black", lw=0.6, zorder=4,
                         label=f"{label} ({sum(r[key_acc] for r in rows)})")
            for r in rows:
                ax_k.annotate(f"{'+' if marker == '^' else '−'}{r[key_acc]}", (r["epoch"], r["n_clusters"]),
                              textcoords="offset points", xytext=(0, 9 if marker == "^" else -15),
                              ha="center", fontsize=8, color=color)
        if key_prop:
            rej = [r for r in recs if r.get(key_prop, 0) > 0 and r.get(key_acc, 0) == 0]
            if rej:
                ax_k.scatter([r["epoch"] for r in rej], [r["n_clusters"] for r in rej], marker=marker, s=30,
                             facecolor="none", edgecolor=REJECT_COLOR, zorder=3,
                             label=f"{label.split()[0][:-1]} proposed, none accepted")

    marks("splits_accepted", "splits_proposed", "^", SPLIT_COLOR, "splits accepted")
    marks("merges_accepted", "merges_proposed", "v", MERGE_COLOR, "merges accepted")
    marks("pruned", "", "X", PRUNE_COLOR, "clusters pruned")
    marks("deletes_accepted", "", "D", PRUNE_COLOR, "clusters deleted")
    ax_k.set_ylabel("number of clusters K")
    ax_k.set_ylim(0, max(k.max() * 1.18, k.max() + 1.5))
    ax_k.yaxis.get_major_locator().set_params(integer=True)
    ax_k.grid(alpha=0.3)
    ax_k.set_title(f"K over epochs: {k[0]} → {k[-1]}  (shaded: parameters frozen after a move)")
    ax_k.legend(loc="upper left", fontsize=8, framealpha=0.9)

    ax_l.plot(ep, [r["log_marginal"] for r in recs], color="#ff7f0e", lw=1.6)
    ax_l.set_ylabel("log marginal\nlikelihood", color="#ff7f0e")
    ax_l.tick_params(axis="y", labelcolor="#ff7f0e")
    ax_l.grid(alpha=0.3)
    ax_l.set_xlabel("epoch")
    if scores:
        ax_s = ax_l.twinx()
        s_ep = sorted(scores)
        for name, color in (("nmi", "#1f77b4"), ("acc", "#2ca02c")):
            vals = [scores[e].get(name) for e in s_ep]
            if any(v is not None for v in vals):
                ax_s.plot(s_ep, vals, "o-", color=color, ms=3, lw=1.2, label=name.upper())
        ax_s.set_ylim(-0.03, 1.03)
        ax_s.set_ylabel("vs labels")
        ax_s.legend(loc="lower right", fontsize=8)
    return fig


def plot_cluster_sizes(clusters: np.ndarray, n_clusters: int | None = None) -> Figure:
    """Sizes of the clusters (from hard assignments (n,)), largest first; empty clusters included
    when n_clusters is given. Bars with counts for up to 40 clusters, a log-scale curve beyond."""
    clusters = np.asarray(clusters)
    k = int(n_clusters if n_clusters is not None else (clusters.max() + 1 if clusters.size else 0))
    counts = np.bincount(clusters, minlength=k) if clusters.size else np.zeros(k, dtype=int)
    order = np.argsort(-counts, kind="stable")
    sizes = counts[order]
    fig = new_figure(9, 4.2)
    ax = fig.subplots()
    n = max(1, int(sizes.sum()))
    p = sizes[sizes > 0] / n
    eff_k = float(np.exp(-(p * np.log(p)).sum())) if p.size else 0.0
    ax.set_title(f"cluster sizes: K={k}, n={sizes.sum()}, effective K (exp entropy) = {eff_k:.1f}")
    if k <= 40:
        pos = np.arange(k)
        bars = ax.bar(pos, sizes, color="#1f77b4")
        ax.set_xticks(pos, [str(c) for c in order], fontsize=8 if k > 20 else 9)
        ax.set_xlabel("cluster id (largest first)")
        for b, s in zip(bars, sizes, strict=True):
            ax.annotate(f"{s}\n{s / n:.0%}" if k <= 15 else str(s), (b.get_x() + b.get_width() / 2, s),
                        textcoords="offset points", xytext=(0, 2), ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, sizes.max() * 1.2 + 1 if k else 1)
    else:
        ax.plot(np.arange(1, k + 1), np.maximum(sizes, 0.8), color="#1f77b4", lw=1.5)
        ax.set_yscale("log")
        ax.set_xlabel("cluster rank (largest first)")
        ax.axhline(n / k, color=REJECT_COLOR, ls="--", lw=1, label=f"uniform n/K = {n / k:.0f}")
        ax.legend(fontsize=8)
    ax.set_ylabel("points")
    ax.grid(alpha=0.3, axis="y")
    return fig


def plot_merge_tree(linkage: np.ndarray, log_ratios: np.ndarray, sizes: np.ndarray | None = None,
                    max_leaves: int = 60) -> Figure:
    """The stored merge hierarchy (scipy linkage rows [a, b, height, size], `core.hierarchy`) as a
    dendrogram: leaves are the fitted clusters ("id (rows)"), heights the running max of -log H_m;
    the dashed line is the first merge the model rejects (log H_m < 0), so everything above it is
    a coarser level than the model supports. Above `max_leaves` clusters only the last merges are
    drawn (scipy's truncate_mode "lastp"). scipy draws it: the tree is already in its format."""
    from scipy.cluster.hierarchy import dendrogram

    linkage = np.asarray(linkage, dtype=np.float64)
    k = linkage.shape[0] + 1
    fig = new_figure(max(7.0, min(16.0, 0.28 * min(k, max_leaves) + 3)), 4.6)
    ax = fig.subplots()
    labels = [f"{c} ({int(sizes[c])})" if sizes is not None else str(c) for c in range(k)]
    truncate = {"truncate_mode": "lastp", "p": max_leaves} if k > max_leaves else {}
    dendrogram(linkage, ax=ax, labels=labels, leaf_rotation=90, leaf_font_size=7 if k > 30 else 8,
               color_threshold=0, above_threshold_color="#1f77b4", **truncate)
    rejected = np.flatnonzero(np.asarray(log_ratios) < 0)
    if rejected.size:
        h = linkage[rejected[0], 2]
        ax.axhline(h, color=REJECT_COLOR, ls="--", lw=1,
                   label=f"first rejected merge (log H_m {log_ratios[rejected[0]]:.0f}): K {k - rejected[0]}")
        ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"merge tree of the {k} clusters (bordering pairs, highest log H_m first)")
    ax.set_yscale("symlog", linthresh=1.0)  # heights span 1e0-1e6 nats: the first merges stay visible
    ax.set_ylabel("height: running max of -log H_m (symlog)")
    ax.set_xlabel("cluster id (rows)" + (f"; last {max_leaves} merges shown" if truncate else ""))
    return fig


def _cluster_colors(n: int) -> ListedColormap:
    """Distinct colours for up to 20 ids, then a cyclic rainbow."""
    from matplotlib import colormaps

    if n <= 10:
        return ListedColormap(colormaps["tab10"].colors[:max(n, 1)])
    if n <= 20:
        return ListedColormap(colormaps["tab20"].colors[:n])
    return ListedColormap(colormaps["hsv"](np.linspace(0, 1, n, endpoint=False)))


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-2 principal axes of x (n, d): returns (mean (d,), axes (2, d), explained-variance (2,))."""
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = s**2 / max(1, x.shape[0] - 1)
    ratio = var[:2] / max(var.sum(), 1e-300)
    axes = vt[:2] if vt.shape[0] >= 2 else np.vstack([vt, np.zeros_like(vt)])
    return mean, axes, np.pad(ratio, (0, 2 - ratio.size))


def plot_projection(
    x: np.ndarray,
    clusters: np.ndarray,
    labels: np.ndarray | None = None,
    means: np.ndarray | None = None,
    max_points: int = 5000,
    seed: int = 0,
) -> Figure:
    """2-D PCA projection of a random sample of x (n, d) coloured by cluster (n,), with the
    cluster means (K, d) marked by their ids; a second panel coloured by labels when given."""
    x = np.asarray(x, dtype=np.float64)
    clusters = np.asarray(clusters)
    rng = np.random.default_rng(seed)
    idx = rng.choice(x.shape[0], size=min(max_points, x.shape[0]), replace=False)
    xs = x[idx]
    mean, axes, ratio = pca_2d(xs)
    z = (xs - mean) @ axes.T
    cl_ids, cl_inv = np.unique(clusters[idx], return_inverse=True)
    panels = [("cluster", cl_inv, len(cl_ids))]
    if labels is not None:
        # A cluster takes the colour of the label it is matched to, so the panels compare at a glance.
        lab_ids, lab_inv = np.unique(np.asarray(labels)[idx], return_inverse=True)
        counts = np.zeros((len(lab_ids), len(cl_ids)), dtype=np.int64)
        np.add.at(counts, (lab_inv, cl_inv), 1)
        rows, cols = linear_sum_assignment(-counts)
        colour_of = np.full(len(cl_ids), -1)
        colour_of[cols] = rows
        spare = np.flatnonzero(colour_of < 0)
        colour_of[spare] = len(lab_ids) + np.arange(spare.size)
        panels = [("cluster", colour_of[cl_inv], len(cl_ids)), ("label", lab_inv, len(lab_ids))]
    n_colours = max(int(p[1].max()) + 1 for p in panels)
    cmap = _cluster_colors(n_colours)
    fig = new_figure(6.2 * len(panels), 5.6)
    axs = np.atleast_1d(fig.subplots(1, len(panels), sharex=True, sharey=True))
    size = 6 if z.shape[0] > 2000 else 12
    for ax, (name, c, n_distinct) in zip(axs, panels, strict=True):
        ax.scatter(z[:, 0], z[:, 1], c=c, cmap=cmap, vmin=-0.5, vmax=n_colours - 0.5,
                   s=size, alpha=0.65, lw=0, rasterized=True)
        ax.set_title(f"coloured by {name} ({n_distinct} distinct)")
        ax.set_xlabel(f"PC1 ({ratio[0]:.0%} of variance)")
        ax.grid(alpha=0.25)
        if name == "cluster" and means is not None and len(means) <= 60:
            zm = (np.asarray(means, dtype=np.float64) - mean) @ axes.T
            ax.scatter(zm[:, 0], zm[:, 1], marker="o", s=120, facecolor="white", edgecolor="black", lw=1.2,
                       zorder=5)
            for j, (u, v) in enumerate(zm):
                ax.annotate(str(j), (u, v), ha="center", va="center", fontsize=7, fontweight="bold", zorder=6)
    axs[0].set_ylabel(f"PC2 ({ratio[1]:.0%} of variance)")
    fig.suptitle(f"PCA projection of {z.shape[0]} of {x.shape[0]} points"
                 + (" (white circles: cluster means)" if means is not None and len(means) <= 60 else "")
                 + ("; clusters take their matched label's colour" if labels is not None else ""))
    return fig


def matched_order(counts: np.ndarray) -> tuple[np.ndarray, int]:
    """Column order for a (labels, clusters) count matrix: the Hungarian-matched clusters first,
    in the order of their labels, then the unmatched clusters by size. Also returns the number of
    points on the matched pairs (accuracy * n)."""
    rows, cols = linear_sum_assignment(-counts)
    matched = cols[np.argsort(rows)]
    rest = np.setdiff1d(np.arange(counts.shape[1]), matched)
    rest = rest[np.argsort(-counts[:, rest].sum(0), kind="stable")]
    return np.concatenate([matched, rest]).astype(int), int(counts[rows, cols].sum())


def plot_confusion(labels: np.ndarray, clusters: np.ndarray) -> Figure:
    """Row-normalised labels x clusters matrix (colour = fraction of the label's points), counts
    written in the cells when small enough to read; clusters ordered so matches lie on the diagonal."""
    labels = np.asarray(labels)
    clusters = np.asarray(clusters)
    lab_ids, li = np.unique(labels, return_inverse=True)
    cl_ids, ci = np.unique(clusters, return_inverse=True)
    counts = np.zeros((len(lab_ids), len(cl_ids)), dtype=np.int64)
    np.add.at(counts, (li, ci), 1)
    order, n_matched = matched_order(counts)
    counts = counts[:, order]
    frac = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    n_l, n_c = counts.shape
    fig = new_figure(min(12, max(6, 0.45 * n_c + 3)), min(10, max(4.5, 0.4 * n_l + 2)))
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="fraction of the label's points", shrink=0.9)
    if n_l <= 30 and n_c <= 30:
        for i in range(n_l):
            for j in range(n_c):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7 if n_c > 15 else 8,
                            color="white" if frac[i, j] > 0.5 else "black")
    if n_c <= 40:
        ax.set_xticks(range(n_c), [str(c) for c in cl_ids[order]], fontsize=8)
        ax.set_xlabel("cluster id (matched clusters first, in their labels' order)")
    else:
        ax.set_xlabel("cluster, by position (matched clusters first, in their labels' order)")
    if n_l <= 40:
        ax.set_yticks(range(n_l), [str(c) for c in lab_ids], fontsize=8)
    acc = n_matched / max(1, counts.sum())
    ax.set_ylabel("true label")
    ax.set_title(f"labels vs clusters: {n_l} labels, {n_c} clusters, matched accuracy {acc:.3f}")
    return fig


def plot_sweep(trials: Sequence[Mapping], metric: str, params: Sequence[str]) -> Figure:
    """One small panel per swept parameter (and K found): the trials' `metric` against its value,
    the best trial starred; points coloured by NMI when the trials have it."""
    keys = ["n_clusters", *params]
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig = new_figure(3.3 * cols, 2.9 * rows + 0.4)
    axs = np.atleast_1d(fig.subplots(rows, cols, sharey=True)).ravel()
    y = np.array([t[metric] for t in trials], dtype=float)
    best = int(np.argmax(y))
    nmi = [t.get("nmi") for t in trials]
    colour = np.array(nmi, dtype=float) if all(v is not None for v in nmi) else None
    sc = None
    for ax, key in zip(axs, keys, strict=False):
        x = np.array([t[key] for t in trials], dtype=float)
        style = {"c": "#1f77b4"} if colour is None else {"c": colour, "cmap": "viridis", "vmin": 0, "vmax": 1}
        sc = ax.scatter(x, y, s=40, edgecolor="black", lw=0.4, **style)
        ax.scatter(x[best], y[best], marker="*", s=260, facecolor="none", edgecolor="#d62728", lw=1.5)
        finite = x[np.isfinite(x)]
        if key != "n_clusters" and finite.size and finite.min() > 0 and finite.max() > 20 * finite.min():
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("K found" if key == "n_clusters" else key, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axs[len(keys):]:
        ax.set_visible(False)
    for ax in axs[::cols]:
        ax.set_ylabel(metric, fontsize=9)
    if colour is not None and sc is not None:
        fig.colorbar(sc, ax=list(axs[: len(keys)]), label="NMI (labels; not used to choose)", shrink=0.8)
    fig.suptitle(f"{len(trials)} trials; best (★) has the highest {metric}")
    return fig
