"""What people do with a fitted run, as a user runs it: one small fit whose output goes to a file
(progress lines), then `duplicates`, `outliers`, `sample`, `export` and the report with its map,
on data with planted near-duplicates and outliers and real image files behind its paths."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cli_helpers
import numpy as np
import pyarrow.parquet as pq
import pytest

from cluster_service.curate.duplicates import group_pairs, unit_rows
from cluster_service.curate.sample import balanced_counts

CLI = [sys.executable, "-m", "cluster_service.ops.cli"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EPOCHS = 12
FAST_FIT = ["--set", f"schedule.epochs={EPOCHS}", "--set", "schedule.warmup_epochs=2", "--set",
            "schedule.subcluster_start=2", "--set", "schedule.first_split=4", "--set", "schedule.move_period=4",
            "--set", "schedule.freeze_epochs=1", "--set", "schedule.final_epochs=3",
            "--set", "net.min_steps_per_epoch=2", "--no-tracking"]
D = 64
SIZES = (240, 160, 120, 80)  # four clusters, unequal, so balanced shares differ from proportional ones
N_EXACT, N_NOISY, N_MISS, N_FAR = 8, 8, 8, 3


def copy_at(z: np.ndarray, cos: float, rng) -> np.ndarray:
    """A vector at cosine `cos` to z (d,), with z's length."""
    u = z / np.linalg.norm(z)
    v = rng.normal(size=z.size)
    v -= (v @ u) * u
    v /= np.linalg.norm(v)
    return np.linalg.norm(z) * (cos * u + np.sqrt(1 - cos**2) * v)


def planted_data(root: Path):
    """Rows of four clusters in 64-d (two rows of one cluster sit at cosine ~.5 after centring, so no
    pair is near-duplicate by chance), then exact copies, copies at cosine .985, near misses at .88
    (all of rows of cluster 0..3, in centred coordinates) and three rows far from every cluster."""
    rng = np.random.default_rng(0)
    means = rng.normal(size=(4, D))
    means *= 8 / np.linalg.norm(means, axis=1, keepdims=True)
    base = np.concatenate([m + rng.normal(size=(n, D)) for m, n in zip(means, SIZES, strict=True)])
    y = np.repeat(np.arange(4), SIZES)
    centre = base.mean(0)
    src = rng.choice(base.shape[0], N_EXACT + N_NOISY + N_MISS, replace=False)
    exact = base[src[:N_EXACT]]
    noisy = np.array([centre + copy_at(base[i] - centre, 0.985, rng) for i in src[N_EXACT:N_EXACT + N_NOISY]])
    miss = np.array([centre + copy_at(base[i] - centre, 0.88, rng) for i in src[N_EXACT + N_NOISY:]])
    far = means[:N_FAR] + 9 * rng.normal(size=(N_FAR, D)) / np.sqrt(D) * 3
    x = np.concatenate([base, exact, noisy, miss, far]).astype(np.float32)
    labels = np.concatenate([y, y[src], np.arange(N_FAR)])
    n = base.shape[0]
    planted = {"pairs": {(int(s), n + j) for j, s in enumerate(src[:N_EXACT + N_NOISY])},
               "misses": {(int(s), n + N_EXACT + N_NOISY + j) for j, s in enumerate(src[N_EXACT + N_NOISY:])},
               "far": set(range(x.shape[0] - N_FAR, x.shape[0]))}
    return x, labels, planted


def run_inprocess(capsys, monkeypatch, *args) -> subprocess.CompletedProcess:
    """cli_helpers.run_inprocess with stderr on one line (rich wraps long messages)."""
    r = cli_helpers.run_inprocess(capsys, monkeypatch, *args)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout, " ".join(r.stderr.split()))


@pytest.fixture
def cli(capsys, monkeypatch):
    """cli("duplicates", RUN, ...) -> CompletedProcess (returncode, stdout, stderr on one line)."""
    return lambda *args: run_inprocess(capsys, monkeypatch, *args)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A shard directory with image paths (tiny PNGs), its fit with stdout and stderr sent to a file,
    and the planted rows."""
    from PIL import Image

    from cluster_service.io.shards import write_shards

    root = tmp_path_factory.mktemp("curate")
    x, labels, planted = planted_data(root)
    images = root / "images"
    images.mkdir()
    paths = []
    for i in range(x.shape[0]):
        p = images / f"img_{i:05d}.png"
        Image.new("RGB", (8, 8), (i % 256, (7 * i) % 256, 90)).save(p)
        paths.append(str(p))
    write_shards(root / "shards", np.arange(x.shape[0]), x, labels, paths=np.array(paths), rows_per_shard=300)
    log = root / "fit.log"
    with open(log, "w") as f:  # as under nohup: neither stream is a terminal
        r = subprocess.run([*CLI, "fit", str(root / "shards"), "--out", str(root / "run"), *FAST_FIT],
                           stdout=f, stderr=subprocess.STDOUT, timeout=600)
    assert r.returncode == 0, log.read_text()[-3000:]
    return {"root": root, "run": root / "run", "x": x, "planted": planted, "log": log.read_text(), "paths": paths}


def test_fit_sent_to_a_file_prints_a_progress_line_every_epoch(fitted):
    history = json.loads((fitted["run"] / "history.json").read_text())
    lines = re.findall(r"^fit: epoch (\d+)/(\d+) K=(\d+) loss=\S+ elapsed \S+ ETA .+$", fitted["log"], re.M)
    assert [int(e) for e, _, _ in lines] == list(range(1, len(history) + 1)), fitted["log"][-2000:]
    assert [int(k) for _, _, k in lines] == [h["n_clusters"] for h in history]
    assert "\x1b[" not in fitted["log"]  # no terminal control codes in a log
    assert not re.search(r"seconds\s*│?\s*\d+\.\d{3,}", fitted["log"])  # the summary's seconds are readable


def test_duplicates_finds_exactly_the_planted_copies_and_not_the_near_misses(fitted, cli):
    run_dir = fitted["run"]
    r = cli("duplicates", run_dir, "--no-report")
    assert r.returncode == 0, r.stderr
    t = pq.read_table(run_dir / "duplicates.parquet").to_pandas()
    assert list(t.columns) == ["id", "group", "representative", "similarity", "cluster", "path"]
    found = {tuple(sorted(g.id)) for _, g in t.groupby("group")}
    assert found == {tuple(sorted(p)) for p in fitted["planted"]["pairs"]}  # every copy, and nothing else
    z = unit_rows(fitted["x"])
    for _, row in t.iterrows():  # every member within the threshold of its representative, as stored
        sim = float(z[row.id] @ z[row.representative])
        assert sim >= 0.95 - 1e-5 and abs(sim - row.similarity) < 1e-4
        assert row.path == fitted["paths"][row.id]


def test_grouping_does_not_chain():
    # a ~ b (.96), b ~ c (.96), a !~ c; and b has the most pairs, so it represents a and c
    a, b, s = np.array([0, 1, 3]), np.array([1, 2, 4]), np.array([0.96, 0.96, 0.99], np.float32)
    dup = group_pairs(5, a, b, s)
    assert dup.group[0] == dup.group[1] == dup.group[2] and dup.representative[dup.group[1]] == 1
    # with c's pair to b gone and c ~ d instead: b takes a, c (most pairs left) takes d; a and d never meet
    dup = group_pairs(4, np.array([0, 1, 2]), np.array([1, 2, 3]), np.full(3, 0.96, np.float32))
    assert dup.group[0] != dup.group[3]
    reps = dup.representative[dup.group[dup.group >= 0]]
    members = np.flatnonzero(dup.group >= 0)
    pairs = {(0, 1), (1, 2), (2, 3)}
    assert all(m == r or (min(m, r), max(m, r)) in pairs for m, r in zip(members, reps, strict=True))


def test_outliers_ranks_the_planted_far_rows_first(fitted, cli):
    run_dir = fitted["run"]
    r = cli("outliers", run_dir, "--per-cluster", "5", "--top", "10", "--no-report")
    assert r.returncode == 0, r.stderr
    t = pq.read_table(run_dir / "outliers.parquet").to_pandas()
    top = t[t.rank_overall.notna()].sort_values("rank_overall")
    assert len(top) == 10 and set(top.id[:N_FAR]) == fitted["planted"]["far"], top[["id", "cluster", "score",
                                                                                  "log_density"]]
    assert (top.score.round(3).diff().dropna() <= 0).all() and top.score.iloc[0] > 0.99  # ties: by log-density
    assigned = pq.read_table(run_dir / "assignments.parquet").to_pandas()
    sizes = assigned.cluster.value_counts()
    per = t.groupby("cluster").rank_in_cluster.apply(lambda r: set(r[r <= 5]))
    for c, ranks in per.items():  # the top 5 of every cluster (or all its rows) are there
        assert ranks == set(range(1, min(5, sizes[c]) + 1))


def test_balanced_counts_share_evenly_and_give_the_capped_rest_to_the_others():
    assert balanced_counts(np.array([300, 150, 100, 20]), 200).tolist() == [60, 60, 60, 20]
    assert balanced_counts(np.array([5, 5, 5]), 7).tolist() == [3, 2, 2]
    assert balanced_counts(np.array([3, 0, 9]), 12).tolist() == [3, 0, 9]


def test_sample_is_balanced_over_clusters_and_tree_level_without_duplicates(fitted, cli):
    run_dir = fitted["run"]
    if not (run_dir / "duplicates.parquet").exists():
        assert cli("duplicates", run_dir, "--no-report").returncode == 0
    assigned = pq.read_table(run_dir / "assignments.parquet").to_pandas()
    sizes = assigned.cluster.value_counts().sort_index()
    n = 4 * int(sizes.min()) // 2  # every cluster can give n / K
    r = cli("sample", run_dir, "--n", n, "--no-report")
    assert r.returncode == 0, r.stderr
    s = pq.read_table(run_dir / "sample.parquet").to_pandas()
    assert list(s.columns) == ["id", "path", "cluster"] and len(s) == n and s.id.is_unique
    counts = s.cluster.value_counts().reindex(sizes.index, fill_value=0)
    assert counts.max() - counts.min() <= 1, counts  # balanced, not proportional to the cluster sizes
    dup = pq.read_table(run_dir / "duplicates.parquet").to_pandas()
    assert not set(s.id) & set(dup.id[dup.id != dup.representative])  # one row per duplicate group at most
    assert (s.cluster.values == assigned.cluster.values[s.id.values]).all()
    # over the tree's 2 groups first: equal group shares though the groups hold different clusters
    r = cli("sample", run_dir, "--n", 40, "--level", 2, "--drop-outliers", "--no-report")
    assert r.returncode == 0, r.stderr
    s = pq.read_table(run_dir / "sample.parquet").to_pandas()
    assert s.group.value_counts().tolist() == [20, 20]
    from cluster_service.curate.outliers import outlier_scores
    from cluster_service.curate.run import open_run

    score, _ = outlier_scores(open_run(run_dir))
    assert (score > 0.99).sum() >= N_FAR and not set(s.id) & set(np.flatnonzero(score > 0.99))


def test_export_of_a_cluster_and_a_level(fitted, tmp_path, cli):
    run_dir = fitted["run"]
    clusters = pq.read_table(run_dir / "assignments.parquet").column("cluster").to_numpy()
    r = cli("export", run_dir, "--cluster", 1, "--out", tmp_path / "c1")
    assert r.returncode == 0, r.stderr
    links = sorted((tmp_path / "c1" / "cluster_00001").iterdir())
    assert len(links) == (clusters == 1).sum()
    assert {os.path.realpath(p) for p in links} == {fitted["paths"][i] for i in np.flatnonzero(clusters == 1)}
    r = cli("export", run_dir, "--level", 2, "--out", tmp_path / "l2.csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "l2.csv")))
    assert len(rows) == clusters.size and {r["group"] for r in rows} == {"0", "1"}
    assert all(r["path"] == fitted["paths"][int(r["id"])] for r in rows)


def test_bad_input_is_refused_clearly_and_writes_nothing(fitted, tmp_path, cli):
    run_dir = fitted["run"]
    for args, message in [(["duplicates", run_dir, "--threshold", "0"], "--threshold must be in (0, 1]"),
                          (["duplicates", run_dir, "--threshold", "1.5"], "--threshold must be in (0, 1]"),
                          (["sample", run_dir, "--n", "0"], "--n must be > 0"),
                          (["sample", run_dir, "--n", "100000", "--keep-duplicates"],
                           f"--n 100000 is more than the {fitted['x'].shape[0]} rows of {run_dir}"),
                          (["export", run_dir, "--cluster", "99", "--out", tmp_path / "x"], "--cluster must be in"),
                          (["export", run_dir, "--out", tmp_path / "x"], "exactly one of --cluster K or --level L"),
                          (["outliers", "runs:/abc/model"], "an MLflow URI holds only the model"),
                          (["outliers", tmp_path / "nope"], "no such run directory")]:
        before = sorted(p.name for p in run_dir.iterdir())
        r = cli(*args)
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr)
        assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing new, nothing half-written
    assert not (tmp_path / "x").exists()
    # the same run with its data as an array file (no image paths): export says why; outliers write
    # their table and the report says why its gallery is skipped
    no_paths = tmp_path / "run"
    shutil.copytree(run_dir, no_paths)
    np.savez(tmp_path / "x.npz", X=fitted["x"])
    summary = json.loads((no_paths / "summary.json").read_text())
    (no_paths / "summary.json").write_text(json.dumps({**summary, "data": str(tmp_path / "x.npz")}))
    r = cli("export", no_paths, "--cluster", 0, "--out", tmp_path / "e")
    assert r.returncode != 0 and "carries no image paths" in r.stderr and str(tmp_path / "x.npz") in r.stderr
    assert not (tmp_path / "e").exists()
    r = cli("outliers", no_paths)
    assert r.returncode == 0 and "gallery skipped" in r.stdout
    assert "gallery skipped" in (no_paths / "report.html").read_text()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (make browser installs Debian's)")
def test_report_map_and_sections_render_in_headless_chromium(fitted, tmp_path, cli):
    from PIL import Image

    run_dir = fitted["run"]
    for cmd in (["duplicates"], ["outliers"], ["sample", "--n", "40"]):
        assert cli(cmd[0], run_dir, *cmd[1:], "--no-report").returncode == 0
    r = cli("gallery", run_dir)
    assert r.returncode == 0, r.stderr
    page = (run_dir / "report.html").read_text()
    k = json.loads((run_dir / "summary.json").read_text())["k_found"]
    svg = re.search(r'<svg class="map".*?</svg>', page, re.S).group(0)
    linked = re.findall(r'<a href="#c(\d+)"><circle class="mean"', svg)
    assert sorted(map(int, linked)) == list(range(k))  # every mean leads to its panel
    assert all(f'<section class="cluster" id="c{c}">' in page for c in linked)
    for section in ("duplicates", "outliers", "sample", "export"):
        assert f'<section id="{section}">' in page
    assert page.count('<div class="strip"><span>group') >= 1 and "most unusual" in page  # galleries
    assert "http://" not in page and "https://" not in page
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
           "--window-size=1200,1400", f"--screenshot={shot}", (run_dir / "report.html").as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), r.stderr[-2000:]
    assert not [line for line in r.stderr.splitlines() if "CONSOLE" in line]
    rgb = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int64)
    colourful = (rgb.max(2) - rgb.min(2)) > 60  # the map's coloured means and dots (the page is grey text)
    assert colourful[300:1100].mean() > 0.003, colourful.mean()


def test_rate_lines_come_every_interval_with_rate_and_eta_and_at_the_end():
    from cluster_service.ops.progress import RateLines, epoch_line

    now, lines = [0.0], []
    show = RateLines("assign", "rows", every_s=30, emit=lines.append, clock=lambda: now[0])
    for done, t in [(100, 10), (200, 30), (300, 40), (400, 60), (500, 65)]:
        now[0] = t
        show(done, 500)
    assert lines == ["assign: 200/500 rows, 7 rows/s, elapsed 30s ETA 45s",
                     "assign: 400/500 rows, 7 rows/s, elapsed 1m00s ETA 15s",
                     "assign: 500/500 rows, 8 rows/s, elapsed 1m05s ETA done"]
    rec = {"epoch": 9, "n_clusters": 12, "loss_cluster": 0.5}
    assert epoch_line(rec, 40, 100.0, 10.0) == "fit: epoch 10/40 K=12 loss=0.500 elapsed 1m40s ETA <= 5m00s"
    assert epoch_line(rec, 40, 100.0).endswith("ETA ?")  # the first line: the start's minutes are no epoch
    assert epoch_line({**rec, "stopped": "converged"}, 40, 100.0).startswith("fit: epoch 10/10 K=12")
    assert epoch_line({**rec, "stopped": "converged"}, 40, 100.0).endswith("ETA done (converged)")
