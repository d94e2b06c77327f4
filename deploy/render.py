"""Render the Kubernetes manifests from deploy/values.yaml (every user-set parameter lives there).

    .venv/bin/python deploy/render.py deploy/values.yaml --out deploy/manifests

writes
    namespace.yaml    Namespace
    storage.yaml      the shared ReadWriteMany volume (/data on every Ray pod)
    postgres.yaml     PostgreSQL for MLflow's backend store: PVC, Deployment, Service
    mlflow.yaml       MLflow tracking server: Deployment, Service (artifacts proxied to the object store)
    job-config.yaml   ConfigMap: the imagenet job config (configs/imagenet-8gpu.yaml with values' paths
                      and GPU counts), validated here as the job itself will validate it
    raycluster.yaml   KubeRay RayCluster (head + GPU worker group) for `cluster-service submit`
    rayjob.yaml       KubeRay RayJob: its own cluster of the same shape, runs `python -m jobs.imagenet`

Manifests are built as data and dumped with yaml.safe_dump (no text templating, no quoting traps).
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
JOB_CONFIG_MOUNT = "/etc/cluster-service"
JOB_CONFIG_FILE = "imagenet.yaml"
DATA_MOUNT = "/data"
POSTGRES_SECRET = "mlflow-postgres"  # created by the user (deploy/README.md); key: password
REQUIRED = {
    "namespace": str, "image": str, "imagePullPolicy": str, "rayVersion": str,
    "storage": {"className": str, "size": str},
    "gpu": {"pods": int, "perPod": int, "cpusPerGpu": int, "memoryPerGpu": str, "resourceName": str,
            "nodeSelector": dict},
    "head": {"cpus": int, "memory": str},
    "mlflow": {"artifactRoot": str, "s3EndpointUrl": str, "credentialsSecret": str, "experiment": str},
    "postgres": {"image": str, "storageClassName": str, "size": str},
    "job": {"name": str, "config": str, "train": str, "val": str, "checkpoint": str, "workDir": str,
            "ttlSecondsAfterFinished": int},
}
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti)?$")


class ValuesError(ValueError):
    """A missing or mistyped key in the values file; the message names it."""


def load_values(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValuesError(f"{path}: values file not found")
    values = yaml.safe_load(path.read_text()) or {}
    _check(values, REQUIRED, "", path)
    for key in ("storage.size", "gpu.memoryPerGpu", "head.memory", "postgres.size"):
        sec, name = key.split(".")
        if not _QUANTITY.match(values[sec][name]):
            raise ValuesError(f"{path}: {key} must be a quantity like 48Gi, got {values[sec][name]!r}")
    for key in ("gpu.pods", "gpu.perPod", "gpu.cpusPerGpu", "head.cpus"):
        sec, name = key.split(".")
        if values[sec][name] < 1:
            raise ValuesError(f"{path}: {key} must be >= 1, got {values[sec][name]}")
    return values


def _check(values: Any, schema: dict, prefix: str, path: Path) -> None:
    if not isinstance(values, dict):
        raise ValuesError(f"{path}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    unknown = sorted(set(values) - set(schema))
    if unknown:
        raise ValuesError(f"{path}: unknown key(s) {', '.join(prefix + u for u in unknown)}")
    for key, kind in schema.items():
        if key not in values:
            raise ValuesError(f"{path}: missing key {prefix}{key}")
        if isinstance(kind, dict):
            _check(values[key], kind, f"{prefix}{key}.", path)
        elif not isinstance(values[key], kind) or isinstance(values[key], bool) and kind is not bool:
            raise ValuesError(f"{path}: {prefix}{key} must be {kind.__name__}, got {values[key]!r}")


def _times(quantity: str, n: int) -> str:
    """'48Gi' * 8 -> '384Gi'."""
    number, unit = _QUANTITY.match(quantity).groups()
    total = float(number) * n
    return f"{int(total) if total.is_integer() else total}{unit or ''}"


# ---- objects ----------------------------------------------------------------------------------------


def _meta(v: dict, name: str, **labels: str) -> dict:
    return {"name": name, "namespace": v["namespace"],
            "labels": {"app.kubernetes.io/part-of": "cluster-service", **labels}}


def namespace(v: dict) -> list[dict]:
    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": v["namespace"]}}]


def storage(v: dict) -> list[dict]:
    return [{"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(v, "shared-data"),
             "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": v["storage"]["className"],
                      "resources": {"requests": {"storage": v["storage"]["size"]}}}}]


def _password_env() -> dict:
    return {"name": "POSTGRES_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": POSTGRES_SECRET, "key": "password"}}}


def postgres(v: dict) -> list[dict]:
    labels = {"app.kubernetes.io/name": "postgres"}
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
           "metadata": _meta(v, "postgres-data", **labels),
           "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": v["postgres"]["storageClassName"],
                    "resources": {"requests": {"storage": v["postgres"]["size"]}}}}
    container = {
        "name": "postgres", "image": v["postgres"]["image"],
        "env": [{"name": "POSTGRES_USER", "value": "mlflow"}, {"name": "POSTGRES_DB", "value": "mlflow"},
                _password_env(), {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"}],
        "ports": [{"name": "postgres", "containerPort": 5432}],
        "readinessProbe": {"exec": {"command": ["pg_isready", "-U", "mlflow", "-d", "mlflow"]},
                           "periodSeconds": 5},
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}],
    }
    volume = {"name": "data", "persistentVolumeClaim": {"claimName": "postgres-data"}}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(v, "postgres", **labels),
        "spec": {"replicas": 1, "strategy": {"type": "Recreate"}, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [container], "volumes": [volume]}}},
    }
    service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(v, "postgres", **labels),
               "spec": {"selector": labels,
                        "ports": [{"name": "postgres", "port": 5432, "targetPort": 5432}]}}
    return [pvc, deployment, service]


def tracking_uri(v: dict) -> str:
    return f"http://mlflow.{v['namespace']}.svc.cluster.local:5000"


def mlflow(v: dict) -> list[dict]:
    labels = {"app.kubernetes.io/name": "mlflow"}
    ns = v["namespace"]
    hosts = ",".join([f"mlflow.{ns}.svc.cluster.local*", f"mlflow.{ns}.svc*", f"mlflow.{ns}*", "mlflow:*",
                      "localhost*", "127.0.0.1*"])
    env = [_password_env()]
    if v["mlflow"]["s3EndpointUrl"]:
        env.append({"name": "MLFLOW_S3_ENDPOINT_URL", "value": v["mlflow"]["s3EndpointUrl"]})
    container = {
        "name": "mlflow", "image": v["image"], "imagePullPolicy": v["imagePullPolicy"],
        "command": ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000",
                    # $(POSTGRES_PASSWORD) is expanded by Kubernetes from the env below
                    "--backend-store-uri", "postgresql://mlflow:$(POSTGRES_PASSWORD)@postgres:5432/mlflow",
                    "--artifacts-destination", v["mlflow"]["artifactRoot"], "--serve-artifacts",
                    "--allowed-hosts", hosts, "--workers", "2"],
        "env": env,
        "envFrom": [{"secretRef": {"name": v["mlflow"]["credentialsSecret"]}}],
        "ports": [{"name": "http", "containerPort": 5000}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": 5000}, "periodSeconds": 10},
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(v, "mlflow", **labels),
        "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}}},
    }
    service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(v, "mlflow", **labels),
               "spec": {"selector": labels, "ports": [{"name": "http", "port": 5000, "targetPort": 5000}]}}
    return [deployment, service]


def total_gpus(v: dict) -> int:
    return v["gpu"]["pods"] * v["gpu"]["perPod"]


def job_config(v: dict) -> dict:
    """configs/imagenet-8gpu.yaml with the values' paths and GPU counts, validated as the job will."""
    from cluster_service.ops.jobconfig import parse_job_config

    cfg = yaml.safe_load((ROOT / v["job"]["config"]).read_text())
    j, n = v["job"], total_gpus(v)
    cfg["imagenet"].update({"train": j["train"], "val": j["val"], "work_dir": j["workDir"]})
    cfg["extract"].update({"checkpoint": j["checkpoint"], "num_actors": n})
    cfg["train"].update({"workers": n, "use_gpu": True, "gpus_per_worker": 1,
                         "cpus_per_worker": max(1, v["gpu"]["cpusPerGpu"] - 2),
                         "storage_path": f"{j['workDir']}/checkpoints"})
    cfg.setdefault("tracking", {})["experiment"] = v["mlflow"]["experiment"]
    parse_job_config("imagenet", cfg)
    return cfg


def job_config_map(v: dict) -> list[dict]:
    text = "# rendered by deploy/render.py from deploy/values.yaml\n" + yaml.safe_dump(job_config(v),
                                                                                          sort_keys=False)
    return [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(v, "imagenet-job-config"),
             "data": {JOB_CONFIG_FILE: text}}]


def _ray_container(v: dict, name: str, resources: dict, head: bool) -> dict:
    mounts = [{"name": "shared-data", "mountPath": DATA_MOUNT}, {"name": "dshm", "mountPath": "/dev/shm"}]
    if head:
        mounts.append({"name": "job-config", "mountPath": JOB_CONFIG_MOUNT, "readOnly": True})
    c = {"name": name, "image": v["image"], "imagePullPolicy": v["imagePullPolicy"],
         "env": [{"name": "MLFLOW_TRACKING_URI", "value": tracking_uri(v)},
                 {"name": "CLUSTER_SERVICE_BASE_DIR", "value": DATA_MOUNT}],
         "resources": {"requests": dict(resources), "limits": dict(resources)},
         "volumeMounts": mounts}
    if head:
        c["ports"] = [{"name": "gcs", "containerPort": 6379}, {"name": "dashboard", "containerPort": 8265},
                      {"name": "client", "containerPort": 10001}]
    return c


def _volumes(head: bool) -> list[dict]:
    vols = [{"name": "shared-data", "persistentVolumeClaim": {"claimName": "shared-data"}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    if head:
        vols.append({"name": "job-config", "configMap": {"name": "imagenet-job-config"}})
    return vols


def ray_cluster_spec(v: dict) -> dict:
    """Head (no work scheduled on it: num-cpus 0) + one GPU worker group; one Ray worker per GPU."""
    g = v["gpu"]
    head_res = {"cpu": str(v["head"]["cpus"]), "memory": v["head"]["memory"]}
    worker_res = {"cpu": str(g["perPod"] * g["cpusPerGpu"]), "memory": _times(g["memoryPerGpu"], g["perPod"]),
                  g["resourceName"]: str(g["perPod"])}
    worker_pod: dict = {"containers": [_ray_container(v, "ray-worker", worker_res, head=False)],
                        "volumes": _volumes(head=False), "securityContext": {"fsGroup": 1000},
                        "tolerations": [{"key": g["resourceName"], "operator": "Exists",
                                         "effect": "NoSchedule"}]}
    if g["nodeSelector"]:
        worker_pod["nodeSelector"] = dict(g["nodeSelector"])
    return {
        "rayVersion": v["rayVersion"],
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
            "template": {"spec": {"containers": [_ray_container(v, "ray-head", head_res, head=True)],
                                  "volumes": _volumes(head=True), "securityContext": {"fsGroup": 1000}}},
        },
        "workerGroupSpecs": [{
            "groupName": "gpu", "replicas": g["pods"], "minReplicas": g["pods"], "maxReplicas": g["pods"],
            "rayStartParams": {"num-gpus": str(g["perPod"])},
            "template": {"spec": worker_pod},
        }],
    }


def raycluster(v: dict) -> list[dict]:
    return [{"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _meta(v, "cluster-service"),
             "spec": ray_cluster_spec(v)}]


def rayjob(v: dict) -> list[dict]:
    return [{
        "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _meta(v, v["job"]["name"]),
        "spec": {
            "entrypoint": f"python -m jobs.imagenet {JOB_CONFIG_MOUNT}/{JOB_CONFIG_FILE}",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": v["job"]["ttlSecondsAfterFinished"],
            "rayClusterSpec": copy.deepcopy(ray_cluster_spec(v)),
        },
    }]


FILES = {"namespace.yaml": namespace, "storage.yaml": storage, "postgres.yaml": postgres,
         "mlflow.yaml": mlflow, "job-config.yaml": job_config_map, "raycluster.yaml": raycluster,
         "rayjob.yaml": rayjob}


def render(values_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Validate the values, write one multi-document YAML file per group; return the paths."""
    v = load_values(values_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in FILES.items():
        text = "# rendered by deploy/render.py from the values file; edit the values, not this file\n"
        text += "---\n".join(yaml.safe_dump(obj, sort_keys=False) for obj in build(v))
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
        written.append(out / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("values", help="values file (deploy/values.yaml)")
    parser.add_argument("--out", required=True, help="directory for the rendered manifests")
    args = parser.parse_args(argv)
    try:
        paths = render(args.values, args.out)
    except ValueError as e:  # ValuesError, ConfigError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # cluster_service from this checkout when run as a script
    sys.exit(main())
