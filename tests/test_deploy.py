"""Kubernetes deployment: manifests rendered from deploy/values.yaml, core objects validated against the
Kubernetes schema (kubernetes-validate, strict: unknown fields fail), KubeRay objects against a typed
model of the fields we use, and the links between them (GPU counts, volumes, services, job config)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Literal

import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from cluster_service.ops.jobconfig import parse_job_config

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.30.0"
_spec = importlib.util.spec_from_file_location("deploy_render", ROOT / "deploy" / "render.py")
render = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render)


# ---- a typed model of the KubeRay fields the manifests use (ray.io/v1) ---------------------------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Metadata(Strict):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    namespace: str
    labels: dict[str, str] = {}


class PodTemplate(Strict):
    spec: dict  # validated separately against the Kubernetes PodSpec schema


class HeadGroupSpec(Strict):
    rayStartParams: dict[str, StrictStr]  # KubeRay: map[string]string
    template: PodTemplate


class WorkerGroupSpec(Strict):
    groupName: str
    replicas: int = Field(ge=0)
    minReplicas: int = Field(ge=0)
    maxReplicas: int = Field(ge=1)
    rayStartParams: dict[str, StrictStr]
    template: PodTemplate


class RayClusterSpec(Strict):
    rayVersion: str = Field(pattern=r"^\d+\.\d+\.\d+$")
    headGroupSpec: HeadGroupSpec
    workerGroupSpecs: list[WorkerGroupSpec] = Field(min_length=1)


class RayCluster(Strict):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayCluster"]
    metadata: Metadata
    spec: RayClusterSpec


class RayJobSpec(Strict):
    entrypoint: str = Field(pattern=r"^python -m jobs\.imagenet \S+\.yaml$")
    shutdownAfterJobFinishes: bool
    ttlSecondsAfterFinished: int = Field(ge=0)
    rayClusterSpec: RayClusterSpec


class RayJob(Strict):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayJob"]
    metadata: Metadata
    spec: RayJobSpec


# ---- helpers --------------------------------------------------------------------------------------


def load_dir(out: Path) -> dict[str, list[dict]]:
    return {p.name: list(yaml.safe_load_all(p.read_text())) for p in sorted(out.glob("*.yaml"))}


def objects(docs: dict[str, list[dict]]) -> list[dict]:
    return [o for objs in docs.values() for o in objs]


def write_values(tmp_path: Path, **changes) -> Path:
    v = yaml.safe_load((ROOT / "deploy" / "values.yaml").read_text())
    for dotted, value in changes.items():
        node = v
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(v))
    return path


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("manifests")
    render.render(ROOT / "deploy" / "values.yaml", out)
    return load_dir(out)


def pod_specs(cluster_spec: RayClusterSpec) -> list[dict]:
    workers = [w.template.spec for w in cluster_spec.workerGroupSpecs]
    return [cluster_spec.headGroupSpec.template.spec, *workers]


# ---- tests ----------------------------------------------------------------------------------------


def test_render_writes_every_group(rendered):
    assert sorted(rendered) == sorted(render.FILES)
    kinds = sorted(o["kind"] for o in objects(rendered))
    assert kinds == sorted(["Namespace", "PersistentVolumeClaim", "PersistentVolumeClaim", "Deployment",
                            "Deployment", "Service", "Service", "ConfigMap", "RayCluster", "RayJob"])


def test_core_objects_pass_the_kubernetes_schema(rendered):
    for obj in objects(rendered):
        if obj["apiVersion"].startswith("ray.io/"):
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # raises with the failing path


def test_schema_validation_catches_a_broken_object(rendered):
    """The validator is not a no-op: a misspelt field and a bad type are caught."""
    dep = next(o for o in rendered["mlflow.yaml"] if o["kind"] == "Deployment")
    bad = yaml.safe_load(yaml.safe_dump(dep))
    bad["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = yaml.safe_load(yaml.safe_dump(dep))
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "5000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_ray_objects_match_the_typed_model_and_pod_schema(rendered):
    cluster = RayCluster.model_validate(rendered["raycluster.yaml"][0])
    job = RayJob.model_validate(rendered["rayjob.yaml"][0])
    assert job.spec.rayClusterSpec == cluster.spec  # the job's own cluster has the same shape
    for spec in pod_specs(cluster.spec):  # pod templates: the Kubernetes PodTemplate schema
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": {"spec": spec}}, K8S_VERSION, strict=True)
    with pytest.raises(ValueError, match="rayStartParams"):  # KubeRay wants strings
        bad = yaml.safe_load(yaml.safe_dump(rendered["raycluster.yaml"][0]))
        bad["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 8
        RayCluster.model_validate(bad)


def test_gpu_counts_volumes_services_and_job_config_agree(rendered):
    values = render.load_values(ROOT / "deploy" / "values.yaml")
    job = RayJob.model_validate(rendered["rayjob.yaml"][0])
    spec = job.spec.rayClusterSpec
    gpus = 0
    for w in spec.workerGroupSpecs:
        (c,) = w.template.spec["containers"]
        per_pod = int(c["resources"]["limits"]["nvidia.com/gpu"])
        assert w.rayStartParams["num-gpus"] == str(per_pod) and w.minReplicas <= w.replicas <= w.maxReplicas
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in w.template.spec[
            "tolerations"]
        gpus += per_pod * w.replicas
    assert gpus == values["gpu"]["pods"] * values["gpu"]["perPod"]
    assert spec.headGroupSpec.rayStartParams["num-cpus"] == "0"  # no work on the head

    # the job's config: mounted from the ConfigMap, a valid imagenet config, one worker/actor per GPU
    cm = rendered["job-config.yaml"][0]
    mount_path, file_name = job.spec.entrypoint.split()[-1].rsplit("/", 1)
    head = spec.headGroupSpec.template.spec
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == mount_path)
    vol = next(v for v in head["volumes"] if v["name"] == mount["name"])
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    cfg = parse_job_config("imagenet", yaml.safe_load(cm["data"][file_name]))
    assert cfg.train.workers == gpus and cfg.extract.options["num_actors"] == gpus and cfg.train.use_gpu
    assert cfg.fit.k_init == 200 and cfg.imagenet.work_dir.startswith("/data/")

    # every pod volume claim exists; every mount has a volume; MLflow URI points at the Service
    claims = {o["metadata"]["name"] for o in objects(rendered) if o["kind"] == "PersistentVolumeClaim"}
    services = {o["metadata"]["name"]: o for o in objects(rendered) if o["kind"] == "Service"}
    for pod in pod_specs(spec):
        names = {v["name"] for v in pod["volumes"]}
        pvcs = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                if "persistentVolumeClaim" in v}
        assert pvcs <= claims
        (c,) = pod["containers"]
        assert {m["name"] for m in c["volumeMounts"]} <= names
        env = {e["name"]: e.get("value") for e in c["env"]}
        host, port = re.match(r"http://([a-z0-9-]+)\.[^:]+:(\d+)$", env["MLFLOW_TRACKING_URI"]).groups()
        assert host in services and int(port) in [p["port"] for p in services[host]["spec"]["ports"]]

    # MLflow: PostgreSQL backend (service name + port), object-store artifact root, password from a Secret
    dep = next(o for o in rendered["mlflow.yaml"] if o["kind"] == "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    cmd = c["command"]
    backend = cmd[cmd.index("--backend-store-uri") + 1]
    assert backend.startswith("postgresql://") and "@postgres:5432/" in backend
    assert "$(POSTGRES_PASSWORD)" in backend and "postgres" in services
    assert cmd[cmd.index("--artifacts-destination") + 1] == values["mlflow"]["artifactRoot"]
    assert any(e["name"] == "POSTGRES_PASSWORD" and "secretKeyRef" in e["valueFrom"] for e in c["env"])


def test_user_parameters_live_in_the_values_file(tmp_path):
    values = write_values(tmp_path, image="registry.example/cs:1.2", storage__className="cephfs",
                          gpu__pods=2, gpu__perPod=4, mlflow__artifactRoot="gs://b/mlflow")
    out = tmp_path / "out"
    render.main([str(values), "--out", str(out)])
    docs = load_dir(out)
    text = "\n".join(p.read_text() for p in out.glob("*.yaml"))
    assert "your-org" not in text and "your-bucket" not in text
    job = RayJob.model_validate(docs["rayjob.yaml"][0])
    (w,) = job.spec.rayClusterSpec.workerGroupSpecs
    assert (w.replicas, w.template.spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == (2, "4")
    assert w.template.spec["containers"][0]["resources"]["limits"]["memory"] == "192Gi"  # 4 x 48Gi
    assert {c["image"] for p in pod_specs(job.spec.rayClusterSpec) for c in p["containers"]} == {
        "registry.example/cs:1.2"}
    shared = next(o for o in docs["storage.yaml"] if o["metadata"]["name"] == "shared-data")
    assert shared["spec"]["storageClassName"] == "cephfs"
    cfg = yaml.safe_load(docs["job-config.yaml"][0]["data"]["imagenet.yaml"])
    assert cfg["train"]["workers"] == 8 and cfg["extract"]["num_actors"] == 8
    assert "gs://b/mlflow" in (out / "mlflow.yaml").read_text()


@pytest.mark.parametrize(("changes", "message"), [
    ({"gpu__perPod": "8"}, "gpu.perPod must be int"),
    ({"gpu__pods": 0}, "gpu.pods must be >= 1"),
    ({"storage__size": "lots"}, "storage.size must be a quantity"),
    ({"imagee": "x"}, "unknown key(s) imagee"),
])
def test_bad_values_are_refused_with_the_key(tmp_path, capsys, changes, message):
    values = write_values(tmp_path, **changes)
    assert render.main([str(values), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_values_key(tmp_path):
    v = yaml.safe_load((ROOT / "deploy" / "values.yaml").read_text())
    del v["mlflow"]["artifactRoot"]
    (tmp_path / "v.yaml").write_text(yaml.safe_dump(v))
    with pytest.raises(render.ValuesError, match="missing key mlflow.artifactRoot"):
        render.load_values(tmp_path / "v.yaml")


def test_dockerfile_is_well_formed():
    """No docker engine here: parse the instructions and check what the build relies on."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    lines = re.sub(r"\\\n", " ", text).splitlines()
    instructions = [ln.split(None, 1) for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    keywords = {"FROM", "RUN", "COPY", "ENV", "WORKDIR", "USER", "ARG", "LABEL", "EXPOSE", "CMD"}
    assert all(i[0] in keywords for i in instructions), [i[0] for i in instructions if i[0] not in keywords]
    assert instructions[0][0] == "FROM" and "python:3.11" in instructions[0][1]
    run = " ".join(i[1] for i in instructions if i[0] == "RUN")
    assert "torch==2.14.1" in run and "faiss-gpu-cu12" in run and "uninstall -y faiss-cpu" in run
    assert "psycopg2" in run and "boto3" in run  # MLflow server: PostgreSQL store, S3 artifacts
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().split()
    for src, *_ in (i[1].split() for i in instructions if i[0] == "COPY"):
        assert (ROOT / src).exists(), src
        assert f"!{src}" in ignore, f"{src} is excluded from the build context"
