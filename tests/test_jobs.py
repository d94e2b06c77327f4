"""Jobs and submission: typed job configs, the entry points, and `submit` against a REAL local Ray head
(started here on loopback with its dashboard, which hosts the job server), with a sqlite MLflow store.

    config tests     every configs/*.yaml validates; bad keys/values fail with the key named
    submit tests     the fit job on generated shards through the Job Submission SDK: model, assignments,
                     MLflow run; a bad config is refused locally (nothing submitted) and by the entry
                     point itself on the cluster (exit 2 before any work)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from cluster_service.config import ConfigError
from cluster_service.ops.jobconfig import load_job_config, parse_job_config
from cluster_service.ops.pipeline import RUN_LINK_RE, run_link
from cluster_service.ops.submit import EXCLUDES, entrypoint, find_run_link, resolve_address, runtime_env

ROOT = Path(__file__).resolve().parents[1]
CONFIG_JOBS = {"laptop-smoke.yaml": "fit", "laptop-smoke-assign.yaml": "assign",
               "imagenet-8gpu.yaml": "imagenet"}
N_FEATURES, N_CLUSTERS = 4, 3
# A short schedule that still splits and merges: K goes 1 -> 3 on a well separated mixture.
FIT = {"k_init": 1, "seed": 0, "net": {"min_steps_per_epoch": 5},
       "schedule": {"epochs": 24, "warmup_epochs": 2, "subcluster_start": 2, "first_split": 5,
                    "move_period": 6, "freeze_epochs": 2, "final_epochs": 4}}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---- configs (no Ray) -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIG_JOBS))
def test_example_configs_validate(name):
    cfg = load_job_config(CONFIG_JOBS[name], ROOT / "configs" / name)
    if name == "imagenet-8gpu.yaml":  # the ImageNet run: K_init 200 on 8 GPU workers, 128-d head
        assert (cfg.fit.k_init, cfg.train.workers, cfg.train.use_gpu) == (200, 8, True)
        assert cfg.extract.extract_config().head == "proj"


def test_every_config_file_is_covered():
    assert sorted(p.name for p in (ROOT / "configs").glob("*.yaml")) == sorted(CONFIG_JOBS)


TRAIN = {"data": "d", "out": "o"}
ASSIGN = {"model": "m", "shards": "s", "out": "o"}


@pytest.mark.parametrize(("job", "data", "message"), [
    ("fit", {"train": {"data": "d", "out": "o", "wrkers": 2}}, "unknown key(s) train.wrkers"),
    ("fit", {"train": {"data": "d", "out": "o", "workers": "2"}}, "train.workers must be an integer"),
    ("fit", {"train": {"data": "d", "out": "o", "workers": 0}}, "train.workers must be >= 1"),
    ("fit", {"train": {"data": "d"}}, "train.out is required"),
    ("fit", {"fit": {}}, "missing section 'train'"),
    ("fit", {"train": TRAIN, "fit": {"prior": {"alpha": -1}}}, "fit: prior.alpha must be > 0"),
    ("fit", {"train": TRAIN, "fit": {"k_int": 3}}, "unknown key(s) k_int"),
    ("fit", {"train": TRAIN, "extract": {}}, "unknown section(s) extract for the fit job"),
    ("assign", {"assign": {**ASSIGN, "method": "fast"}}, "assign.method must be"),
    ("assign", {"assign": {**ASSIGN, "use_ray": True}}, "assign.use_ray"),
    ("extract", {"extract": {"images": "i", "out": "o", "checkpoint": "c", "head": "fc"}}, "extract.head"),
    ("extract", {"extract": {"images": "i", "out": "o", "checkpoint": "c", "batch": 8}}, "extract.batch"),
    ("imagenet", {"imagenet": {"train": "t", "val": "v", "work_dir": "w"}, "extract": {"checkpoint": "c"},
                  "train": {"data": "x"}}, "train.data is set by the imagenet job"),
    ("imagenet", {"imagenet": {"train": "t", "val": "v", "work_dir": "w"},
                  "extract": {"checkpoint": "c", "pca_dim": 64}}, "extract.pca_dim is not supported"),
    ("imagenet", {"imagenet": {"train": "t", "val": "v"}, "extract": {"checkpoint": "c"}},
     "imagenet.work_dir is required"),
    ("imagenet", {"imagenet": {"train": "t", "val": "v", "work_dir": "w", "initial_classes": 0},
                  "extract": {"checkpoint": "c"}}, "imagenet.initial_classes must be >= 1 or null"),
    ("nope", {}, "unknown job 'nope'"),
])
def test_bad_job_configs_name_the_key(job, data, message):
    with pytest.raises(ConfigError) as e:
        parse_job_config(job, data)
    assert message in str(e.value)


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{bad}: not valid YAML"):
        load_job_config("fit", bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_job_config("fit", tmp_path / "missing.yaml")


def test_submit_helpers(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address is not a job server
    assert resolve_address() == "http://127.0.0.1:8265"
    assert resolve_address("10.0.0.5:8265") == "http://10.0.0.5:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://head:8265")
    assert resolve_address() == "http://head:8265"
    # a config inside the checkout travels with it (relative path); one outside is passed absolute
    assert entrypoint("fit", ROOT / "configs" / "laptop-smoke.yaml", ROOT) == \
        "python -m jobs.fit configs/laptop-smoke.yaml"
    assert entrypoint("fit", tmp_path / "c.yaml", ROOT) == f"python -m jobs.fit {tmp_path / 'c.yaml'}"
    env = runtime_env(ROOT, {"A": "1"})
    assert {".venv", ".git", "data", "runs", "mlruns", "*.parquet"} <= set(env["excludes"]) == set(EXCLUDES)
    assert env["env_vars"]["A"] == "1" and env["env_vars"]["CLUSTER_SERVICE_BASE_DIR"] == str(Path.cwd())
    line = f"MLflow run: {run_link('http://mlf:5000', '3', 'abc123')} (run_id=abc123, tracking_uri=http://mlf:5000)"
    assert find_run_link(["noise", line]) == ("http://mlf:5000/#/experiments/3/runs/abc123", "abc123",
                                              "http://mlf:5000")
    assert RUN_LINK_RE.search(f"MLflow run: {run_link('sqlite:////x/mlflow.db', '0', 'f00')} "
                              "(run_id=f00, tracking_uri=sqlite:////x/mlflow.db)").group(1) == "runs:/f00"


def test_cli_submit_refuses_a_bad_config_before_contacting_the_cluster(tmp_path):
    """Nothing listens on the address: the config error must come first, with exit 2."""
    bad = write_yaml(tmp_path / "bad.yaml", {"train": {"data": "d", "out": "o"}, "fit": {"k_init": 0}})
    cmd = [sys.executable, "-m", "cluster_service.ops.cli", "submit", "fit", str(bad), "--address", "http://127.0.0.1:9"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "k_init must be >= 1" in r.stderr and str(bad) in r.stderr
    assert "127.0.0.1:9" not in r.stderr


# ---- scoring and the assign job (no Ray) ----------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A 3-cluster mixture, d=4, as 3 feature shards with labels."""
    from cluster_service.datasets import make_mixture
    from cluster_service.io.shards import write_shards

    x, y = make_mixture(1500, N_FEATURES, N_CLUSTERS, seed=3, separation=10.0, imbalance=1.5)
    out = tmp_path_factory.mktemp("jobs") / "shards"
    write_shards(out, np.arange(len(x)) * 7 + 11, x, y, rows_per_shard=500)  # ids not row numbers
    return out, x, y


def test_score_assignments_joins_by_id(shards, tmp_path):
    import pyarrow as pa

    from cluster_service.io.shards import list_shards
    from cluster_service.ops.pipeline import score_assignments

    shard_dir, _, y = shards
    out = tmp_path / "assign"
    out.mkdir()
    for p in list_shards(shard_dir):  # clusters = permuted labels, rows written in reverse order
        t = pq.read_table(p, columns=["id", "label"])
        cluster = (np.asarray(t.column("label")) + 1) % N_CLUSTERS
        pq.write_table(pa.table({"id": t.column("id"), "cluster": pa.array(cluster, pa.int32())}).take(
            np.arange(t.num_rows)[::-1]), out / p.name)
    s = score_assignments(out, shard_dir)
    assert (s.nmi, s.acc, s.k_found) == (pytest.approx(1.0), pytest.approx(1.0), N_CLUSTERS)
    (out / "part-00001.parquet").unlink()
    with pytest.raises(ValueError, match="no assignment for 500 id"):
        score_assignments(out, shard_dir)


# ---- a real local Ray head, jobs submitted through the Job Submission SDK -------------------------


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head` on 127.0.0.1 (2 CPUs, dashboard = job server on a free port); stopped at the end
    by its session (only the processes it started)."""
    from cluster_service.ops import local_cluster

    state = tmp_path_factory.mktemp("ray-head")
    info = local_cluster.start_ray_head(state, num_cpus=2, dashboard_port=local_cluster.free_port())
    yield info
    local_cluster.stop(state, "ray", grace_s=3)
    assert not local_cluster.status(state)


@pytest.mark.ray
def test_fit_job_through_job_submission(ray_head, shards, tmp_path):
    from mlflow import MlflowClient

    from cluster_service.ops.submit import submit
    from cluster_service.report.evaluate import score
    from cluster_service.serve.model import load_model

    shard_dir, x, y = shards
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    cfg = write_yaml(tmp_path / "fit.yaml", {"train": {"data": str(shard_dir), "out": str(run_dir),
                                                       "workers": 2, "checkpoint_every": 8},
                                             "fit": FIT, "tracking": {"experiment": "jobs-test"}})
    uri = f"sqlite:///{db}"
    logs: list[str] = []
    res = submit("fit", cfg, ray_head["dashboard"], env_vars={"MLFLOW_TRACKING_URI": uri}, working_dir=ROOT,
                 on_log=logs.append, timeout_s=400)
    assert res.status == "SUCCEEDED", "\n".join(res.logs[-40:]) + res.message
    assert logs and "fit: config" in "\n".join(logs)  # the logs were streamed while the job ran

    # the model and the assignments, in the shards' row order
    model = load_model(run_dir / "model")
    assert model.n_features == N_FEATURES and model.n_clusters == N_CLUSTERS
    a = pq.read_table(run_dir / "assignments.parquet")
    np.testing.assert_array_equal(a.column("id").to_numpy(), np.arange(len(x)) * 7 + 11)
    assert score(y, a.column("cluster").to_numpy()).nmi > 0.9

    # the MLflow run the job announced: finished, per-epoch metrics from rank 0, final K, the model
    assert res.mlflow_run_id and res.mlflow_link == f"runs:/{res.mlflow_run_id}" and res.tracking_uri == uri
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "jobs-test"
    assert run.data.params["k_init"] == "1" and run.data.params["train.workers"] == "2"
    assert run.data.params["data.n_samples"] == str(len(x))
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "n_clusters")]
    assert steps == list(range(FIT["schedule"]["epochs"]))  # once per epoch: rank 0 only
    assert run.data.metrics["final/k_found"] == N_CLUSTERS
    assert "model/model.json" in [f.path for f in client.list_artifacts(run.info.run_id, "model")]
    # as complete as a one-process fit's run: the plots, the schedule plan, config and history
    top = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "schedule_plan.txt", "history.json", "plots", "model"} <= top
    plots = {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
    assert {f"plots/{n}.png" for n in ("k_over_epochs", "cluster_sizes", "projection", "confusion_matrix")} <= plots
    assert run.data.metrics["nmi"] > 0.9  # scored against the shards' labels

    # the assign job on the fitted model (in-process entry point, local assigner)
    from jobs.assign import main as assign_main

    out = tmp_path / "assigned"
    acfg = write_yaml(tmp_path / "assign.yaml", {"assign": {"model": str(run_dir), "shards": str(shard_dir),
                                                            "out": str(out), "local": True}})
    assign_main([str(acfg)])
    from cluster_service.ops.pipeline import score_assignments

    assert score_assignments(tmp_path / "assigned", shard_dir).nmi > 0.9


@pytest.mark.ray
def test_imagenet_job_through_cli_submit(ray_head, imagenet_tree, tmp_path):
    """`cluster-service submit imagenet CONFIG` against the local head: the whole chain runs as a Ray job
    (extract both splits, 2-worker fit, assign val, score) and the CLI prints the status and the run."""
    import json

    from conftest import imagenet_job_config
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = write_yaml(tmp_path / "imagenet.yaml", imagenet_job_config(imagenet_tree, tmp_path / "work"))
    cmd = [sys.executable, "-m", "cluster_service.ops.cli", "submit", "imagenet", str(cfg),
           "--address", ray_head["dashboard"], "--env", f"MLFLOW_TRACKING_URI={uri}"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    shown = r.stdout + r.stderr  # logs on stdout, the status line on the console (stderr)
    assert "SUCCEEDED" in shown and "imagenet: val K found" in shown
    scores = json.loads((tmp_path / "work" / "scores.json").read_text())
    assert scores["assign"]["rows"] == len(imagenet_tree["val_ids"]) and scores["assign"]["failed"] == 0
    assert f"runs:/{scores['mlflow_run']}" in shown
    run = MlflowClient(tracking_uri=uri).get_run(scores["mlflow_run"])
    assert run.info.status == "FINISHED" and run.data.metrics["val/acc"] == pytest.approx(scores["val"]["acc"])


@pytest.mark.ray
def test_entry_point_rejects_bad_config_on_the_cluster(ray_head, shards, tmp_path):
    """Submitted raw (no local check), the job itself refuses the config before any work: exit 2, the
    key named in the log, no run directory."""
    from ray.job_submission import JobSubmissionClient

    from cluster_service.ops.submit import _wait_terminal
    from cluster_service.ops.submit import runtime_env as env

    run_dir = tmp_path / "run"
    train = {"data": str(shards[0]), "out": str(run_dir), "workers": 2}
    bad = write_yaml(tmp_path / "bad.yaml", {"train": train, "fit": {"schedule": {"epochs": "many"}}})
    client = JobSubmissionClient(ray_head["dashboard"])
    job_id = client.submit_job(entrypoint=f"python -m jobs.fit {bad}", runtime_env=env(ROOT))
    info = _wait_terminal(client, job_id, 120)
    logs = client.get_job_logs(job_id)
    assert info.status.value == "FAILED", logs
    assert "exit code 2" in (info.message or "") or "code 2" in (info.message or ""), info.message
    assert "error: invalid fit job config" in logs and "schedule.epochs must be an integer" in logs
    assert not run_dir.exists()


@pytest.mark.ray
def test_submit_refuses_bad_config_and_sends_nothing(ray_head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    from cluster_service.ops.submit import submit

    client = JobSubmissionClient(ray_head["dashboard"])
    before = len(client.list_jobs())
    bad = write_yaml(tmp_path / "bad.yaml", {"train": {"data": "d", "out": "o", "workerz": 2}})
    with pytest.raises(ConfigError, match="unknown key.*train.workerz"):
        submit("fit", bad, ray_head["dashboard"], working_dir=ROOT)
    assert len(client.list_jobs()) == before
