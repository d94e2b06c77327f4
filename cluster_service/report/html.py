"""The run report: one self-contained HTML file (inline images and CSS, no network, no server).

    build_report(run_dir)   RUN_DIR/report.html from the run directory (cluster_service.io.runs):
                            summary, K over epochs, cluster sizes, then one panel per cluster:
                            size, share, mean log-density, nearest clusters and their overlap
                            (Bhattacharyya coefficient), its label composition (majority label
                            and purity) when the data has labels, and, when the data's shards
                            carry image paths, a gallery: the most typical members (highest log-density), the
                            least certain (lowest margin) and a few at random. Near the top, a 2-D
                            map of the clusters (report.map); after the training figures, a section
                            each for the curation commands' outputs (duplicates.parquet,
                            outliers.parquet, sample.parquet; export), with galleries when the
                            data has image paths.

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
                 montage_dir: str | os.PathLike | None = None, map_layout: str | None = None) -> Path:
    """Write RUN_DIR/report.html (or `out`); returns its path. `images_root` resolves relative image
    paths of the shards (default: as written by extraction, absolute). With `montage_dir` (and image
    paths in the shards) also one PNG per cluster there, the same strips as its gallery panel.
    map_layout: the map's layout (report.map.layout_method). The sections of `duplicates`, `outliers`
    and `sample` appear when their Parquet files are in the run directory."""
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
    curated = curated_rows(run_dir, ids)
    if paths is not None:
        picks = {c: gallery_rows(members[c], log_prob, margin, c, per_cluster) for c in order}
        wanted = sorted({int(i) for rows in picks.values() for group in rows.values() for i in group}
                        | {int(i) for rows in curated["thumb_rows"] for i in rows})
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
    the_map = map_section(model, summary.get("data"), ids, clusters, sizes, {int(c) for c in order}, map_layout)
    sections = curation_sections(run_dir, curated, ids, clusters, sizes, paths, thumbs, summary.get("data"))
    page = _page(run_dir, summary, figures, panels, order, sizes, missing, the_map, sections)
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


# ---- the map and the curation commands' sections ---------------------------------------------------

SHOW_GROUPS = 6  # duplicate groups drawn (largest first)
SHOW_MEMBERS = 8  # members drawn per duplicate group
SHOW_OUTLIERS = 24  # outliers in the table and gallery


def _rows_of(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Positions in `ids` (n,) of each of `wanted` (m,) (all present)."""
    order = np.argsort(ids, kind="stable")
    return order[np.clip(np.searchsorted(ids[order], wanted), 0, max(ids.size - 1, 0))]


def curated_rows(run_dir: Path, ids: np.ndarray) -> dict:
    """The curation outputs of the run (io.runs.read_curated) and the rows their galleries show:
    {"duplicates": table | None, "groups": [rows of a shown group], "group_ids": [its group],
    "outliers": table | None, "outliers_top": the overall top rows, "outlier_rows": their rows,
    "sample": table | None, "thumb_rows": every row to make a thumbnail of}."""
    from cluster_service.io import runs

    found = {"duplicates": runs.read_curated(run_dir, runs.DUPLICATES),
             "outliers": runs.read_curated(run_dir, runs.OUTLIERS),
             "sample": runs.read_curated(run_dir, runs.SAMPLE), "groups": [], "group_ids": [],
             "outlier_rows": np.zeros(0, np.int64)}
    dup = found["duplicates"]
    if dup is not None and dup.num_rows:
        group = dup.column("group").to_numpy()
        dup_rows = _rows_of(ids, dup.column("id").to_numpy(zero_copy_only=False))
        sizes = np.bincount(group)
        for g in np.argsort(-sizes, kind="stable")[:SHOW_GROUPS]:
            found["groups"].append(dup_rows[group == g][:SHOW_MEMBERS])  # representative first
            found["group_ids"].append(int(g))
    out = found["outliers"]
    if out is not None and out.num_rows:
        overall = out.filter(out.column("rank_overall").is_valid())
        found["outliers_top"] = (overall if overall.num_rows else out).slice(0, SHOW_OUTLIERS)
        found["outlier_rows"] = _rows_of(ids, found["outliers_top"].column("id").to_numpy(zero_copy_only=False))
    found["thumb_rows"] = [*found["groups"], found["outlier_rows"]]
    return found


def map_section(model, data, ids, clusters, sizes, linked: set[int], layout: str | None) -> str:
    """The 2-D map (report.map): the means and a sample of the data's rows, coloured by the merge tree's
    level of at most 10 groups."""
    from cluster_service.io.features import load_features
    from cluster_service.report import map as cmap

    x, row_clusters = None, clusters
    if data and Path(data).exists():
        feats = load_features(data)
        x = feats.x
        row_clusters = clusters[_rows_of(ids, feats.ids)] if feats.ids.shape != ids.shape or (
            feats.ids != ids).any() else clusters
    k = model.n_clusters
    if model.tree_linkage is not None and len(model.tree_linkage) == k - 1:
        level = min(k, len(cmap.PALETTE))
        group, level_name = model.cut(level), f"the merge tree cut at {level} groups"
    else:
        group, level_name = np.arange(k) % len(cmap.PALETTE), "cluster (no merge tree)"
    mean_xy, row_xy, row_c, method = cmap.map_points(model.means, x, row_clusters, method=layout)
    svg = cmap.map_svg(mean_xy, row_xy, row_c, sizes, group, linked, level_name)
    rows = f"and {row_xy.shape[0]} of the rows" if row_xy.size else "(the data is not there: means only)"
    return (f'<h2 id="map">Map</h2><p class="note">cluster means (area: rows) {rows}, laid out by {method}; '
            f"click a cluster for its panel</p>{svg}")


def _thumb_strip(name: str, rows, thumbs) -> str:
    imgs = "".join(f'<img src="{_jpeg(thumbs.get(int(i)))}" alt="row {int(i)}">' for i in rows if thumbs.get(int(i)))
    return f'<div class="strip"><span>{html.escape(name)}</span>{imgs}</div>' if imgs else ""


def curation_sections(run_dir, curated, ids, clusters, sizes, paths, thumbs, data) -> list[str]:
    """The sections of duplicates.parquet, outliers.parquet, sample.parquet and export (each says which
    command writes it when it is missing, and why galleries are skipped when the data has no paths)."""
    no_paths = (f'<p class="note">gallery skipped: the data ({html.escape(str(data))}) carries no image '
                "paths</p>") if paths is None else ""
    name = html.escape(str(run_dir))
    out = []
    dup = curated["duplicates"]
    body = f'<p class="note">not run: <code>cluster-service duplicates {name}</code></p>'
    if dup is not None:
        group = dup.column("group").to_numpy()
        n_groups = int(group.max()) + 1 if group.size else 0
        sim = dup.column("similarity").to_numpy()
        body = (f"<p>{n_groups} group(s) holding {dup.num_rows} of {ids.size} rows; {dup.num_rows - n_groups} "
                f"could go (all but each group's representative); lowest similarity to a representative "
                f"{(sim.min() if sim.size else float('nan')):.3f}</p>")
        if curated["groups"]:
            body += "<table><tr><td>group</td><td>rows</td><td>representative</td><td>cluster</td></tr>"
            counts = np.bincount(group)
            for g, rows in zip(curated["group_ids"], curated["groups"], strict=True):
                body += (f"<tr><td>{g}</td><td>{int(counts[g])}</td><td>{html.escape(str(ids[rows[0]]))}</td>"
                         f'<td><a href="#c{int(clusters[rows[0]])}">{int(clusters[rows[0]])}</a></td></tr>')
            body += "</table>"
            body += no_paths or "".join(_thumb_strip(f"group {g}", rows, thumbs)
                                        for g, rows in zip(curated["group_ids"], curated["groups"], strict=True))
    out.append(f'<section id="duplicates"><h2>Near-duplicates</h2>{body}</section>')
    table = curated["outliers"]
    body = f'<p class="note">not run: <code>cluster-service outliers {name}</code></p>'
    if table is not None:
        top = curated.get("outliers_top")
        body = (f"<p>{table.num_rows} rows: the most unusual per cluster and overall, by calibrated score "
                "(1 - the row's tail probability among its cluster's training rows)</p>")
        if top is not None:
            body += "<table><tr><td>rank</td><td>id</td><td>cluster</td><td>score</td></tr>" + "".join(
                f'<tr><td>{r + 1}</td><td>{html.escape(str(i))}</td><td><a href="#c{c}">{c}</a></td>'
                f"<td>{sc:.3f}</td></tr>" for r, (i, c, sc) in enumerate(zip(
                    top.column("id").to_pylist(), top.column("cluster").to_pylist(), top.column("score").to_pylist(),
                    strict=True)) if r < 12) + "</table>"
            body += no_paths or _thumb_strip("most unusual", curated["outlier_rows"], thumbs)
    out.append(f'<section id="outliers"><h2>Outliers</h2>{body}</section>')
    table = curated["sample"]
    body = f'<p class="note">not run: <code>cluster-service sample {name} --n M</code></p>'
    if table is not None:
        got = np.bincount(table.column("cluster").to_numpy(), minlength=sizes.size)
        used = got[got > 0]
        body = (f"<p>{table.num_rows} rows from {used.size} of {sizes.size} clusters, {used.min() if used.size else 0}"
                f"-{used.max() if used.size else 0} per cluster (the data's clusters hold {int(sizes.min())}-"
                f"{int(sizes.max())})" + (", balanced over the tree's groups first" if "group" in table.column_names
                                          else "") + "</p>")
    out.append(f'<section id="sample"><h2>Balanced sample</h2>{body}</section>')
    body = (f"<p>export a cluster or a tree level's groups for labelling tools: <code>cluster-service export {name} "
            "--cluster K --out DIR</code> (a folder of symlinks) or <code>--out FILE.csv</code></p>")
    if paths is None:
        body = f'<p class="note">export unavailable: the data ({html.escape(str(data))}) carries no image paths</p>'
    out.append(f'<section id="export"><h2>Export</h2>{body}</section>')
    return out


def _readable(value):
    """A summary value as a person reads it: floats to 3 decimals, small ones as 1.0e-04
    (kappa 1e-4 is not 0)."""
    if not isinstance(value, float):
        return value
    return f"{value:.1e}" if value != 0 and abs(value) < 0.01 else round(value, 3)


def _page(run_dir, summary, figures, panels, order, sizes, missing, the_map="", sections=()) -> str:
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
.missing {{ color: #a00; }} .note {{ color: #666; }}
.map {{ border: 1px solid #ddd; max-width: 100%; height: auto; }} .map a circle:hover {{ stroke-width: 3; }}
.key {{ display: inline-block; width: 10px; height: 10px; margin: 0 3px 0 8px; }}
</style></head><body>
<h1>Run {html.escape(run_dir.name)}: K = {html.escape(str(summary.get("k_found")))}</h1>
<h2>Summary</h2><table>{rows}</table>
{the_map}
<h2>Training</h2>{figs}
{"".join(sections)}
<h2>Clusters</h2><p>{toc}</p>{miss}
{"".join(panels)}
</body></html>
"""
