"""The feature-shard contract: writer, manifest, reader (by rank, streaming) and the validator, which
must report every kind of broken shard with its file and row."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cluster_service.io.features import load_features
from cluster_service.io.shard_validation import validate_shards
from cluster_service.io.shards import (
    MANIFEST,
    ShardError,
    features_to_numpy,
    iter_feature_batches,
    list_shards,
    load_manifest,
    read_feature_table,
    write_shards,
)
from cluster_service.ops.cli import app

D = 4


def make_rows(n: int, seed: int = 0, string_ids: bool = False):
    rng = np.random.default_rng(seed)
    ids = np.arange(n) * 7 + 3
    if string_ids:
        ids = np.array([f"img/{i:05d}.jpg" for i in range(n)], dtype=object)
    x = rng.standard_normal((n, D)).astype(np.float32)
    labels = rng.integers(0, 5, n)
    return ids, x, labels


@pytest.fixture
def good_dir(tmp_path):
    """Three shards of 40, 40, 20 rows with int ids and labels."""
    ids, x, labels = make_rows(100)
    out = tmp_path / "shards"
    write_shards(out, ids, x, labels=labels, rows_per_shard=40, extractor={"backbone": "test"})
    return out, ids, x, labels


def put_table(shard_dir, name: str, table: pa.Table, listed: bool = True) -> None:
    """Write a shard that bypasses the writer's checks; list it in the manifest with its true hash."""
    path = shard_dir / name
    pq.write_table(table, path)
    if listed:
        m = json.loads((shard_dir / MANIFEST).read_text())
        m["shards"] = [s for s in m["shards"] if s["name"] != name]
        m["shards"].append({"name": name, "rows": table.num_rows,
                            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
        (shard_dir / MANIFEST).write_text(json.dumps(m))


def table_of(ids, x, d=D, labels=None) -> pa.Table:
    cols = {"id": pa.array(ids), "feature": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)}
    if labels is not None:
        cols["label"] = pa.array(labels)
    return pa.table(cols)


def kinds(problems) -> set[tuple[str, str, int | None]]:
    return {(p.kind, p.file, p.row) for p in problems}


# ----------------------------------------------------------------------------------- write / read


def test_round_trip_schema_manifest_and_hashes(tmp_path):
    ids, x, labels = make_rows(130, string_ids=True)
    paths = [f"/data/{i}" for i in ids]
    out = tmp_path / "s"
    m = write_shards(out, ids, x, labels=labels, paths=paths, rows_per_shard=50, extractor={"head": "proj"})

    assert [s["rows"] for s in m["shards"]] == [50, 50, 30]
    assert m["d"] == D and m["schema_version"] == 1 and m["extractor"] == {"head": "proj"} and m["created"]
    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk == m
    for s in m["shards"]:
        assert hashlib.sha256((out / s["name"]).read_bytes()).hexdigest() == s["sha256"]
    assert not list(out.glob(".*tmp*")), "temporary files left behind"
    schema = pq.read_schema(out / "part-00000.parquet")
    assert schema.field("id").type == pa.string()
    assert schema.field("feature").type == pa.list_(pa.float32(), D)
    assert schema.field("label").type == pa.int64() and schema.field("path").type == pa.string()
    assert pq.ParquetFile(out / "part-00000.parquet").metadata.row_group(0).column(1).compression == "ZSTD"

    t = read_feature_table(out)
    assert list(t.ids) == list(ids)
    np.testing.assert_array_equal(t.features, x)
    assert t.features.dtype == np.float32 and t.features.flags.c_contiguous and t.features.flags.writeable
    np.testing.assert_array_equal(t.labels, labels)
    manifest = json.loads((out / MANIFEST).read_text())
    # the feature space (d + the extractor's defining fields), not the bytes and not provenance
    space = {"d": D, **{k: v for k, v in manifest["extractor"].items() if k not in ("source", "checkpoint")}}
    assert t.feature_space == space
    assert t.manifest_hash == hashlib.sha256(json.dumps(space, sort_keys=True).encode()).hexdigest()
    assert pq.read_table(out / "part-00002.parquet").column("path").to_pylist() == paths[100:]

    fs = load_features(out)  # the path `fit` takes
    np.testing.assert_array_equal(fs.x, x)
    assert fs.manifest_hash == t.manifest_hash


def test_one_row_group_per_64k_rows(tmp_path):
    n = 70_000
    x = np.zeros((n, 1), np.float32)
    write_shards(tmp_path / "s", np.arange(n), x, rows_per_shard=n)
    md = pq.ParquetFile(tmp_path / "s" / "part-00000.parquet").metadata
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [65_536, n - 65_536]


def test_labels_absent_or_all_null_read_as_none(tmp_path):
    ids, x, _ = make_rows(10)
    write_shards(tmp_path / "a", ids, x)
    assert read_feature_table(tmp_path / "a").labels is None
    write_shards(tmp_path / "b", ids, x, labels=np.full(10, 3))
    assert (read_feature_table(tmp_path / "b").labels == 3).all()


def test_ranks_get_disjoint_shards_round_robin(good_dir):
    out, ids, x, _ = good_dir
    names = [p.name for p in list_shards(out, 1, 2)]
    assert names == ["part-00001.parquet"]
    assert [p.name for p in list_shards(out, 0, 2)] == ["part-00000.parquet", "part-00002.parquet"]
    parts = [read_feature_table(out, r, 2) for r in range(2)]
    got = np.concatenate([p.ids for p in parts])
    assert sorted(got) == sorted(ids) and len(got) == len(ids)
    np.testing.assert_array_equal(parts[1].features, x[40:80])
    with pytest.raises(ValueError, match="rank 2"):
        list_shards(out, 2, 2)


def test_iter_feature_batches_streams_all_rows_as_float32(good_dir):
    import torch

    out, ids, x, labels = good_dir
    batches = list(iter_feature_batches(out, batch_size=16, as_torch=True, with_labels=True))
    assert all(len(b.ids) <= 16 for b in batches)
    assert all(isinstance(b.features, torch.Tensor) and b.features.dtype == torch.float32 for b in batches)
    np.testing.assert_array_equal(torch.cat([b.features for b in batches]).numpy(), x)
    np.testing.assert_array_equal(np.concatenate([b.ids for b in batches]), ids)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), labels)
    third = [b for b in batches if b.shard == "part-00002.parquet"]
    assert [b.first_row for b in third] == [0, 16]
    rank1 = list(iter_feature_batches(out, rank=1, world_size=2))
    np.testing.assert_array_equal(np.concatenate([b.features for b in rank1]), x[40:80])


def test_features_to_numpy_honours_slice_offsets():
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    arr = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 4)
    np.testing.assert_array_equal(features_to_numpy(arr.slice(3, 4)), x[3:7])
    chunked = pa.chunked_array([arr.slice(0, 2), arr.slice(5, 3)])
    np.testing.assert_array_equal(features_to_numpy(chunked), x[[0, 1, 5, 6, 7]])


def test_writer_refuses_bad_input(tmp_path):
    ids, x, _ = make_rows(10)
    with pytest.raises(ShardError, match="unique"):
        write_shards(tmp_path / "a", np.zeros(10, int), x)
    bad = x.copy()
    bad[4, 1] = np.nan
    with pytest.raises(ShardError, match="row 4"):
        write_shards(tmp_path / "b", ids, bad)
    write_shards(tmp_path / "c", ids, x)
    with pytest.raises(ShardError, match="already holds"):
        write_shards(tmp_path / "c", ids, x)


def test_reader_checks_manifest_before_reading(good_dir):
    out, ids, x, _ = good_dir
    (out / "part-00001.parquet").unlink()
    with pytest.raises(ShardError, match="part-00001.parquet.*missing"):
        read_feature_table(out)
    # rank 0 does not own part-00001 but is still told when the manifest is unusable
    (out / MANIFEST).write_text("{not json")
    with pytest.raises(ShardError, match="manifest.json.*JSON"):
        read_feature_table(out, 0, 2)
    (out / MANIFEST).unlink()
    with pytest.raises(ShardError, match="manifest.json.*missing"):
        load_manifest(out)


def test_reader_names_file_and_row_of_nonfinite_and_rows_mismatch(good_dir):
    out, ids, x, _ = good_dir
    bad = x[40:80].copy()
    bad[7, 2] = np.inf
    put_table(out, "part-00001.parquet", table_of(ids[40:80], bad, labels=np.zeros(40, np.int64)))
    with pytest.raises(ShardError, match=r"part-00001.parquet row 7: .*NaN or Inf"):
        read_feature_table(out)
    m = json.loads((out / MANIFEST).read_text())
    m["shards"][0]["rows"] = 41
    (out / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ShardError, match=f"part-00000.parquet: 40 rows, {MANIFEST} says 41"):
        read_feature_table(out)


# ----------------------------------------------------------------------------------- validation


def test_valid_directory_has_no_problems_and_cli_exits_zero(good_dir):
    out = good_dir[0]
    assert validate_shards(out) == []
    r = CliRunner().invoke(app, ["shards", "validate", str(out)])
    assert r.exit_code == 0, r.output
    assert "valid" in r.output and "100 rows" in r.output


def test_wrong_d(good_dir):
    out, ids, x, _ = good_dir
    x5 = np.zeros((40, D + 1), np.float32)
    put_table(out, "part-00001.parquet", table_of(ids[40:80], x5, d=D + 1))
    assert ("d", "part-00001.parquet", None) in kinds(validate_shards(out))


def test_mixed_d_without_manifest(good_dir):
    out, ids, x, _ = good_dir
    put_table(out, "part-00001.parquet", table_of(ids[40:80], np.zeros((40, 3), np.float32), d=3))
    (out / MANIFEST).unlink()
    ks = kinds(validate_shards(out))
    assert ("manifest", MANIFEST, None) in ks and ("d", "part-00001.parquet", None) in ks


def test_nan_and_inf_rows(good_dir):
    out, ids, x, _ = good_dir
    bad = x[:40].copy()
    bad[3, 0], bad[17, 3] = np.nan, -np.inf
    put_table(out, "part-00000.parquet", table_of(ids[:40], bad))
    ks = kinds(validate_shards(out))
    assert {("nonfinite", "part-00000.parquet", 3), ("nonfinite", "part-00000.parquet", 17)} <= ks
    assert not any(k == "nonfinite" and r not in (3, 17) for k, _, r in ks)


def test_duplicate_ids_across_shards(good_dir):
    out, ids, x, _ = good_dir
    dup_ids = ids[80:100].copy()
    dup_ids[5] = ids[12]  # also in part-00000 row 12
    put_table(out, "part-00002.parquet", table_of(dup_ids, x[80:100]))
    ks = kinds(validate_shards(out))
    assert {("duplicate_id", "part-00000.parquet", 12), ("duplicate_id", "part-00002.parquet", 5)} <= ks


def test_missing_ids(good_dir):
    out, ids, x, _ = good_dir
    put_table(out, "part-00002.parquet", table_of(pa.array([None if i == 2 else int(v) for i, v in
                                                            enumerate(ids[80:100])], pa.int64()), x[80:100]))
    assert ("null_id", "part-00002.parquet", 2) in kinds(validate_shards(out))


def test_corrupt_missing_unlisted_and_hash(good_dir):
    out, ids, x, _ = good_dir
    (out / "part-00000.parquet").write_bytes(b"PAR1 this is not parquet")
    (out / "part-00001.parquet").unlink()
    pq.write_table(table_of(np.arange(1000, 1005), np.zeros((5, D), np.float32)), out / "extra.parquet")
    # a valid file with the right row count but different content than when the manifest was written
    t = pq.read_table(out / "part-00002.parquet")
    pq.write_table(t.set_column(0, "id", pa.array(np.arange(5000, 5020))), out / "part-00002.parquet")
    ks = kinds(validate_shards(out))
    assert ("corrupt", "part-00000.parquet", None) in ks
    assert ("missing", "part-00001.parquet", None) in ks
    assert ("unlisted", "extra.parquet", None) in ks
    assert ("hash", "part-00002.parquet", None) in ks
    assert ("corrupt", "part-00002.parquet", None) not in ks


def test_wrong_column_types(good_dir):
    out, ids, x, _ = good_dir
    bad = pa.table({"id": pa.array(ids[:40]),
                    "feature": pa.array(x[:40].astype(np.float64).tolist(), pa.list_(pa.float64())),
                    "label": pa.array([str(i) for i in range(40)])})
    put_table(out, "part-00000.parquet", bad)
    problems = [p for p in validate_shards(out) if p.file == "part-00000.parquet" and p.kind == "schema"]
    text = " ".join(p.message for p in problems)
    assert "'feature'" in text and "fixed_size_list<float32>[4]" in text and "'label'" in text
    put_table(out, "part-00001.parquet", table_of(np.array([str(i) for i in ids[40:80]]), x[40:80]))
    assert any(p.kind == "id_type" for p in validate_shards(out))


def test_cli_reports_every_problem_and_exits_one(good_dir):
    out, ids, x, _ = good_dir
    shutil.copy(out / "part-00002.parquet", out / "copy.parquet")  # unlisted AND duplicates 20 ids
    bad = x[:40].copy()
    bad[9, 0] = np.nan
    put_table(out, "part-00000.parquet", table_of(ids[:40], bad))
    (out / "part-00001.parquet").unlink()
    r = CliRunner().invoke(app, ["shards", "validate", str(out)])
    assert r.exit_code == 1
    assert "part-00000.parquet row 9: [nonfinite]" in r.output
    assert "part-00001.parquet: [missing]" in r.output
    assert "copy.parquet: [unlisted]" in r.output
    assert "copy.parquet row 0: [duplicate_id]" in r.output
    assert "part-00002.parquet row 0: [duplicate_id]" in r.output


def test_row_problems_are_capped_with_a_total(good_dir):
    out, ids, x, _ = good_dir
    put_table(out, "part-00000.parquet", table_of(ids[:40], np.full((40, D), np.nan, np.float32)))
    rows = [p for p in validate_shards(out, max_rows_reported=5) if p.kind == "nonfinite"]
    assert [p.row for p in rows] == [0, 1, 2, 3, 4, None] and "40 rows in all" in rows[-1].message


def test_shard_and_assignment_directories_open_in_common_parquet_readers(tmp_path):
    """pandas, pyarrow.dataset and DuckDB read a shard directory and an assignment directory as they
    are (the sidecars are Hive-style `_manifest.json` / `_extract_report.json`, which they skip), and
    features join to assignments by id."""
    import duckdb
    import pandas as pd
    import pyarrow.dataset as ds

    from cluster_service.bench.assign import sample_model, synthetic_model
    from cluster_service.runtime.assign_job import assign_shards

    model = synthetic_model(5, 4, seed=1)
    x, _ = sample_model(model, 300, seed=2)
    ids = np.arange(300) * 3 + 1
    write_shards(tmp_path / "shards", ids, x, labels=np.arange(300) % 5, rows_per_shard=100)
    (tmp_path / "shards" / "_extract_report.json").write_text("{}")  # as extraction leaves it
    assert (tmp_path / "shards" / MANIFEST).is_file() and MANIFEST.startswith("_")
    model.save(tmp_path / "model")
    assert not assign_shards(tmp_path / "model", tmp_path / "shards", tmp_path / "assigned", use_ray=False).failed

    feats = pd.read_parquet(tmp_path / "shards")
    assert len(feats) == 300 and set(feats.columns) >= {"id", "feature", "label"}
    assigned = ds.dataset(tmp_path / "assigned", format="parquet").to_table().to_pandas()
    assert len(assigned) == 300 and set(assigned.columns) >= {"id", "cluster", "log_prob", "margin"}
    assert ds.dataset(tmp_path / "shards", format="parquet").count_rows() == 300
    joined = duckdb.sql(
        f"SELECT f.id, f.label, a.cluster FROM read_parquet('{tmp_path / 'shards'}/*.parquet') f "
        f"JOIN read_parquet('{tmp_path / 'assigned'}/*.parquet') a USING (id) ORDER BY f.id").df()
    assert len(joined) == 300 and (joined["id"].to_numpy() == ids).all()


def test_directories_with_the_old_manifest_name_still_load(tmp_path):
    from cluster_service.io.shards import LEGACY_MANIFEST, load_manifest, manifest_path

    x = np.random.default_rng(0).standard_normal((50, 3))
    write_shards(tmp_path / "old", np.arange(50), x, rows_per_shard=25)
    (tmp_path / "old" / MANIFEST).rename(tmp_path / "old" / LEGACY_MANIFEST)
    assert manifest_path(tmp_path / "old").name == LEGACY_MANIFEST
    assert load_manifest(tmp_path / "old")[0]["rows"] == 50
    np.testing.assert_array_equal(read_feature_table(tmp_path / "old").features, x.astype(np.float32))
    assert validate_shards(tmp_path / "old") == []
