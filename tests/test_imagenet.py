"""The flagship job end to end, as a user runs it: `python -m jobs.imagenet CONFIG` on a generated
ImageFolder (train and val splits), a random ResNet-50 in the official MoCo v2 checkpoint format,
2 gloo Ray Train workers on the suite's local Ray, a small schedule set in the config.

It must end with scores.json (train K, val NMI/ARI/ACC), an assignment for every val image, and a
finished MLflow run holding the model and the plots; a re-run of the same config reuses the
features and the fit instead of starting over."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import imagenet_job_config
from sklearn.metrics import normalized_mutual_info_score

from cluster_service.io.shards import MANIFEST

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def job_run(ray_local, imagenet_tree, tmp_path_factory):
    from jobs.imagenet import main

    root = tmp_path_factory.mktemp("imagenet-job")
    cfg = root / "imagenet.yaml"
    cfg.write_text(yaml.safe_dump(imagenet_job_config(imagenet_tree, root / "work")))
    main([str(cfg)])
    return root, cfg


def test_imagenet_job_ends_with_scores_for_every_val_image(job_run, imagenet_tree):
    root, _ = job_run
    work = root / "work"
    scores = json.loads((work / "scores.json").read_text())
    assert scores["train"]["k_found"] >= 1
    for key in ("nmi", "ari", "acc"):
        assert 0.0 <= scores["val"][key] <= 1.0
    # every val image has exactly one assignment, and the scores are those of these assignments
    table = pq.read_table(sorted((work / "val_assignments").glob("*.parquet")))
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(imagenet_tree["val_ids"]) and len(ids) == len(set(ids))
    truth = np.array([imagenet_tree["val_ids"][i] for i in ids])
    nmi = normalized_mutual_info_score(truth, table.column("cluster").to_numpy())
    assert scores["val"]["nmi"] == pytest.approx(nmi, abs=1e-6)
    assert scores["assign"]["failed"] == 0 and scores["assign"]["rows"] == len(imagenet_tree["val_ids"])
    # the model was fitted on the train split's features and accepted the val split's
    model_meta = json.loads((work / "fit" / "model" / "model.json").read_text())
    assert model_meta["feature_space"]["checkpoint_sha256"] and "source" not in model_meta["feature_space"]
    train_manifest = json.loads((work / "features" / "train" / MANIFEST).read_text())
    assert train_manifest["rows"] == len(imagenet_tree["train_ids"])


def test_imagenet_job_mlflow_run_has_model_plots_and_val_scores(job_run):
    from mlflow import MlflowClient

    root, _ = job_run
    scores = json.loads((root / "work" / "scores.json").read_text())
    client = MlflowClient()  # the suite's store (MLFLOW_TRACKING_URI, see conftest)
    run = client.get_run(scores["mlflow_run"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["val/nmi"] == pytest.approx(scores["val"]["nmi"])
    assert run.data.metrics["final/n_clusters"] == scores["train"]["k_found"]
    top = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"model", "plots", "config.yaml", "schedule_plan.txt", "history.json"} <= top
    plots = {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/k_over_epochs.png", "plots/projection.png", "plots/confusion_matrix.png"} <= plots


def test_imagenet_job_rerun_reuses_features_and_fit(job_run, capfd):
    from jobs.imagenet import main

    root, cfg = job_run
    work = root / "work"
    model_file = work / "fit" / "model" / "arrays.npz"
    before = (model_file.stat().st_mtime_ns, (work / "fit" / "history.json").read_text())
    first = json.loads((work / "scores.json").read_text())
    capfd.readouterr()
    main([str(cfg)])
    out = capfd.readouterr().out
    assert out.count("already holds shards; reusing them") == 2
    assert "already holds this fit" in out
    assert (model_file.stat().st_mtime_ns, (work / "fit" / "history.json").read_text()) == before
    again = json.loads((work / "scores.json").read_text())
    assert again["val"] == first["val"] and again["mlflow_run"] != first["mlflow_run"]


def test_imagenet_job_fits_the_first_classes_then_updates_with_the_rest(job_run, imagenet_tree, capfd):
    """imagenet.initial_classes: 2 (new data over time): the first fit sees the train rows of classes
    0 and 1 only, `update` continues that model on the whole train split into fit/, and the val split
    is assigned by the updated model; a re-run reuses the first fit and the update."""
    from jobs.imagenet import main

    root, _ = job_run
    work = root / "work-update"
    shutil.copytree(root / "work" / "features", work / "features")  # the same images: extraction reused
    config = imagenet_job_config(imagenet_tree, work)
    config["imagenet"]["initial_classes"] = 2
    cfg = root / "imagenet-update.yaml"
    cfg.write_text(yaml.safe_dump(config))
    main([str(cfg)])
    scores = json.loads((work / "scores.json").read_text())
    assert {"fit", "update", "assign"} <= set(scores["seconds"])

    # the first fit: exactly the train rows of the first two classes
    first_two = {i for i, c in imagenet_tree["train_ids"].items() if c < 2}
    subset = pq.read_table(sorted((work / "features" / "train_first_2").glob("*.parquet")), columns=["id", "label"])
    assert set(subset.column("id").to_pylist()) == first_two and set(subset.column("label").to_pylist()) == {0, 1}
    first_ids = pq.read_table(work / "fit_first_2" / "assignments.parquet").column("id").to_pylist()
    assert sorted(first_ids) == sorted(first_two)

    # the update: every train row, lineage back to the first model, K and scores of the updated model
    first_meta = json.loads((work / "fit_first_2" / "model" / "model.json").read_text())
    meta = json.loads((work / "fit" / "model" / "model.json").read_text())
    lineage = json.loads((work / "fit" / "lineage.json").read_text())
    assert lineage["previous_version"] == first_meta["version"] != meta["version"] == lineage["version"]
    assert lineage["updated_from"] == str(work / "fit_first_2")
    assert {int(i) for i in lineage["old_to_new"]} == set(range(first_meta["n_clusters"]))
    updated = pq.read_table(work / "fit" / "assignments.parquet").column("id").to_pylist()
    assert sorted(updated) == sorted(imagenet_tree["train_ids"])
    assert scores["train"]["k_found"] == meta["n_clusters"]
    val = pq.read_table(sorted((work / "val_assignments").glob("*.parquet")))
    assert set(val.column("model_version").to_pylist()) == {meta["version"]}
    assert sorted(val.column("id").to_pylist()) == sorted(imagenet_tree["val_ids"])

    capfd.readouterr()
    main([str(cfg)])
    out = capfd.readouterr().out
    assert "already holds this fit" in out and "already holds the update of this fit" in out
    assert json.loads((work / "fit" / "lineage.json").read_text()) == lineage


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_fit_run_has_a_report_with_one_gallery_panel_per_cluster(job_run):
    root, _ = job_run
    fit_dir = root / "work" / "fit"
    page = (fit_dir / "report.html").read_text()
    k = json.loads((fit_dir / "summary.json").read_text())["k_found"]
    panels = re.findall(r'<section class="cluster" id="c(\d+)">(.*?)</section>', page, re.S)
    assert len(panels) == k
    for _, body in panels:  # every panel shows member thumbnails, inline (no file or network references)
        assert body.count('<img src="data:image/jpeg;base64,') >= 1
    assert "http://" not in page and "https://" not in page and 'src="/' not in page
    assert len(list((fit_dir / "thumbs").glob("*.jpg"))) >= k  # cached for the next build


def test_gallery_writes_one_montage_png_per_cluster(job_run, tmp_path):
    import pyarrow.parquet as pq
    from PIL import Image
    from typer.testing import CliRunner

    from cluster_service.ops.cli import app

    root, _ = job_run
    fit_dir = root / "work" / "fit"
    k = json.loads((fit_dir / "summary.json").read_text())["k_found"]
    res = CliRunner().invoke(app, ["gallery", str(fit_dir), "--per-cluster", "8", "--montages", str(tmp_path / "m"),
                                   "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    files = sorted((tmp_path / "m").glob("cluster_*.png"))
    assert len(files) == k and f"montages: {k} PNG(s)" in res.output
    sizes = np.bincount(pq.read_table(fit_dir / "assignments.parquet").column("cluster").to_numpy(), minlength=k)
    for c, f in enumerate(files):  # the typical strip alone holds min(4, size) 48 x 48 images, none white
        pixels = np.asarray(Image.open(f).convert("L"), dtype=np.float64)
        assert f.name == f"cluster_{c:05d}.png"
        assert (pixels < 230).sum() >= 0.9 * 48 * 48 * min(4, sizes[c])


def test_montage_places_each_thumbnail_in_its_strip(tmp_path):
    from PIL import Image

    from cluster_service.report.html import THUMB_PX, write_montage

    colours = {0: (255, 0, 0), 1: (0, 0, 255), 2: (0, 160, 0)}
    thumbs = {}
    for i, rgb in colours.items():
        thumbs[i] = str(tmp_path / f"{i}.jpg")
        Image.new("RGB", (THUMB_PX, THUMB_PX), rgb).save(thumbs[i])
    picks = {"typical": np.array([0, 1]), "least certain": np.array([2]), "random": np.array([7])}  # 7: unreadable
    out = write_montage(tmp_path / "m" / "c.png", 3, np.array([5, 5, 5, 85]), picks, thumbs)
    sheet = np.asarray(Image.open(out).convert("RGB"), dtype=np.int64)
    cell, left, top = THUMB_PX + 2, 110, 24

    def centre(row, col):
        return sheet[top + row * cell + THUMB_PX // 2, left + col * cell + THUMB_PX // 2]

    assert np.abs(centre(0, 0) - colours[0]).max() < 40 and np.abs(centre(0, 1) - colours[1]).max() < 40
    assert np.abs(centre(1, 0) - colours[2]).max() < 40
    assert np.abs(centre(2, 0) - (200, 200, 200)).max() < 5  # the unreadable image's grey cell
    assert sheet.shape[:2] == (top + 3 * cell, left + 2 * cell)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (.ci/run installs Debian's chromium)")
def test_report_renders_in_headless_chromium(job_run, tmp_path):
    """The report as a person opens it: a real headless Chromium loads the file, logs no console
    errors, and the screenshot is not blank."""
    from PIL import Image

    root, _ = job_run
    report = root / "work" / "fit" / "report.html"
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
           "--window-size=1200,1600", f"--screenshot={shot}", report.as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), r.stderr[-2000:]
    console = [line for line in r.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # text, plots and thumbnails drawn
