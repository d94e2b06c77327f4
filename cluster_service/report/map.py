"""The 2-D map of a run: cluster means (sized by their rows, coloured by a level of the merge tree)
and a sample of rows, laid out together by UMAP (umap-learn) or, where it is not installed or
there are too few points, by PCA. Drawn as inline SVG: each mean links to its cluster's panel.
"""

from __future__ import annotations

import html

import numpy as np

# Rows drawn beside the means: enough to see each cluster's spread, few enough to lay out in seconds.
MAP_ROWS = 2000
# Colours of the tree level's groups (matplotlib's tab10), and the level: at most this many groups.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
WIDTH, HEIGHT, PAD = 900, 600, 30


def layout_method(method: str | None = None) -> str:
    """The layout asked for: `method`, else $CLUSTER_SERVICE_MAP_LAYOUT, else config.MAP_LAYOUT."""
    import os

    from cluster_service.config import MAP_LAYOUT, MAP_LAYOUT_ENV

    method = method or os.environ.get(MAP_LAYOUT_ENV) or MAP_LAYOUT
    if method not in ("auto", "umap", "pca"):
        raise ValueError(f"map layout must be auto, umap or pca, got {method!r}")
    return method


def layout_2d(points: np.ndarray, seed: int = 0, method: str | None = None) -> tuple[np.ndarray, str]:
    """(m, d) -> ((m, 2) coordinates, "UMAP" or "PCA"); method as `layout_method`."""
    method = layout_method(method)
    points = np.asarray(points, dtype=np.float64)
    m = points.shape[0]
    if m < 3:
        return np.column_stack([np.arange(m, dtype=float), np.zeros(m)]), "PCA"
    umap = None
    if method != "pca":
        try:
            import umap
        except ImportError:
            if method == "umap":
                raise ValueError("map layout umap: umap-learn is not installed (pip install umap-learn)") from None
    if umap is not None and m >= 20:
        import warnings

        with warnings.catch_warnings():  # umap warns that a seed disables its parallel threads
            warnings.simplefilter("ignore")
            reducer = umap.UMAP(n_neighbors=min(15, m - 1), min_dist=0.1, random_state=seed, n_jobs=1)
            return reducer.fit_transform(points), "UMAP"
    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=seed).fit_transform(points), "PCA"


def map_points(means: np.ndarray, x: np.ndarray | None, clusters: np.ndarray, n_rows: int = MAP_ROWS,
               seed: int = 0, method: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Lay out means (K, d) with a seeded sample of rows x (n, d) (None or another d: means only).
    -> (mean xy (K, 2), row xy (r, 2), row cluster (r,), the layout used); x and clusters (n,) share
    their row order."""
    k = means.shape[0]
    rows = np.zeros(0, np.int64)
    if x is not None and x.shape[1] == means.shape[1]:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(x.shape[0], size=min(n_rows, x.shape[0]), replace=False))
    pts = np.concatenate([means, x[rows]]) if rows.size else means
    xy, used = layout_2d(pts, seed, method)
    return xy[:k], xy[k:], clusters[rows], used


def map_svg(mean_xy: np.ndarray, row_xy: np.ndarray, row_cluster: np.ndarray, sizes: np.ndarray,
            group: np.ndarray, linked: set[int], level_name: str = "") -> str:
    """Inline SVG: rows as faint dots, means as circles (area proportional to rows) coloured by their
    group (K,), each linked to #c<k> when k is in `linked` (the clusters with a panel)."""
    allxy = np.concatenate([mean_xy, row_xy]) if row_xy.size else mean_xy
    lo, hi = allxy.min(0), allxy.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)

    def place(xy):
        u = (xy - lo) / span
        return PAD + u[:, 0] * (WIDTH - 2 * PAD), HEIGHT - PAD - u[:, 1] * (HEIGHT - 2 * PAD)

    colour = [PALETTE[int(g) % len(PALETTE)] for g in group]
    parts = []
    if row_xy.size:
        px, py = place(row_xy)
        parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="1.6" fill="{colour[c]}" fill-opacity="0.35"/>'
                  for a, b, c in zip(px, py, row_cluster, strict=True)]
    mx, my = place(mean_xy)
    largest = float(np.clip(120 / np.sqrt(max(len(sizes), 1)), 4, 20))  # K 36 and fewer: 20 px; K 1,000: 4
    radius = 2 + largest * np.sqrt(sizes / max(int(sizes.max()), 1))
    for k in np.argsort(-sizes, kind="stable"):  # large first, so small clusters stay clickable on top
        circle = (f'<circle class="mean" cx="{mx[k]:.1f}" cy="{my[k]:.1f}" r="{radius[k]:.1f}" fill="{colour[k]}" '
                  f'fill-opacity="0.8" stroke="#222" stroke-width="0.8"><title>cluster {k}: {int(sizes[k])} rows, '
                  f'group {int(group[k])}</title></circle>')
        parts.append(f'<a href="#c{k}">{circle}</a>' if int(k) in linked else circle)
    n_groups = int(group.max()) + 1 if group.size else 0
    legend = "".join(f'<span class="key" style="background:{PALETTE[g % len(PALETTE)]}"></span>group {g} '
                     for g in range(min(n_groups, len(PALETTE))))
    return (f'<svg class="map" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
            f'role="img" aria-label="map of the clusters">'
            f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#fafafa"/>{"".join(parts)}</svg>'
            f'<p class="legend">colour: {html.escape(level_name)} {legend}</p>')
