"""The run report: one self-contained HTML file (inline images and CSS, no network, no server).

    build_report(run_dir)   RUN_DIR/report.html from the run directory (cluster_service.io.runs):
                            summary, K over epochs, cluster sizes, then one panel per cluster:
                            size, share, mean log-density, nearest clusters and their overlap
                            (Bhattacharyya coefficient), its label composition (majority label
                            and purity) when the data has labels, and, when the data's shards
                            carry image paths, a gallery: the most typical members (highest log-density), the
                            least certain (lowest margin) and a few at random.

Thumbnails are made in a process pool and cached under RUN_DIR/thumbs/ (a rebuild reuses them);
images that cannot be read are listed in the report, never fatal. Matplotlib figures are rendered
with the Agg canvas (report.plots), Pillow makes the thumbnails.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from cluster_service import index
from cluster_service.io.atomic import atomic_path
from cluster_service.io.features import data_column

REPORT = "report.html"
THUMB_PX = 96


def build_report(run_dir: str | os.PathLike, images_root: str | os.PathLike | None = None,
                 per_cluster: int = 12, max_clusters: int = 200, out: str | os.PathLike | None = None,
                 montage_dir: str | os.PathLike | None = None) -> Path:
    """Write RUN_DIR/report.html (or `out`); returns its path. `images_root` resolves relative image
    paths of the shards (default: as written by extraction, absolute). With `montage_dir` (and image
    paths in the shards) also one PNG per cluster there, the same strips as its gallery panel."""
    from cluster_service.io import runs
    from cluster_service.io.atomic import write_text_atomic
    from cluster_service.report import plots
    from cluster_service.serve.model import load_model

    run_dir = Path(run_dir)
    summary, history = runs.read_summary(run_dir), runs.read_history(run_dir)
    model = load_model(runs.model_dir(run_dir))
    table = runs.read_assignments(run_dir)
    ids = table.column("id").to_numpy(zero_copy_only=False)
    clusters = table.column("cluster").to_numpy().astype(np.int64)
    log_prob = table.column("log_prob").to_numpy().astype(np.float64)
    margin = table.column("margin").to_numpy().astype(np.float64)
    k = model.n_clusters
    sizes = np.bincount(clusters, minlength=k)
    order = np.argsort(-sizes, kind="stable")[:max_clusters]
    by_row = np.argsort(clusters, kind="stable")  # rows grouped by cluster once
    bounds = np.searchsorted(clusters[by_row], np.arange(k + 1))
    members = {c: by_row[bounds[c] : bounds[c + 1]] for c in order}
    paths = data_column(summary.get("data"), ids, "path")
    labels = data_column(summary.get("data"), ids, "label")
    thumbs, missing = {}, []
    if paths is not None:
        picks = {c: gallery_rows(members[c], log_prob, margin, c, per_cluster) for c in order}
        wanted = sorted({int(i) for rows in picks.values() for group in rows.values() for i in group})
        files = {i: _resolve(paths[i], images_root) for i in wanted}
        thumbs, missing = make_thumbnails(list(files.values()), run_dir / "thumbs")
        thumbs = {i: thumbs.get(f) for i, f in files.items()}
    figures = {
        "K over epochs": plots.plot_k_history(history),
        "cluster sizes": plots.plot_cluster_sizes(clusters, k),
    }
    if model.tree_linkage is not None and len(model.tree_linkage):
        figures["merge tree"] = plots.plot_merge_tree(model.tree_linkage, model.tree_log_ratios, sizes)
    neighbours = nearest_clusters(model.means, model.covariances, 3)
    panels = [_panel(c, sizes, log_prob[members[c]], neighbours.get(c, []),
                     picks[c] if paths is not None else None, thumbs,
                     None if labels is None else label_composition(labels[members[c]])) for c in order]
    if montage_dir is not None and paths is not None:
        for c in order:
            write_montage(Path(montage_dir) / f"cluster_{int(c):05d}.png", int(c), sizes, picks[c], thumbs)
    page = _page(run_dir, summary, figures, panels, order, sizes, missing)
    out = Path(out) if out else run_dir / REPORT
    write_text_atomic(page, out)
    return out


# ---- data ---------------------------------------------------------------------------------------


def label_composition(labels: np.ndarray, top: int = 3) -> tuple[int, list[tuple[int, int]]]:
    """One cluster's rows' labels (n,) int64 (-1: unknown) -> (rows with a known label, [(label,
    rows)] of the `top` most frequent, most frequent first): the first is the majority label, its
    share of the known rows the cluster's purity."""
    values, counts = np.unique(labels[labels >= 0], return_counts=True)
    order = np.argsort(-counts, kind="stable")[:top]
    return int(counts.sum()), [(int(values[i]), int(counts[i])) for i in order]


def _resolve(path: str, root: str | os.PathLike | None) -> str:
    """A shard's image path, relative ones under `root` (extraction writes absolute ones)."""
    return str(Path(root) / path) if path and root and not Path(path).is_absolute() else path


def gallery_rows(members: np.ndarray, log_prob, margin, c: int, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Row indices (from `members`, cluster c's rows in ascending order): the most typical (highest
    log-density), the least certain (lowest margin) and a random few; n in all (half typical, a
    quarter each of the others)."""
    n_typ, n_low = max(1, n // 2), max(1, n // 4)
    typical = members[np.argsort(-log_prob[members], kind="stable")[:n_typ]]
    margin_low = members[np.argsort(margin[members], kind="stable")[:n_low]]
    rest = np.setdiff1d(members, np.concatenate([typical, margin_low]))
    rng = np.random.default_rng(seed + c)
    random = rng.choice(rest, size=min(n - n_typ - n_low, rest.size), replace=False) if rest.size else rest
    return {"typical": typical, "least certain": margin_low, "random": np.sort(random)}


def nearest_clusters(means: np.ndarray, covariances: np.ndarray, m: int) -> dict[int, list[tuple[int, float]]]:
    """For every cluster its m nearest clusters by mean distance, with the Bhattacharyya coefficient
    of the two Gaussians (1: identical, 0: disjoint)."""
    k = means.shape[0]
    if k < 2:
        return {}
    nn = index.nearest_clusters(means, min(m, k - 1)).numpy()  # the merge candidates' FAISS search
    out = {}
    for a in range(k):
        out[a] = [(int(b), bhattacharyya(means[a], covariances[a], means[b], covariances[b]))
                  for b in nn[a] if b >= 0 and b != a]
    return out


def bhattacharyya(m1, s1, m2, s2) -> float:
    """exp(-D_B) of N(m1, s1) and N(m2, s2): D_B = 1/8 d^T S^-1 d + 1/2 ln(det S / sqrt(det s1 det s2)),
    S = (s1 + s2) / 2."""
    s = (s1 + s2) / 2
    diff = m1 - m2
    _, logdet = np.linalg.slogdet(s)
    _, l1 = np.linalg.slogdet(s1)
    _, l2 = np.linalg.slogdet(s2)
    db = diff @ np.linalg.solve(s, diff) / 8 + 0.5 * (logdet - 0.5 * (l1 + l2))
    return float(np.exp(-db))


# ---- thumbnails -----------------------------------------------------------------------------------


def _thumb(args: tuple[str, str]) -> tuple[str, str | None]:
    """(image path, cached JPEG path or None when the image cannot be read)."""
    from PIL import Image

    src, cache = args
    if not Path(cache).is_file():
        try:
            with Image.open(src) as im, atomic_path(cache) as tmp:
                im = im.convert("RGB")
                im.thumbnail((THUMB_PX, THUMB_PX))
                im.save(tmp, "JPEG", quality=80)
        except (OSError, ValueError):
            return src, None
    return src, cache


def make_thumbnails(paths: list[str], cache_dir: Path, workers: int | None = None) -> tuple[dict, list[str]]:
    """{path: cached thumbnail} for every readable image, and the list of unreadable ones."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(p, str(cache_dir / (hashlib.sha1(p.encode()).hexdigest()[:16] + ".jpg"))) for p in paths if p]
    todo = [j for j in jobs if not Path(j[1]).is_file()]
    done = {src: cache for src, cache in jobs if Path(cache).is_file()}
    if len(todo) > 64:
        with ProcessPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            results = list(pool.map(_thumb, todo, chunksize=32))
    else:
        results = [_thumb(j) for j in todo]
    done.update({src: cache for src, cache in results if cache})
    missing = sorted(src for src, cache in results if cache is None) + [p for p in paths if not p]
    return done, missing


def write_montage(path: Path, c: int, sizes: np.ndarray, picks: dict[str, np.ndarray], thumbs: dict) -> Path:
    """One PNG for cluster c: a caption (id, size, share) and a strip per group of `picks` (typical,
    least certain, random), each thumbnail in a THUMB_PX square cell; unreadable images leave a
    grey cell. Written atomically; returns the path."""
    from PIL import Image, ImageDraw

    label_w, caption_h, pad = 110, 24, 2
    cols = max([len(rows) for rows in picks.values()] + [1])
    cell = THUMB_PX + pad
    sheet = Image.new("RGB", (label_w + cols * cell, caption_h + len(picks) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    share = sizes[c] / max(int(sizes.sum()), 1)
    draw.text((4, 5), f"cluster {c}: {int(sizes[c])} rows ({share:.1%})", fill="black")
    for r, (name, rows) in enumerate(picks.items()):
        top = caption_h + r * cell
        draw.text((4, top + THUMB_PX // 2 - 6), name, fill="black")
        for j, i in enumerate(rows):
            left = label_w + j * cell
            thumb = thumbs.get(int(i))
            if thumb is None:
                draw.rectangle((left, top, left + THUMB_PX - 1, top + THUMB_PX - 1), fill=(200, 200, 200))
                continue
            with Image.open(thumb) as im:
                im = im.convert("RGB")
                sheet.paste(im, (left + (THUMB_PX - im.width) // 2, top + (THUMB_PX - im.height) // 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        sheet.save(tmp, "PNG")
    return path


# ---- HTML -----------------------------------------------------------------------------------------


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _jpeg(path: str | None) -> str | None:
    return None if path is None else "data:image/jpeg;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _panel(c, sizes, dens, neighbours, picks, thumbs, composition=None) -> str:
    share = sizes[c] / max(sizes.sum(), 1)
    near = ", ".join(f'<a href="#c{b}">{b}</a> ({o:.2f})' for b, o in neighbours) or "none"
    stats = (f"<p>size {int(sizes[c])} ({share:.1%}), mean log-density "
             f"{(dens.mean() if dens.size else float('nan')):.2f}; nearest clusters (overlap): {near}</p>")
    if composition is not None:
        n_known, top = composition
        shares = ", ".join(f"{label}: {rows / n_known:.1%}" for label, rows in top)
        stats += (f'<p class="labels">majority label {top[0][0]}, purity {top[0][1] / n_known:.1%} ({shares} of '
                  f'{n_known} labelled rows)</p>' if n_known else '<p class="labels">labels: none known</p>')
    gallery = ""
    if picks is not None:
        for name, rows in picks.items():
            imgs = "".join(f'<img src="{_jpeg(thumbs.get(int(i)))}" alt="row {int(i)}">'
                           for i in rows if thumbs.get(int(i)))
            gallery += f'<div class="strip"><span>{name}</span>{imgs}</div>'
    return f'<section class="cluster" id="c{c}"><h3>cluster {c}</h3>{stats}{gallery}</section>'


def _readable(value):
    """A summary value as a person reads it: floats to 3 decimals (summary.json keeps them whole)."""
    return round(value, 3) if isinstance(value, float) else value


def _page(run_dir, summary, figures, panels, order, sizes, missing) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(_readable(v)))}</td></tr>"
                   for k, v in summary.items())
    figs = "".join(f'<figure><img src="{_png(f)}" alt="{html.escape(n)}"><figcaption>{html.escape(n)}'
                   "</figcaption></figure>" for n, f in figures.items())
    toc = " ".join(f'<a href="#c{c}">{c}</a>&nbsp;({int(sizes[c])})' for c in order)
    miss = (f"<p class='missing'>{len(missing)} image(s) could not be read: "
            f"{html.escape(', '.join(missing[:20]))}</p>") if missing else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cluster_service run {html.escape(run_dir.name)}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td {{ border: 1px solid #ccc; padding: 2px 8px; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; }} figure img {{ max-width: 640px; }}
.cluster {{ border-top: 1px solid #ddd; padding: .5em 0; }}
.strip {{ margin: .2em 0; }} .strip span {{ display: inline-block; width: 8em; color: #666; }}
.strip img {{ width: {THUMB_PX}px; height: {THUMB_PX}px; object-fit: cover; margin-right: 2px; }}
.missing {{ color: #a00; }}
</style></head><body>
<h1>Run {html.escape(run_dir.name)}: K = {html.escape(str(summary.get("k_found")))}</h1>
<h2>Summary</h2><table>{rows}</table>
<h2>Training</h2>{figs}
<h2>Clusters</h2><p>{toc}</p>{miss}
{"".join(panels)}
</body></html>
"""
