"""The reliability matrix (docs/RELIABILITY.md): bad input is refused before any training with a message
naming the file and row; degenerate data never puts NaN into the model; faults never leave half-written
outputs and a re-run succeeds. Distributed faults (killed worker, resume) and MLflow outages are tested in
tests/test_distributed.py and tests/test_tracking.py; config errors in tests/test_config.py."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster_service.config import FitConfig
from cluster_service.datasets import make_mixture
from cluster_service.io.shards import MANIFEST, write_shards
from cluster_service.ops.cli import main
from cluster_service.serve.model import load_model
from cluster_service.train.fit import fit

D = 4
# A short schedule with splits at 5, 9, 13 and merges at 7, 11, 15: K can change several times.
SMALL = {"schedule.epochs": 20, "schedule.warmup_epochs": 2, "schedule.subcluster_start": 3,
         "schedule.first_split": 5, "schedule.move_period": 4, "schedule.freeze_epochs": 1,
         "schedule.final_epochs": 4, "net.min_steps_per_epoch": 3, "net.cluster_hidden": 32,
         "net.sub_hidden": 16, "net.batch_size": 256}


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`cluster-service ARGS` in this process, through the real entry point (main: error -> exit 2)."""
    monkeypatch.setattr("sys.argv", ["cluster-service", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# ------------------------------------------------------------------------------------ bad shards


def _relist(shard_dir: Path, name: str) -> None:
    """Make _manifest.json agree with a rewritten shard (rows, sha256), so only the content is bad."""
    m = json.loads((shard_dir / MANIFEST).read_text())
    path = shard_dir / name
    for s in m["shards"]:
        if s["name"] == name:
            s["rows"] = pq.read_metadata(path).num_rows
            s["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (shard_dir / MANIFEST).write_text(json.dumps(m))


def _rewrite(shard_dir: Path, name: str, edit) -> None:
    t = pq.read_table(shard_dir / name)
    pq.write_table(edit(t), shard_dir / name)
    _relist(shard_dir, name)


def _features(x: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).reshape(-1)), x.shape[1])


def _set(t: pa.Table, column: str, values) -> pa.Table:
    return t.set_column(t.schema.get_field_index(column), column, values)


def _with_feature_row(t: pa.Table, row: int, value: float) -> pa.Table:
    x = np.array(t.column("feature").to_pylist(), np.float32)
    x[row, 1] = value
    return _set(t, "feature", _features(x))


def _cut(path: Path, keep: float) -> None:
    b = path.read_bytes()
    path.write_bytes(b[: int(len(b) * keep)])


def _scramble_middle(path: Path) -> None:
    b = bytearray(path.read_bytes())
    for i in range(100, len(b) // 2):
        b[i] ^= 0x5A
    path.write_bytes(bytes(b))


P0, P1, P2 = "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"

# case -> (how to break a 3-shard directory of 100 rows each, what the error must say)
BAD_SHARDS = {
    "nan_row": (lambda s: _rewrite(s, P1, lambda t: _with_feature_row(t, 7, np.nan)),
                [f"{P1} row 7", "NaN or Inf"]),
    "inf_row": (lambda s: _rewrite(s, P2, lambda t: _with_feature_row(t, 0, -np.inf)),
                [f"{P2} row 0", "NaN or Inf"]),
    "null_feature": (lambda s: _rewrite(s, P1, lambda t: _set(t, "feature", pa.array(
        [None if i == 4 else v for i, v in enumerate(t.column("feature").to_pylist())],
        pa.list_(pa.float32(), D)))), [P1, "not a readable Parquet file"]),  # pyarrow refuses null lists
    "wrong_d": (lambda s: _rewrite(s, P1, lambda t: _set(t, "feature", _features(np.zeros((100, D + 1))))),
                [P1, "feature dimension 5", "d=4"]),
    "mixed_d": (lambda s: _rewrite(s, P2, lambda t: _set(t, "feature", _features(np.zeros((100, D - 2))))),
                [P2, "feature dimension 2", "d=4"]),
    "empty_shard": (lambda s: _rewrite(s, P1, lambda t: t.slice(0, 0)), [P1, "0 rows"]),
    "zero_byte_file": (lambda s: (s / P1).write_bytes(b""), [P1, "not a readable Parquet file"]),
    "duplicate_ids": (lambda s: _rewrite(s, P2, lambda t: _set(t, "id", pa.array(
        np.r_[np.arange(200, 205), 12, np.arange(206, 300)]))),
        ["id 12 occurs more than once", f"{P0} row 12", f"{P2} row 5", "ids must be unique"]),
    "null_id": (lambda s: _rewrite(s, P0, lambda t: _set(t, "id", pa.array(
        [None if i == 2 else i for i in range(100)], pa.int64()))), [f"{P0} row 2", "id is null"]),
    "mixed_id_types": (lambda s: _rewrite(s, P1, lambda t: _set(t, "id", pa.array(
        [f"img-{i}" for i in range(100, 200)]))), ["int64 in some shards and string in others"]),
    "truncated_parquet": (lambda s: _cut(s / P1, 0.5), [P1, "not a readable Parquet file"]),
    "corrupt_parquet": (lambda s: _scramble_middle(s / P2), [P2, "not a readable Parquet file"]),
    "missing_from_disk": (lambda s: (s / P1).unlink(), [P1, f"listed in {MANIFEST} but missing"]),
    "extra_to_manifest": (lambda s: shutil.copy(s / P1, s / "part-00009.parquet"),
                          ["part-00009.parquet", f"not listed in {MANIFEST}"]),
    "rows_differ_from_manifest": (lambda s: pq.write_table(pq.read_table(s / P1).slice(0, 60), s / P1),
                                  [P1, f"60 rows, {MANIFEST} says 100"]),
    "no_manifest": (lambda s: (s / MANIFEST).unlink(), [MANIFEST, "missing"]),
    "feature_float64": (lambda s: _rewrite(s, P0, lambda t: _set(t, "feature", pa.array(
        np.zeros((100, D)).tolist(), pa.list_(pa.float64(), D)))),
        [P0, "column 'feature'", "expected fixed_size_list<float32>[4]"]),
    "id_float": (lambda s: _rewrite(s, P0, lambda t: _set(t, "id", pa.array(np.arange(100.0)))),
                 [f"{P0}: [schema] column 'id' is double", "expected int64 or string"]),
    "label_string": (lambda s: _rewrite(s, P1, lambda t: _set(t, "label", pa.array(["cat"] * 100))),
                     [P1, "column 'label' is string", "expected int64"]),
    "label_negative": (lambda s: _rewrite(s, P1, lambda t: _set(t, "label", pa.array(
        np.where(np.arange(100) == 3, -2, 1)))), [f"{P1} row 3", "label -2 is negative"]),
}


@pytest.fixture
def shard_dir(tmp_path) -> Path:
    """3 shards x 100 rows, d=4, int ids 0..299, labels."""
    x, y = make_mixture(300, D, 3, seed=0)
    out = tmp_path / "shards"
    write_shards(out, np.arange(300), x, labels=y, rows_per_shard=100)
    return out


@pytest.mark.parametrize("case", list(BAD_SHARDS))
def test_bad_shard_is_refused_before_training_naming_file_and_row(case, shard_dir, tmp_path, monkeypatch,
                                                                   capsys):
    """`cluster-service fit SHARDS_DIR`: exit 2, the message names the file (and row) and what was
    expected; no training step ran and no run directory was created."""
    break_it, words = BAD_SHARDS[case]
    break_it(shard_dir)

    def no_training(*a, **k):
        raise AssertionError("training started on bad input")

    monkeypatch.setattr("cluster_service.train.fit.fit", no_training)
    run = tmp_path / "run"
    code, text = run_cli(monkeypatch, capsys, "fit", str(shard_dir), "--out", str(run), "--no-tracking",
                         "--quiet")
    assert code == 2, text
    assert "error:" in text
    for w in words:
        assert w in text, f"{w!r} not in {text!r}"
    assert not run.exists()


def test_validator_reports_the_new_cases(shard_dir):
    """`shards validate` (the full check) lists empty shards and negative labels too."""
    from cluster_service.io.shard_validation import validate_shards

    BAD_SHARDS["label_negative"][0](shard_dir)
    _rewrite(shard_dir, P2, lambda t: t.slice(0, 0))
    found = {(p.kind, p.file, p.row) for p in validate_shards(shard_dir)}
    assert ("label", P1, 3) in found and ("empty", P2, None) in found


NPZ_CASES = {
    "nan": (lambda p: np.savez(p, X=np.where(np.arange(40)[:, None] == 9, np.nan, np.ones((40, 3)))),
            ["row 9", "NaN or Inf"]),
    "one_dimensional": (lambda p: np.savez(p, X=np.ones(40)), ["expected a 2-D array"]),
    "no_X": (lambda p: np.savez(p, Y=np.ones((40, 3))), ["expected an array named X"]),
    "labels_wrong_length": (lambda p: np.savez(p, X=np.ones((40, 3)), y=np.ones(39)),
                            ["labels have shape (39,)", "expected (40,)"]),
    "not_numeric": (lambda p: np.savez(p, X=np.array([["a", "b"]] * 40)), ["expected numeric features"]),
    "too_few_rows": (lambda p: np.savez(p, X=np.ones((1, 3))), ["1 rows", "at least 2"]),
    "corrupt_file": (lambda p: Path(p).write_bytes(b"PK\x03\x04 not a zip"), ["not a readable .npz"]),
    "empty_file": (lambda p: Path(p).write_bytes(b""), ["empty file (0 bytes)"]),  # numpy: a bare EOFError
}


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_bad_array_file_is_refused_naming_file(case, tmp_path, monkeypatch, capsys):
    path = tmp_path / "data.npz"
    NPZ_CASES[case][0](path)
    code, text = run_cli(monkeypatch, capsys, "fit", str(path), "--out", str(tmp_path / "run"),
                         "--no-tracking", "--quiet")
    assert code == 2, text
    assert "data.npz" in text
    for w in NPZ_CASES[case][1]:
        assert w in text, f"{w!r} not in {text!r}"
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ degenerate data


def assert_sound(res, x: np.ndarray) -> None:
    """No NaN/Inf anywhere in the model or outputs; K >= 1 throughout; the exported model reproduces
    the training assignments; covariances are SPD."""
    m = res.model
    for name, a in [("log_weights", m.log_weights), ("means", m.means), ("chol", m.chol),
                    ("prior.mean", m.prior["mean"]), ("prior.psi", m.prior["psi"]),
                    *((f"net.{k}", v) for k, v in m.net.items())]:
        assert np.isfinite(a).all(), f"non-finite {name}"
    assert m.n_clusters >= 1 and all(r.n_clusters >= 1 for r in res.history)
    assert all(np.isfinite(r.log_marginal) and np.isfinite(r.loss_cluster) for r in res.history)
    assert len(res.history) <= SMALL["schedule.epochs"] and res.history[-1].stopped  # cap or early stop, said
    assert np.isfinite(res.log_prob).all() and res.clusters.min() >= 0 and res.clusters.max() < m.n_clusters
    assert (np.linalg.eigvalsh(m.covariances) > 0).all()
    assert abs(np.logaddexp.reduce(m.log_weights)) < 1e-9
    clusters, _ = m.predict(x)
    assert (clusters == res.clusters).mean() > 0.999


def _degenerate(case: str) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(0)
    if case == "empty_clusters":  # k_init 8 > 3 distinct points: k-means leaves duplicate/empty centroids
        return np.repeat(rng.standard_normal((3, 8)) * 5, 20, axis=0), 8
    if case == "clusters_of_1_to_3_points":  # far away, each its own k-means cluster at the start
        x, _ = make_mixture(600, D, 3, seed=1)
        tiny = [np.full((1, D), 40.0), -40 + rng.standard_normal((2, D)),
                np.array([[40, -40, 40, -40.0]]) + rng.standard_normal((3, D))]
        return np.concatenate([x, *tiny]), 6
    if case == "duplicated_points":
        x, _ = make_mixture(300, 6, 4, seed=2)
        return np.repeat(x, 5, axis=0), 1
    if case == "all_points_identical":
        return np.ones((50, 5)), 2
    if case == "rank_deficient_cluster":  # one cluster on a line in 8-d
        line = rng.standard_normal((200, 1)) * rng.standard_normal((1, 8)) * 3 + 30
        x, _ = make_mixture(400, 8, 2, seed=3)
        return np.concatenate([line, x]), 3
    if case == "d_greater_than_n_k":  # d = 32, about 30 points per cluster
        x, _ = make_mixture(90, 32, 3, seed=4, separation=12)
        return x, 3
    raise KeyError(case)


@pytest.mark.parametrize("case", ["empty_clusters", "clusters_of_1_to_3_points", "duplicated_points",
                                  "all_points_identical", "rank_deficient_cluster", "d_greater_than_n_k"])
def test_degenerate_data_finishes_with_a_finite_model(case):
    x, k = _degenerate(case)
    x = x.astype(np.float32)
    res = fit(x, FitConfig().replace(k_init=k, **SMALL))
    assert_sound(res, x)
    if case == "empty_clusters":
        assert res.history[0].n_clusters <= 3  # duplicate k-means centroids pruned at once
    if case == "all_points_identical":
        assert res.n_clusters == 1
    if case == "duplicated_points":  # copies of a point are assigned together
        assert (res.clusters.reshape(-1, 5) == res.clusters[::5, None]).all()


def test_feature_scale_does_not_change_k_or_assignments():
    """1e-6 and 1e6 times the data: the same K and the same assignments as at scale 1 (the engine
    centres the data, the prior is data-scaled and the nets see x / data scale)."""
    x, _ = make_mixture(1200, D, 4, seed=5)
    ref = fit(x, FitConfig().replace(**SMALL))
    assert_sound(ref, x)
    assert len({r.n_clusters for r in ref.history}) > 1, "K must change in the reference run"
    for scale in (1e-6, 1e6):
        xs = (x.astype(np.float64) * scale).astype(np.float32)
        res = fit(xs, FitConfig().replace(**SMALL))
        assert_sound(res, xs)
        assert [r.n_clusters for r in res.history] == [r.n_clusters for r in ref.history], scale
        np.testing.assert_array_equal(res.clusters, ref.clusters)
        np.testing.assert_allclose(res.model.means / scale, ref.model.means, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ faults


def _enospc_after_partial_write(real_write, which: str):
    """A writer that writes part of its output, then fails as a full disk would."""

    def write(*args, **kwargs):
        target = Path(args[1] if len(args) > 1 else args[0])
        if which in target.name or which in str(target.parent):
            with open(target, "wb") as f:
                f.write(b"PAR1 half a file")
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real_write(*args, **kwargs)

    return write


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory) -> Path:
    x, y = make_mixture(400, D, 3, seed=6)
    path = tmp_path_factory.mktemp("data") / "mix.npz"
    np.savez(path, X=x, y=y)
    return path


def _leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.rglob("*") if ".tmp" in p.name or ".old" in p.name)


@pytest.mark.parametrize("fails", ["model", "assignments"])
def test_disk_full_leaves_no_half_written_output_and_a_rerun_succeeds(fails, small_npz, tmp_path,
                                                                       monkeypatch, capsys):
    import cluster_service.io.atomic as data_mod

    run = tmp_path / "run"
    args = ("fit", str(small_npz), "--out", str(run), "--no-tracking", "--quiet", "--epochs", "8",
            "--set", "net.min_steps_per_epoch=2")
    with monkeypatch.context() as m:
        if fails == "model":  # np.savez of arrays.npz inside the model's temporary directory
            m.setattr(np, "savez", _enospc_after_partial_write(np.savez, ".model.tmp"))
        else:
            m.setattr(data_mod.pq, "write_table", _enospc_after_partial_write(pq.write_table, "assignments"))
        with pytest.raises(OSError) as err:
            run_cli(m, capsys, *args)
    assert err.value.errno == errno.ENOSPC
    assert _leftovers(run) == []
    assert not (run / "assignments.parquet").exists() and not (run / "summary.json").exists()
    if fails == "model":
        assert not (run / "model").exists()
    else:
        load_model(run / "model")  # written before, complete

    code, text = run_cli(monkeypatch, capsys, *args)
    assert code == 0, text
    model = load_model(run / "model")
    table = pq.read_table(run / "assignments.parquet")
    assert table.num_rows == 400 and table.column("cluster").to_numpy().max() < model.n_clusters
    assert json.loads((run / "summary.json").read_text())["k_found"] == model.n_clusters
    assert _leftovers(run) == []


def test_failed_model_overwrite_keeps_the_previous_model(tmp_path, monkeypatch):
    x, _ = make_mixture(300, D, 2, seed=7)
    res = fit(x, FitConfig().replace(**SMALL))
    res.model.save(tmp_path / "model")
    before = (tmp_path / "model" / "arrays.npz").read_bytes()
    monkeypatch.setattr(np, "savez", _enospc_after_partial_write(np.savez, ".model.tmp"))
    with pytest.raises(OSError):
        res.model.save(tmp_path / "model")
    assert (tmp_path / "model" / "arrays.npz").read_bytes() == before
    assert load_model(tmp_path / "model").n_clusters == res.n_clusters
    assert _leftovers(tmp_path) == []


def test_disk_full_while_writing_a_checkpoint_registers_no_checkpoint(monkeypatch):
    """Ray Train only sees a checkpoint after it is completely written: a failing torch.save raises out
    of the worker (Ray Train then restarts from the previous checkpoint, see test_distributed) and
    nothing is reported; the temporary checkpoint directory is removed."""
    import ray.train
    import torch

    from cluster_service.runtime import trainer
    from cluster_service.train.engine import Engine

    x, _ = make_mixture(200, D, 2, seed=8)
    engine = Engine(FitConfig().replace(**SMALL), torch.from_numpy(x.astype(np.float64)))
    engine.initialize()
    reported, dirs = [], []

    def fake_save(obj, path, *a, **k):
        dirs.append(Path(path).parent)
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ray.train, "report", lambda *a, **k: reported.append((a, k)))
    monkeypatch.setattr(trainer.torch, "save", fake_save)
    with pytest.raises(OSError):
        trainer.report_checkpoint({"epoch": 0}, engine, [], rank=0)
    assert reported == [] and dirs and not dirs[0].exists()
