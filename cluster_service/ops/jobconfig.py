"""Typed configs of the pipeline jobs (`python -m jobs.<name> CONFIG.yaml`), validated at parse time.

A job config is one YAML mapping of sections; each job takes the sections it needs and refuses
any other key, so a typo fails before a GPU is allocated:

    section    type               what                                        jobs
    extract    ExtractSection     images -> MoCo feature shards               extract, imagenet
    train      TrainSection       Ray Train resources, data and run dir       fit, imagenet
    fit        FitConfig          the model (cluster_service.config)          fit, imagenet
    assign     AssignSection      model + shards -> assignment shards         assign, imagenet
    tracking   TrackingSection    MLflow                                      fit, assign, imagenet
    imagenet   ImagenetSection    train/val ImageFolder trees, work dir       imagenet

Paths are as the cluster sees them. A relative path is taken relative to the directory named by
$CLUSTER_SERVICE_BASE_DIR (`cluster-service submit` sets it to the directory it was run from, which
is right for a cluster on this machine), else to the job's working directory. On a remote cluster
use absolute paths on shared storage: the job's working directory is a temporary copy.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from cluster_service.config import (
    CHECKPOINT_EVERY,
    EXPERIMENT,
    NOVELTY_FPR,
    TOP_M,
    ConfigError,
    FitConfig,
    build_typed,
    check_device,
    check_train_resources,
    has_default,
)

BASE_DIR_ENV = "CLUSTER_SERVICE_BASE_DIR"
JOB_NAMES = ("extract", "fit", "assign", "imagenet")


@dataclass(frozen=True)
class ExtractSection:
    """Feature extraction (feature_extraction.extract.ExtractConfig plus where from and to)."""

    images: str | None = None  # ImageFolder tree or path list (imagenet job: imagenet.train / val)
    out: str | None = None  # shard directory to write, empty or new (imagenet job: under work_dir)
    checkpoint: str | None = None  # MoCo v2 checkpoint (e.g. moco_v2_800ep_pretrain.pth.tar); required
    # Every other key is an ExtractConfig field (head, normalize, batch_size, image_size, resize_size,
    # rows_per_shard, pca_dim, pca_sample, num_actors, use_gpu, seed); its defaults apply.
    options: dict[str, Any] = field(default_factory=dict)

    def extract_config(self):
        from feature_extraction.extract import ExtractConfig

        return ExtractConfig(Path(self.checkpoint), **self.options)


@dataclass(frozen=True)
class TrainSection:
    """Ray Train resources of the distributed fit (cluster_service.runtime.trainer.fit_distributed)."""

    data: str | None = None  # shard directory or .npz (imagenet job: the extracted train shards)
    out: str | None = None  # run directory: model/, assignments.parquet, summary.json, checkpoints/
    workers: int = 1  # Ray Train workers: one per GPU, or CPU workers (gloo)
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    checkpoint_every: int = CHECKPOINT_EVERY  # epochs between Ray Train checkpoints
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the job fails
    # Checkpoint storage; default RUN_DIR/checkpoints. On a multi-node cluster: shared storage.
    storage_path: str | None = None
    report: bool = True  # write RUN_DIR/report.html (summary, plots, per-cluster panels, image galleries)


@dataclass(frozen=True)
class AssignSection:
    """Batch assignment of shards to a fitted model's clusters (cluster_service.serve.assign)."""

    model: str | None = None  # model dir, run dir, models:/NAME/VERSION or runs:/ID/PATH
    shards: str | None = None  # shard directory to assign (imagenet job: the extracted val shards)
    out: str | None = None  # assignment shards, same file names as the inputs
    method: Literal["shortlist", "exact", "net"] = "shortlist"
    top_m: int = TOP_M  # shortlist size (clusters rescored exactly)
    device: str = "auto"
    local: bool = False  # in the job's process instead of Ray Data actors
    batch_size: int = 65536  # rows per assigner call
    novelty_fpr: float = NOVELTY_FPR  # rows flagged `novel`: this share of training-like rows


@dataclass(frozen=True)
class TrackingSection:
    """MLflow: where the fit's run goes. On a cluster, point `uri` at the tracking server."""

    enabled: bool = True
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the base dir
    experiment: str = EXPERIMENT


@dataclass(frozen=True)
class ImagenetSection:
    """The full pipeline: train split -> features -> fit -> assign val split -> scores vs labels."""

    train: str | None = None  # ImageFolder train split (class folders: n01440764/ ...)
    val: str | None = None  # ImageFolder val split with the same class folders (labels for scoring)
    work_dir: str | None = None  # features/{train,val}, fit/, val_assignments/, scores.json
    # Reuse shards already extracted in work_dir (a re-run after a failed fit skips extraction).
    reuse_features: bool = True
    # New data over time: fit on the train rows of the first N classes only (class folders sorted
    # by name; features/train_first_N), then `update` that model with the whole train split (one
    # process, cluster_service.train.update: splits add clusters for the classes it never saw, the
    # ids of clusters that persist stay, fit/lineage.json maps old -> new). null: one fit on all.
    initial_classes: int | None = None


@dataclass(frozen=True)
class ExtractJob:
    extract: ExtractSection


@dataclass(frozen=True)
class FitJob:
    train: TrainSection
    fit: FitConfig = field(default_factory=FitConfig)
    tracking: TrackingSection = field(default_factory=TrackingSection)


@dataclass(frozen=True)
class AssignJob:
    assign: AssignSection
    tracking: TrackingSection = field(default_factory=TrackingSection)


@dataclass(frozen=True)
class ImagenetJob:
    imagenet: ImagenetSection
    extract: ExtractSection
    train: TrainSection = field(default_factory=TrainSection)
    fit: FitConfig = field(default_factory=FitConfig)
    assign: AssignSection = field(default_factory=AssignSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)


JobConfig = ExtractJob | FitJob | AssignJob | ImagenetJob
JOB_TYPES: dict[str, type] = {"extract": ExtractJob, "fit": FitJob, "assign": AssignJob,
                              "imagenet": ImagenetJob}
# Paths each job needs in its sections; the imagenet job derives them and refuses them if set.
_REQUIRED = {
    "extract": [("extract", "images"), ("extract", "out"), ("extract", "checkpoint")],
    "fit": [("train", "data"), ("train", "out")],
    "assign": [("assign", "model"), ("assign", "shards"), ("assign", "out")],
    "imagenet": [("imagenet", "train"), ("imagenet", "val"), ("imagenet", "work_dir"),
                 ("extract", "checkpoint")],
}
_DERIVED_BY_IMAGENET = [("extract", "images"), ("extract", "out"), ("train", "data"), ("train", "out"),
                        ("assign", "model"), ("assign", "shards"), ("assign", "out")]


# ---- entry points -------------------------------------------------------------------------------


def load_fit_config(config: str | os.PathLike | None, overrides: list[str] | None = None, base: dict | None = None,
                    **flags) -> FitConfig:
    """The FitConfig of a command, layered: `base` (a model's config) or the config file (YAML/JSON;
    its `fit` section when it has one) < `overrides` ("key=value", values parsed as YAML) < the
    explicit `flags` that are not None (dotted keys); validated once here."""
    data: dict = dict(base or {})
    if config is not None:
        config = Path(config)
        if not config.is_file():
            raise ConfigError(f"{config}: config file not found")
        try:
            data = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{config}: not valid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{config}: expected a mapping at the top level")
        data = data.get("fit", data)
    cfg = FitConfig.from_dict(data)
    extra: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        extra[k.strip()] = yaml.safe_load(v)
    extra.update({k: v for k, v in flags.items() if v is not None})
    return cfg.replace(**extra) if extra else cfg


def load_job_config(job: str, path: str | os.PathLike) -> JobConfig:
    """Read one YAML file and validate it as the config of `job`; ConfigError names the file."""
    if job not in JOB_TYPES:
        raise ConfigError(f"unknown job {job!r}; jobs: {', '.join(JOB_NAMES)}")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    try:
        return parse_job_config(job, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def parse_job_config(job: str, data: Any) -> JobConfig:
    """Validate a mapping as the config of `job` (see the module docstring for the sections)."""
    if job not in JOB_TYPES:
        raise ConfigError(f"unknown job {job!r}; jobs: {', '.join(JOB_NAMES)}")
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of sections at the top level, got {type(data).__name__}")
    cls = JOB_TYPES[job]
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(map(str, unknown))} for the {job} job; "
                          f"allowed: {', '.join(known)}")
    sections: dict[str, Any] = {}
    for name, f in known.items():
        if name not in data and not has_default(f):
            raise ConfigError(f"missing section {name!r} for the {job} job")
        raw = data.get(name) or {}  # an absent or empty section takes its defaults
        if not isinstance(raw, dict):
            raise ConfigError(f"section {name!r} must be a mapping, got {raw!r}")
        sections[name] = _section(name, raw)
    cfg = cls(**sections)
    _check_paths(job, cfg)
    return cfg


def resolve_path(p: str | None, base: str | os.PathLike | None = None) -> str | None:
    """A config path as an absolute path: relative ones against `base`, $CLUSTER_SERVICE_BASE_DIR or
    the working directory. Model URIs (models:/, runs:/) and object-store URLs are returned as-is."""
    if p is None:
        return None
    if ":/" in p:
        return p  # a URI, not a local path
    q = Path(p).expanduser()
    if not q.is_absolute():
        q = Path(base or os.environ.get(BASE_DIR_ENV) or Path.cwd()) / q
    return str(q.resolve())


# ---- parsing ------------------------------------------------------------------------------------


def _section(name: str, raw: dict[str, Any]) -> Any:
    if name == "fit":
        try:
            return FitConfig.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"fit: {e}") from None
    if name == "extract":
        return parse_extract_section(raw)
    cls = {"train": TrainSection, "assign": AssignSection, "tracking": TrackingSection,
           "imagenet": ImagenetSection}[name]
    return build_typed(cls, raw, f"{name}.")


def parse_extract_section(raw: dict[str, Any]) -> ExtractSection:
    """The `extract` section (or `cluster-service extract`'s options), validated; errors name the key."""
    from feature_extraction.extract import ExtractConfig

    own = {f.name for f in fields(ExtractSection)} - {"options"}
    allowed = own | {f.name for f in fields(ExtractConfig)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join('extract.' + str(u) for u in unknown)}; "
                          f"allowed under extract: {', '.join(sorted(allowed))}")
    options = {k: v for k, v in raw.items() if k not in own}
    section = build_typed(ExtractSection, {k: v for k, v in raw.items() if k in own}, "extract.")
    opts = build_typed(ExtractConfig, {"checkpoint": "-", **options}, "extract.")
    if opts.head not in ("proj", "backbone"):
        raise ConfigError(f"extract.head must be 'proj' or 'backbone', got {opts.head!r}")
    for key in ("batch_size", "image_size", "rows_per_shard", "pca_sample"):
        if getattr(opts, key) < 1:
            raise ConfigError(f"extract.{key} must be >= 1, got {getattr(opts, key)}")
    for key in ("pca_dim", "num_actors", "resize_size"):
        if getattr(opts, key) is not None and getattr(opts, key) < 1:
            raise ConfigError(f"extract.{key} must be >= 1 or null, got {getattr(opts, key)}")
    if opts.resize_size is not None and opts.resize_size < opts.image_size:
        raise ConfigError(f"extract.resize_size ({opts.resize_size}) must be >= "
                          f"extract.image_size ({opts.image_size})")
    return dataclasses.replace(section, options=options)


def _check_paths(job: str, cfg: Any) -> None:
    for section, key in _REQUIRED[job]:
        if getattr(getattr(cfg, section), key) is None:
            raise ConfigError(f"{section}.{key} is required for the {job} job")
    if job == "imagenet":
        for section, key in _DERIVED_BY_IMAGENET:
            if getattr(getattr(cfg, section), key) is not None:
                raise ConfigError(f"{section}.{key} is set by the imagenet job (under imagenet.work_dir); "
                                  "remove it from the config")
        n = cfg.imagenet.initial_classes
        if n is not None and n < 1:
            raise ConfigError(f"imagenet.initial_classes must be >= 1 or null, got {n}")
        if cfg.extract.options.get("pca_dim") is not None:
            raise ConfigError("extract.pca_dim is not supported by the imagenet job: the train and val "
                              "splits would be projected by different PCAs; use head: proj (128-d)")
    for section in ("train",):
        t = getattr(cfg, section, None)
        if t is None:
            continue
        check_train_resources("train.", t.workers, t.checkpoint_every, t.max_failures, t.gpus_per_worker,
                              t.cpus_per_worker)
    a = getattr(cfg, "assign", None)
    if a is not None:
        if a.top_m < 1:
            raise ConfigError(f"assign.top_m must be >= 1, got {a.top_m}")
        if a.batch_size < 1:
            raise ConfigError(f"assign.batch_size must be >= 1, got {a.batch_size}")
        check_device(a.device, "assign.device")
