"""Feature extraction: the MoCo checkpoint loader, the Ray Data job end to end (features equal a direct
forward pass of the same model), corrupt images reported, and PCA of written shards."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.models import resnet50
from typer.testing import CliRunner

from cluster_service.io.shard_validation import validate_shards
from cluster_service.io.shards import MANIFEST, read_feature_table, write_shards
from cluster_service.ops.cli import app
from feature_extraction.extract import REPORT, apply_pca, list_images
from feature_extraction.moco import CheckpointError, load_encoder, save_moco_checkpoint

IMAGE_SIZE = 64  # resnet50 on CPU is slow at 224; the same eval transform at 64/73 instead of 224/256
EVAL_TF = transforms.Compose([transforms.Resize(73), transforms.CenterCrop(IMAGE_SIZE), transforms.ToTensor(),
                              transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


@pytest.fixture(scope="module")
def moco_model():
    """A randomly initialised MoCo v2 query encoder: resnet50 with fc = MLP 2048→2048→128."""
    torch.manual_seed(0)
    m = resnet50(weights=None)
    m.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128))
    # non-trivial BatchNorm statistics, so a loader that forgets the buffers is caught
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.fixture(scope="module")
def moco_ckpt(moco_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "moco_v2_tiny.pth.tar"
    save_moco_checkpoint(moco_model, path)
    return path


def reference_forward(model: nn.Module, images: list[Image.Image], head: str = "proj") -> np.ndarray:
    """torchvision's own eval transform and a forward pass of the model the checkpoint was saved from."""
    x = torch.stack([EVAL_TF(im.convert("RGB")) for im in images])
    with torch.inference_mode():
        if head == "proj":
            return F.normalize(model(x), dim=1).numpy()
        fc, model.fc = model.fc, nn.Identity()
        try:
            return model(x).numpy()
        finally:
            model.fc = fc


# ------------------------------------------------------------------------------------ checkpoints


def test_moco_checkpoint_loads_both_heads(moco_model, moco_ckpt):
    raw = torch.load(moco_ckpt, weights_only=True)
    assert {"module.encoder_q.conv1.weight", "module.encoder_q.fc.2.weight"} <= set(raw["state_dict"])
    img = [Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 70, 3), np.uint8))]
    x = torch.stack([EVAL_TF(img[0])])
    enc = load_encoder(moco_ckpt, head="proj")
    assert enc.spec.out_dim == 128 and enc.spec.head_kind == "mlp"
    with torch.inference_mode():
        np.testing.assert_allclose(enc(x).numpy(), reference_forward(moco_model, img), atol=1e-5)
        bb = load_encoder(moco_ckpt, head="backbone", normalize=False)
        assert bb.spec.out_dim == 2048
        np.testing.assert_allclose(bb(x).numpy(), reference_forward(moco_model, img, "backbone"), rtol=1e-4,
                                   atol=1e-5)


def test_plain_torchvision_state_dict_gives_backbone_only(tmp_path):
    m = resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save(m.state_dict(), path)
    enc = load_encoder(path, head="backbone")
    assert enc.spec.head_kind == "none" and enc.spec.out_dim == 2048
    torch.testing.assert_close(enc.backbone.layer4[2].conv3.weight, m.layer4[2].conv3.weight)
    with pytest.raises(CheckpointError, match="no projection head|use head='backbone'"):
        load_encoder(path, head="proj")


def test_missing_and_malformed_checkpoints_have_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*never downloaded"):
        load_encoder(tmp_path / "nope.pth.tar")
    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_encoder(garbage)
    wrong = tmp_path / "wrong.pth.tar"
    torch.save({"state_dict": {"module.encoder_q.conv1.weight": torch.zeros(64, 3, 7, 7)}}, wrong)
    with pytest.raises(CheckpointError, match="missing key"):
        load_encoder(wrong, head="backbone")
    r = CliRunner().invoke(app, ["extract", str(tmp_path), "--checkpoint", str(wrong), "--out",
                                 str(tmp_path / "o"), "--head", "backbone", "--quiet"])
    assert r.exit_code != 0 and isinstance(r.exception, CheckpointError)


# ------------------------------------------------------------------------------------ inputs


def test_list_images_path_file(tmp_path):
    (tmp_path / "a.png").touch()
    sub = tmp_path / "sub"
    sub.mkdir()
    lst = sub / "list.txt"
    lst.write_text(f"# images\n../a.png\n\n{tmp_path / 'b.jpg'}\n")
    images = list_images(lst)
    assert images.ids == ["../a.png", str(tmp_path / "b.jpg")]
    assert images.paths == [str((tmp_path / "a.png").resolve()), str(tmp_path / "b.jpg")]
    assert images.labels is None
    lst.write_text("x.png\ny.png\nx.png\n")
    with pytest.raises(ValueError, match="line 3"):
        list_images(lst)


def test_extract_refuses_a_directory_that_holds_shards(tmp_path):
    from feature_extraction.extract import ExtractConfig, extract

    write_shards(tmp_path / "s", np.arange(3), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="already holds shards"):
        extract(tmp_path, tmp_path / "s", ExtractConfig(tmp_path / "moco.pth.tar"))


# ------------------------------------------------------------------------------------ the Ray job


@pytest.fixture(scope="module")
def ray_session(request):
    """The suite's shared local Ray (conftest's ray_local) when there is one, else a module-scoped one."""
    try:
        yield request.getfixturevalue("ray_local")
        return
    except pytest.FixtureLookupError:
        pass
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    """2 classes × 5 readable images (JPEG/PNG, RGB/grey, various sizes) plus two broken files."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    good = {}
    for c in ("cat", "dog"):
        (root / c).mkdir()
        for i in range(5):
            h, w = 50 + 9 * i, 90 - 7 * i
            arr = rng.integers(0, 255, (h, w, 3), np.uint8)
            im = Image.fromarray(arr).convert("L") if i == 3 else Image.fromarray(arr)
            name = f"{c}/{i}.{'png' if i % 2 else 'jpg'}"
            im.save(root / name, quality=95)
            good[name] = Image.open(root / name).copy()
    (root / "dog" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage, not a JPEG")
    png = (root / "cat" / "1.png").read_bytes()
    (root / "cat" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "cat" / "notes.txt").write_text("not an image, not listed")
    return root, good


def test_extract_job_writes_valid_shards_equal_to_direct_forward(ray_session, image_tree, moco_model,
                                                                 moco_ckpt, tmp_path):
    root, good = image_tree
    out = tmp_path / "shards"
    args = ["extract", str(root), "--checkpoint", str(moco_ckpt), "--out", str(out),
            "--image-size", str(IMAGE_SIZE), "--batch-size", "4", "--rows-per-shard", "4", "--quiet"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, (r.output, r.exception)

    assert validate_shards(out) == []
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["d"] == 128 and [s["rows"] for s in manifest["shards"]] == [4, 4, 2]
    ext = manifest["extractor"]
    assert ext["checkpoint_sha256"] == hashlib.sha256(moco_ckpt.read_bytes()).hexdigest()
    assert ext["head"] == "proj" and ext["normalization"] == "l2"
    assert ext["preprocessing"]["center_crop"] == 64 and ext["preprocessing"]["resize"] == 73
    schema = pq.read_schema(out / "part-00000.parquet")
    assert schema.field("feature").type == pa.list_(pa.float32(), 128)
    assert schema.field("id").type == pa.string() and schema.field("label").type == pa.int64()

    t = read_feature_table(out)
    assert list(t.ids) == sorted(good)  # input order kept; broken files dropped
    np.testing.assert_array_equal(t.labels, [0] * 5 + [1] * 5)
    paths = pq.read_table(out / "part-00001.parquet").column("path").to_pylist()
    assert paths == [str((root / i).resolve()) for i in sorted(good)[4:8]]
    expected = reference_forward(moco_model, [good[i] for i in sorted(good)])
    np.testing.assert_allclose(t.features, expected, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(t.features, axis=1), 1.0, atol=1e-5)

    report = json.loads((out / REPORT).read_text())
    assert report["n_images"] == 12 and report["n_written"] == 10
    assert sorted(f["id"] for f in report["failed"]) == ["cat/truncated.png", "dog/corrupt.jpg"]
    assert all(f["error"] for f in report["failed"])
    assert report["manifest_hash"] == t.manifest_hash


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_extract_on_gpu_with_autocast_matches_fp32(ray_session, image_tree, moco_model, moco_ckpt, tmp_path):
    from feature_extraction.extract import ExtractConfig, extract

    root, good = image_tree
    cfg = ExtractConfig(moco_ckpt, image_size=IMAGE_SIZE, batch_size=4, use_gpu=True)
    extract(root, tmp_path / "s", cfg)
    t = read_feature_table(tmp_path / "s")
    expected = reference_forward(moco_model, [good[i] for i in sorted(good)])
    cos = (t.features * expected).sum(axis=1)
    assert cos.min() > 0.99


# ------------------------------------------------------------------------------------ PCA


def test_pca_projects_every_shard_and_keeps_ids(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 600, 16
    basis = np.linalg.qr(rng.standard_normal((d, 3)))[0]  # 3-d subspace of R^16
    x = (rng.standard_normal((n, 3)) * [5.0, 3.0, 2.0]) @ basis.T + 0.01 * rng.standard_normal((n, d)) + 4.0
    ids = np.array([f"img{i}" for i in range(n)], dtype=object)
    write_shards(tmp_path / "raw", ids, x, labels=np.arange(n) % 7, rows_per_shard=250,
                 extractor={"head": "x"})

    manifest = apply_pca(tmp_path / "raw", tmp_path / "pca", dim=3, sample=400, rows_per_shard=250)
    assert manifest["d"] == 3 and [s["rows"] for s in manifest["shards"]] == [250, 250, 100]
    assert manifest["extractor"]["head"] == "x"
    assert manifest["extractor"]["pca"]["explained_variance_ratio"] > 0.99
    assert validate_shards(tmp_path / "pca") == []
    t = read_feature_table(tmp_path / "pca")
    assert list(t.ids) == list(ids)
    np.testing.assert_array_equal(t.labels, np.arange(n) % 7)
    # the projection keeps the geometry of the 3-d subspace: pairwise distances are preserved
    sub = rng.choice(n, 50, replace=False)
    dz = np.linalg.norm(t.features[sub, None] - t.features[None, sub], axis=-1)
    dx = np.linalg.norm(x[sub, None] - x[None, sub], axis=-1)
    np.testing.assert_allclose(dz, dx, atol=0.1)
    assert abs(t.features.mean(axis=0)).max() < 0.5  # centred by the fitted mean (data mean is 4)
    params = np.load(tmp_path / "pca" / "pca.npz")
    assert params["components"].shape == (3, d)
    assert manifest["extractor"]["pca"]["params_sha256"] == hashlib.sha256(
        params["mean"].astype(np.float32).tobytes() + params["components"].astype(np.float32).tobytes()).hexdigest()
    with pytest.raises(ValueError, match="pca_dim"):
        apply_pca(tmp_path / "raw", tmp_path / "bad", dim=17)


def test_pca_keeps_unknown_labels_null(tmp_path):
    """Rows without a label (null) stay null after PCA; they used to become -1, which the reader refuses."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 8))
    raw = tmp_path / "raw"
    write_shards(raw, np.arange(40), x, labels=np.arange(40) % 3, rows_per_shard=20)
    # null out the labels of every 4th row in the written shards
    for p in sorted(raw.glob("part-*.parquet")):
        t = pq.read_table(p)
        labels = [None if i % 4 == 0 else v for i, v in enumerate(t.column("label").to_pylist())]
        t = t.set_column(t.schema.get_field_index("label"), "label", pa.array(labels, pa.int64()))
        pq.write_table(t, p, compression="zstd")
    manifest = json.loads((raw / MANIFEST).read_text())
    for entry in manifest["shards"]:
        entry["sha256"] = hashlib.sha256((raw / entry["name"]).read_bytes()).hexdigest()
    (raw / MANIFEST).write_text(json.dumps(manifest))
    apply_pca(raw, tmp_path / "pca", dim=2, rows_per_shard=20)
    out = pq.read_table(tmp_path / "pca" / "part-00000.parquet").column("label").to_pylist()
    assert out[0] is None and out[4] is None and out[1] == 1
    t = read_feature_table(tmp_path / "pca")
    assert (t.labels[::4] == -1).all() and (t.labels[1::4] >= 0).all()
