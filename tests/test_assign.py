"""Assignment: exact math against scipy, shortlist against exact, the shard job (resume, bad shards,
dimension mismatch, Ray Data == local) and the MLflow pyfunc model through a real store."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy.stats import multivariate_normal
from typer.testing import CliRunner

import cluster_service.runtime.assign_job as assign_mod
from cluster_service.bench.assign import sample_model, synthetic_model
from cluster_service.io.shards import write_shards
from cluster_service.runtime.assign_job import REPORT, assign_shards
from cluster_service.serve.assign import (
    ExactAssigner,
    NetAssigner,
    ShortlistAssigner,
    agreement,
    exact_assign,
)
from cluster_service.serve.model import ModelError


def scipy_log_joint(model, x):
    """(n, K) log pi_k + log N(x; mu_k, Sigma_k) straight from scipy."""
    return np.stack([lw + multivariate_normal(m, c).logpdf(x) for lw, m, c in
                     zip(model.log_weights, model.means, model.covariances, strict=True)], axis=1)


def with_net(model, hidden=7, seed=0):
    rng = np.random.default_rng(seed)
    d, K = model.n_features, model.n_clusters
    model.net = {"body.0.weight": rng.normal(size=(hidden, d)), "body.0.bias": rng.normal(size=hidden),
                 "body.2.weight": rng.normal(size=(hidden, hidden)), "body.2.bias": rng.normal(size=hidden),
                 "head.weight": rng.normal(size=(K, hidden)), "head.bias": rng.normal(size=K)}
    model.net = {k: v.astype(np.float32) for k, v in model.net.items()}
    return model


def test_exact_shortlist_and_net_match_scipy():
    model = with_net(synthetic_model(6, 5, seed=1, separation=1.5))
    x, _ = sample_model(model, 300, seed=2)
    ref = scipy_log_joint(model, x.astype(np.float64))
    top2 = np.sort(ref, axis=1)[:, -2:]

    exact = exact_assign(model, x)
    np.testing.assert_array_equal(exact.cluster, ref.argmax(1))
    np.testing.assert_allclose(exact.log_prob, top2[:, 1], rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(exact.margin, top2[:, 1] - top2[:, 0], rtol=1e-8, atol=1e-8)

    full = ShortlistAssigner(model, top_m=6)(x)  # shortlist of all K: must equal exact
    np.testing.assert_array_equal(full.cluster, exact.cluster)
    np.testing.assert_allclose(full.log_prob, exact.log_prob, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(full.margin, exact.margin, rtol=1e-8, atol=1e-8)

    # arbitrary (row, cluster) pairs, including padding (-1) and repeats
    cand = np.random.default_rng(3).integers(-1, 6, size=(300, 4))
    scorer = ShortlistAssigner(model, top_m=2).scorer
    import torch

    got = scorer.score_pairs(torch.from_numpy(x), torch.from_numpy(cand)).numpy()
    want = np.where(cand >= 0, np.take_along_axis(ref, np.maximum(cand, 0), 1), -np.inf)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-9)

    net = NetAssigner(model)(x)
    logits = model.net_logits(x)
    np.testing.assert_array_equal(net.cluster, logits.argmax(1))
    np.testing.assert_allclose(net.log_prob, ref[np.arange(300), net.cluster], rtol=1e-10, atol=1e-9)
    sl = np.sort(logits, axis=1)
    np.testing.assert_allclose(net.margin, sl[:, -1] - sl[:, -2], rtol=1e-5, atol=1e-5)


def test_shortlist_agrees_with_exact_k200():
    model = synthetic_model(200, 32, seed=3, separation=1.0)
    x, z = sample_model(model, 3000, seed=4)
    exact = ExactAssigner(model)(x)
    assert 0.95 < (exact.cluster == z).mean() < 1.0  # overlapping clusters: the task is not trivial
    for kind in ("flat", "hnsw"):
        fast = ShortlistAssigner(model, top_m=16, index_kind=kind)(x)
        assert agreement(fast, exact) >= 0.999, kind
        same = fast.cluster == exact.cluster
        np.testing.assert_allclose(fast.log_prob[same], exact.log_prob[same], rtol=1e-10, atol=1e-9)
    # a 1-candidate shortlist is worse: the rescoring step is doing work
    assert agreement(ShortlistAssigner(model, top_m=1)(x), exact) < agreement(fast, exact)


def test_dimension_mismatch_fails_clearly(tmp_path):
    model = synthetic_model(4, 8, seed=0)
    x6 = np.zeros((10, 6), np.float32)
    with pytest.raises(ModelError, match=r"\(n, 8\).*\(10, 6\)"):
        ShortlistAssigner(model)(x6)
    write_shards(tmp_path / "shards", np.arange(10), x6, rows_per_shard=5)
    model.save(tmp_path / "model")
    with pytest.raises(ModelError, match="d=8.*d=6"):
        assign_shards(tmp_path / "model", tmp_path / "shards", tmp_path / "out", use_ray=False)
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_model_from_another_extractor_is_refused(tmp_path):
    from cluster_service.io.shards import load_manifest

    model = synthetic_model(4, 6, seed=0)
    x = np.zeros((10, 6), np.float32)
    write_shards(tmp_path / "train", np.arange(10), x, extractor={"backbone": "moco_v2", "head": "proj"})
    write_shards(tmp_path / "new", np.arange(10, 20), x + 1, extractor={"backbone": "moco_v2", "head": "proj"})
    write_shards(tmp_path / "other", np.arange(10), x, extractor={"backbone": "resnet50", "head": "backbone"})
    model.manifest_hash = load_manifest(tmp_path / "train")[1]
    model.save(tmp_path / "model")
    # new shards from the same extractor: accepted (the hash covers d + extractor, not the shard list)
    assert load_manifest(tmp_path / "new")[1] == model.manifest_hash
    report = assign_shards(tmp_path / "model", tmp_path / "new", tmp_path / "out_new", use_ray=False)
    assert not report.failed
    with pytest.raises(ModelError, match="another extractor"):
        assign_shards(tmp_path / "model", tmp_path / "other", tmp_path / "out_other", use_ray=False)
    assert not list((tmp_path / "out_other").glob("*.parquet"))


def moco_extractor(**changes):
    """An extractor block as feature_extraction.extract.describe_extractor writes it."""
    block = {"method": "moco_v2", "backbone": "resnet50", "checkpoint": "/ckpts/moco_v2_800ep.pth.tar",
             "checkpoint_sha256": "ab" * 32, "head": "proj", "head_kind": "mlp", "out_dim": 6,
             "normalization": "l2", "source": "/data/imagenet/train",
             "preprocessing": {"resize": 256, "center_crop": 224, "interpolation": "bilinear",
                               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
    for key, value in changes.items():
        if key == "preprocessing":
            block["preprocessing"] = {**block["preprocessing"], **value}
        else:
            block[key] = value
    return block


def fitted_on(tmp_path, extractor):
    """A model whose feature space is that of shards written with `extractor`."""
    from cluster_service.io.shards import load_manifest, read_feature_table

    write_shards(tmp_path / "train", np.arange(10), np.zeros((10, 6), np.float32), extractor=extractor)
    model = synthetic_model(4, 6, seed=0)
    model.manifest_hash = load_manifest(tmp_path / "train")[1]
    model.feature_space = read_feature_table(tmp_path / "train").feature_space
    model.save(tmp_path / "model")
    return model


def test_same_extractor_on_another_folder_and_checkpoint_path_is_accepted(tmp_path):
    fitted_on(tmp_path, moco_extractor())
    x = np.ones((12, 6), np.float32)
    other = moco_extractor(source="/data/imagenet/val", checkpoint="/elsewhere/copy-of-moco.pth.tar",
                           created="2026-12-01T00:00:00Z")
    write_shards(tmp_path / "val", np.arange(100, 112), x, extractor=other)
    report = assign_shards(tmp_path / "model", tmp_path / "val", tmp_path / "out", use_ray=False)
    assert not report.failed and report.as_dict()["rows"] == 12


@pytest.mark.parametrize(("changes", "field"), [
    ({"checkpoint_sha256": "cd" * 32}, "checkpoint_sha256"),  # same path, other bytes
    ({"head": "backbone"}, "head"),
    ({"preprocessing": {"center_crop": 192}}, "preprocessing"),
    ({"normalization": None}, "normalization"),
    ({"pca": {"dim": 6, "from_d": 2048, "params_sha256": "11" * 32}}, "pca"),
])
def test_another_feature_space_is_refused_naming_the_field(tmp_path, changes, field):
    fitted_on(tmp_path, moco_extractor())
    write_shards(tmp_path / "other", np.arange(10), np.ones((10, 6), np.float32),
                 extractor=moco_extractor(**changes))
    with pytest.raises(ModelError, match=f"differs in {field} ") as err:
        assign_shards(tmp_path / "model", tmp_path / "other", tmp_path / "out", use_ray=False)
    assert "another extractor" in str(err.value) and "model " in str(err.value)
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_two_pca_fits_differ_by_their_parameters_not_by_provenance(tmp_path):
    pca = {"dim": 6, "from_d": 2048, "params_sha256": "11" * 32, "fit_rows": 1000, "seed": 0,
           "source_manifest_sha256": "99" * 32, "explained_variance_ratio": 0.8, "params": "pca.npz"}
    fitted_on(tmp_path, moco_extractor(pca=pca))
    same = {**pca, "fit_rows": 5, "source_manifest_sha256": "77" * 32}  # provenance only
    write_shards(tmp_path / "same", np.arange(10), np.ones((10, 6), np.float32), extractor=moco_extractor(pca=same))
    assert not assign_shards(tmp_path / "model", tmp_path / "same", tmp_path / "o1", use_ray=False).failed
    refit = {**pca, "params_sha256": "22" * 32}
    write_shards(tmp_path / "refit", np.arange(10), np.ones((10, 6), np.float32), extractor=moco_extractor(pca=refit))
    with pytest.raises(ModelError, match="differs in pca"):
        assign_shards(tmp_path / "model", tmp_path / "refit", tmp_path / "o2", use_ray=False)


def test_models_with_the_version_1_hash_keep_loading(tmp_path):
    """A model written before field-level feature spaces stores only the old hash (d + the whole
    extractor block): its own shards still match; another extractor is still refused."""
    import json

    from cluster_service.io.feature_space import legacy_feature_space_hash
    from cluster_service.io.shards import load_manifest
    from cluster_service.serve.model import load_model

    fitted_on(tmp_path, moco_extractor())
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    manifest = load_manifest(tmp_path / "train")[0]
    meta.pop("feature_space"), meta.pop("feature_space_version")
    meta["manifest_hash"] = legacy_feature_space_hash(manifest)
    (tmp_path / "model" / "model.json").write_text(json.dumps(meta))
    assert load_model(tmp_path / "model").feature_space is None
    assert not assign_shards(tmp_path / "model", tmp_path / "train", tmp_path / "o1", use_ray=False).failed
    write_shards(tmp_path / "other", np.arange(10), np.ones((10, 6), np.float32),
                 extractor=moco_extractor(head="backbone"))
    with pytest.raises(ModelError, match="predates field-level"):
        assign_shards(tmp_path / "model", tmp_path / "other", tmp_path / "o2", use_ray=False)


@pytest.fixture
def job(tmp_path):
    model = synthetic_model(12, 6, seed=5, separation=1.5, version="v-test")
    x, _ = sample_model(model, 1000, seed=6)
    write_shards(tmp_path / "shards", np.arange(1000) * 7, x, rows_per_shard=200)
    model.save(tmp_path / "model")
    return tmp_path, model, x


def read_outputs(out_dir):
    return {p.name: pq.read_table(p) for p in sorted(out_dir.glob("*.parquet"))}


def test_interrupted_assign_resumes_and_redoes_only_missing(job, monkeypatch):
    tmp, model, x = job
    clean = assign_shards(tmp / "model", tmp / "shards", tmp / "clean", use_ray=False)
    assert [o.status for o in clean.outcomes] == ["done"] * 5
    want = read_outputs(tmp / "clean")
    t = want["part-00001.parquet"]
    assert t.column_names == ["id", "cluster", "log_prob", "margin", "novelty", "novel", "model_version"]
    assert str(t.schema.field("cluster").type) == "int32" and str(t.schema.field("margin").type) == "float"
    np.testing.assert_array_equal(t.column("id").to_numpy(), np.arange(200, 400) * 7)
    np.testing.assert_array_equal(t.column("cluster").to_numpy(), exact_assign(model, x[200:400]).cluster)

    real_writer, calls = assign_mod.write_parquet_atomic, []

    def dies_on_second(table, path):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job is killed while writing its second shard
        return real_writer(table, path)

    monkeypatch.setattr(assign_mod, "write_parquet_atomic", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        assign_shards(tmp / "model", tmp / "shards", tmp / "out", use_ray=False)
    assert sorted(read_outputs(tmp / "out")) == ["part-00000.parquet"]
    (tmp / "out" / "part-00003.parquet").write_bytes(b"PAR1 half a file")  # a partial copy
    (tmp / "out" / ".part-00001.parquet.tmp-999").write_bytes(b"junk")  # left by a killed writer
    first_mtime = os.stat(tmp / "out" / "part-00000.parquet").st_mtime_ns

    calls.clear()
    def counting(table, path):
        calls.append(path.name)
        return real_writer(table, path)

    monkeypatch.setattr(assign_mod, "write_parquet_atomic", counting)
    again = assign_shards(tmp / "model", tmp / "shards", tmp / "out", use_ray=False)
    assert calls == [f"part-{i:05d}.parquet" for i in range(1, 5)]  # only the unfinished shards
    assert [o.status for o in again.outcomes] == ["skipped"] + ["done"] * 4
    assert os.stat(tmp / "out" / "part-00000.parquet").st_mtime_ns == first_mtime
    assert not list((tmp / "out").glob(".*tmp*"))
    got = read_outputs(tmp / "out")
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].equals(want[name]), name
    np.testing.assert_array_equal(again.cluster_sizes(), clean.cluster_sizes())
    assert again.cluster_sizes().sum() == 1000

    # a different method is not mistaken for finished work
    calls.clear()
    assign_shards(tmp / "model", tmp / "shards", tmp / "out", method="exact", use_ray=False)
    assert len(calls) == 5


def test_cli_reports_bad_shard_and_exits_nonzero(job):
    from cluster_service.ops.cli import app

    tmp, _, _ = job
    bad = tmp / "shards" / "part-00002.parquet"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    args = ["assign", str(tmp / "model"), str(tmp / "shards"), "--out", str(tmp / "out"),
            "--local", "--quiet", "--method", "exact"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output
    assert "part-00002.parquet" in res.output and "not assigned" in res.output
    assert sorted(read_outputs(tmp / "out")) == [f"part-{i:05d}.parquet" for i in (0, 1, 3, 4)]
    assert "800" in res.output  # rows assigned, in the summary table


def test_shard_outcomes_cross_the_ray_boundary_whole():
    """Every ShardOutcome field survives the Ray Data batch and row (the job's report counts `novel`)."""
    from cluster_service.runtime.assign_job import ShardOutcome, outcome_columns, outcome_from_row

    outs = [ShardOutcome("a.parquet", "done", 5, np.array([2, 3, 0]), seconds=0.5, novel=2),
            ShardOutcome("b.parquet", "failed", error="b.parquet row 3: feature contains NaN", seconds=0.1)]
    columns = outcome_columns(outs, 3)
    rows = [{k: v[i] for k, v in columns.items()} for i in range(len(outs))]  # numpy scalars, as Ray yields
    back = [outcome_from_row(r) for r in rows]
    assert [dataclasses.replace(o, counts=None) for o in back] == [dataclasses.replace(o, counts=None) for o in outs]
    assert back[0].counts.tolist() == [2, 3, 0] and back[1].counts is None
    assert type(back[0].novel) is int and json.dumps({o.shard: o.novel for o in back})


@pytest.mark.ray
def test_ray_data_job_matches_local(job, ray_local):
    tmp, model, x = job
    near = model.means[model.predict(x)[0]]
    model.calibrate_novelty(*model.predict(near + 0.3 * (x - near)))  # on tighter rows: some rows are novel
    model.save(tmp / "calibrated")
    local = assign_shards(tmp / "calibrated", tmp / "shards", tmp / "local", use_ray=False)
    seen = []
    remote = assign_shards(tmp / "calibrated", tmp / "shards", tmp / "ray", use_ray=True, progress=seen.append)
    assert sorted(o.shard for o in seen) == [f"part-{i:05d}.parquet" for i in range(5)]
    assert [o.status for o in remote.outcomes] == ["done"] * 5
    np.testing.assert_array_equal(remote.cluster_sizes(), local.cluster_sizes())
    want, got = read_outputs(tmp / "local"), read_outputs(tmp / "ray")
    assert got.keys() == want.keys() and all(got[k].equals(want[k]) for k in want)
    # The reports too (every outcome field crosses the Ray boundary), apart from the timings.
    timing = {"seconds", "rows_per_s"}
    want_report, got_report = (json.loads((tmp / d / REPORT).read_text()) for d in ("local", "ray"))
    assert {k: v for k, v in got_report.items() if k not in timing} == {
        k: v for k, v in want_report.items() if k not in timing}
    assert got_report["novel"] == sum(int(t.column("novel").to_numpy().sum()) for t in got.values()) > 0


def test_pyfunc_round_trip_through_mlflow_registry(tmp_path, job):
    import mlflow

    from cluster_service.runtime.assign_job import open_model
    from cluster_service.serve.pyfunc import log_pyfunc_model

    tmp, model, x = job
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    exp = mlflow.create_experiment("assign-test", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=exp)
    info = log_pyfunc_model(tmp / "model", registered_name="clusters", method="exact")
    assert str(info.registered_model_version) == "1"

    loaded = mlflow.pyfunc.load_model("models:/clusters/1")
    want = exact_assign(model, x[:50])
    for data in (x[:50], pd.DataFrame({"feature": list(x[:50])}),
                 pd.DataFrame(x[:50], columns=[f"f{i}" for i in range(6)])):
        out = loaded.predict(data)
        np.testing.assert_array_equal(out["cluster"].to_numpy(), want.cluster)
        np.testing.assert_allclose(out["log_prob"].to_numpy(), want.log_prob, rtol=1e-6)
    with pytest.raises(Exception, match=r"\(n, 6\)"):
        loaded.predict(x[:5, :4])

    back = open_model("models:/clusters/1", n_features=6)
    np.testing.assert_array_equal(back.chol, model.chol)
    assert back.version == "v-test"
    mlflow.set_tracking_uri(None)
