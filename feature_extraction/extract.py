"""Images → MoCo features → Parquet shards, as a Ray Data job.

    list_images            ImageFolder tree (class folder → label) or a text file of paths
    ray.data.from_arrow    (id, path, label) rows in blocks of batch_size
    .map_batches(decode_batch)       CPU tasks: PIL decode, resize 256, center crop 224 → uint8
    .map_batches(EncodeActor)        actor pool: one actor per GPU (autocast), or CPU actors;
                                     normalisation happens on the device, the encoder runs there
    driver: iter_batches → ShardWriter (shards + _manifest.json), failures → extract_report.json
    optional: apply_pca (fit on a sample of the written shards, applied to all of them)

An unreadable image never stops the job: its row comes back with an error string and no feature,
and is listed in the report. Only `extract` and `EncodeActor` touch Ray.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cluster_service.io.atomic import write_json_atomic
from cluster_service.io.shards import MAX_ROW_GROUP, ShardWriter, load_manifest, manifest_path
from cluster_service.runtime.ray_session import ensure_ray

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REPORT = "_extract_report.json"  # Hive-style sidecar name (readers of the directory skip it)


@dataclass(frozen=True)
class ExtractConfig:
    checkpoint: Path
    head: str = "proj"  # "proj": MoCo head output (128-d); "backbone": pooled ResNet-50 feature (2048-d)
    normalize: bool = True  # L2-normalise the encoder output (DeepDPM clustered the normalised head)
    batch_size: int = 128  # images per encoder call (and per decode task); 256+ on a GPU
    image_size: int = 224  # center-crop size; smaller only for tests and quick looks
    resize_size: int | None = None  # shorter side before cropping; None → image_size * 256 / 224
    rows_per_shard: int = MAX_ROW_GROUP
    pca_dim: int | None = None  # project to this many principal components after extraction
    pca_sample: int = 100_000  # rows the PCA is fitted on (uniform sample over all shards)
    num_actors: int | None = None  # None → one per GPU in the cluster, or one CPU actor without GPUs
    use_gpu: bool | None = None  # None → use GPUs when the Ray cluster has any
    seed: int = 0

    @property
    def resize(self) -> int:
        return self.resize_size or round(self.image_size * 256 / 224)


@dataclass
class ImageList:
    ids: list[str]  # unique; relative path under the ImageFolder root, or the line of the path list
    paths: list[str]  # absolute
    labels: np.ndarray | None  # (n,) int64 class index, None for a path list
    classes: list[str] | None


@dataclass
class ExtractReport:
    source: str
    out: str
    n_images: int
    n_written: int
    failed: list[dict] = field(default_factory=list)  # [{id, path, error}]
    seconds: float = 0.0  # wall clock of the Ray job
    images_per_second: float = 0.0
    decode_seconds: float = 0.0  # summed over decode tasks
    network_seconds: float = 0.0  # summed over encoder calls (host→device copy included)
    device: str = ""
    manifest_hash: str = ""

    @property
    def decode_share(self) -> float:
        total = self.decode_seconds + self.network_seconds
        return self.decode_seconds / total if total else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {"decode_share": round(self.decode_share, 4)}


# ---------------------------------------------------------------------------------------- inputs


def list_images(source: str | os.PathLike) -> ImageList:
    """An ImageFolder tree (root/class_x/…/img.jpg; classes sorted by name → label 0, 1, …) or a text
    file with one image path per line (relative paths are relative to the file; # comments allowed)."""
    src = Path(source)
    if src.is_dir():
        classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise ValueError(f"{src}: expected an ImageFolder tree (a sub-folder per class); found none")
        ids, paths, labels = [], [], []
        for label, cls in enumerate(classes):
            for p in sorted((src / cls).rglob("*")):
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                    ids.append(p.relative_to(src).as_posix())
                    paths.append(str(p.resolve()))
                    labels.append(label)
        if not ids:
            raise ValueError(f"{src}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
        return ImageList(ids, paths, np.asarray(labels, np.int64), classes)
    if src.is_file():
        ids, paths, seen = [], [], {}
        for lineno, line in enumerate(src.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line in seen:
                raise ValueError(f"{src} line {lineno}: {line!r} repeats line {seen[line]}; ids are unique")
            seen[line] = lineno
            p = Path(line) if Path(line).is_absolute() else src.parent / line
            ids.append(line)
            paths.append(str(p.resolve()))
        if not ids:
            raise ValueError(f"{src}: the path list is empty")
        return ImageList(ids, paths, None, None)
    raise FileNotFoundError(f"{src}: no such image folder or path-list file")


# ---------------------------------------------------------------------------------------- decode


def eval_transform(image_size: int = 224, resize: int = 256) -> Callable:
    """The ImageNet eval transform up to the crop: PIL image → (3, S, S) uint8. Scaling to [0, 1] and
    mean/std normalisation happen on the encoder's device (`normalize_images`)."""
    from torchvision import transforms

    crop = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size)])

    def apply(img) -> np.ndarray:
        return np.asarray(crop(img.convert("RGB")), dtype=np.uint8).transpose(2, 0, 1)

    return apply


def normalize_images(x_uint8, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(B, 3, S, S) uint8 tensor → float32, / 255, minus mean, over std (= ToTensor + Normalize)."""
    import torch

    m = torch.tensor(mean, device=x_uint8.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x_uint8.device).view(1, 3, 1, 1)
    return (x_uint8.float() / 255.0 - m) / s


def decode_batch(batch: dict[str, np.ndarray], image_size: int, resize: int) -> dict[str, np.ndarray]:
    """Ray Data task: decode and crop every image; a failure becomes an ``error`` string, not an exception."""
    from PIL import Image

    transform = eval_transform(image_size, resize)  # (imports torchvision once per worker: not timed)
    t0 = time.perf_counter()
    n = len(batch["path"])
    images = np.zeros((n, 3, image_size, image_size), np.uint8)
    errors = np.full(n, "", dtype=object)
    for i, path in enumerate(batch["path"]):
        try:
            with Image.open(path) as img:
                images[i] = transform(img)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
            errors[i] = f"{type(e).__name__}: {e}"
    out = dict(batch)
    out["image"] = images
    out["error"] = errors
    out["decode_s"] = np.full(n, (time.perf_counter() - t0) / max(n, 1))
    return out


# ---------------------------------------------------------------------------------------- encode


class EncodeActor:
    """Ray Data actor holding one encoder on its device; GPU actors run under bf16/fp16 autocast."""

    def __init__(self, encoder, use_gpu: bool, num_threads: int = 1):
        import ray
        import torch

        if isinstance(encoder, ray.ObjectRef):
            encoder = ray.get(encoder)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        if not use_gpu:
            torch.set_num_threads(num_threads)
        self.amp_dtype = None
        if use_gpu:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.encoder = encoder.to(self.device).eval()
        self.out_dim = encoder.spec.out_dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        t0 = time.perf_counter()
        ok = batch["error"] == ""
        n = len(ok)
        features = np.zeros((n, self.out_dim), np.float32)
        if ok.any():
            x = torch.from_numpy(np.ascontiguousarray(batch["image"][ok])).to(self.device, non_blocking=True)
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp_dtype,
                                                        enabled=self.amp_dtype is not None):
                f = self.encoder(normalize_images(x))  # (b, out_dim)
            features[ok] = f.float().cpu().numpy()
        out = {k: batch[k] for k in ("id", "path", "label", "error", "decode_s")}
        out["feature"] = features
        out["net_s"] = np.full(n, (time.perf_counter() - t0) / max(n, 1))
        return out


# ---------------------------------------------------------------------------------------- job


def describe_extractor(cfg: ExtractConfig, encoder, checkpoint_hash: str, source: str) -> dict:
    """The manifest's ``extractor`` record: enough to reproduce the features."""
    return {
        "method": "moco_v2" if encoder.spec.head_kind == "mlp" else f"moco/{encoder.spec.head_kind}",
        "backbone": "resnet50",
        "checkpoint": str(cfg.checkpoint),
        "checkpoint_sha256": checkpoint_hash,
        "head": cfg.head,
        "head_kind": encoder.spec.head_kind,
        "out_dim": encoder.spec.out_dim,
        "normalization": "l2" if cfg.normalize else None,
        "preprocessing": {"resize": cfg.resize, "center_crop": cfg.image_size, "interpolation": "bilinear",
                          "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "source": source,
    }


def _encode_dataset(images: ImageList, encoder, cfg: ExtractConfig):
    """The Ray Data pipeline: blocks of (id, path, label) -> decode tasks -> encoder actor pool.
    Returns (dataset, number of actors, whether the actors use GPUs)."""
    import pyarrow as pa
    import ray

    ensure_ray()
    n_gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else n_gpus >= 1
    if use_gpu and n_gpus < 1:
        raise ValueError("use_gpu=True but the Ray cluster has no GPUs")
    n_cpus = int(ray.cluster_resources().get("CPU", 1))
    n_actors = cfg.num_actors or (n_gpus if use_gpu else 1)
    # GPU: decode runs in CPU tasks beside the GPU actors. CPU: the actors share the machine with the
    # decode tasks, so one CPU is left for decoding (with 2 CPUs Ray fuses decode into the actor).
    actor_cpus = 1 if use_gpu else max(1, (n_cpus - 1) // n_actors)

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards come out in input order
    ctx.enable_progress_bars = False  # the caller's progress callback shows progress

    labels = images.labels if images.labels is not None else np.full(len(images.ids), -1, np.int64)
    rows = pa.table({"id": images.ids, "path": images.paths, "label": labels})
    blocks = [rows.slice(i, cfg.batch_size) for i in range(0, len(images.ids), cfg.batch_size)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(decode_batch, fn_kwargs={"image_size": cfg.image_size, "resize": cfg.resize},
                        batch_size=cfg.batch_size, batch_format="numpy", num_cpus=1)
    ds = ds.map_batches(EncodeActor, fn_constructor_kwargs={"encoder": ray.put(encoder), "use_gpu": use_gpu,
                                                            "num_threads": actor_cpus},
                        batch_size=cfg.batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=n_actors),
                        num_gpus=1 if use_gpu else 0, num_cpus=actor_cpus)

    return ds, n_actors, use_gpu


def extract(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: ExtractConfig,
    progress: Callable[[int, int], None] | None = None,
) -> ExtractReport:
    """Run the extraction job; write shards + _manifest.json + extract_report.json into ``out_dir``.

    Uses the running Ray instance, or starts a local one. ``progress(done, total)`` is called after
    every batch the driver receives."""

    from feature_extraction.moco import checkpoint_sha256, load_encoder

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.glob("*.parquet")) or manifest_path(out_dir).exists():
        raise ValueError(f"{out_dir}: already holds shards; extract into an empty or new directory")
    encoder = load_encoder(cfg.checkpoint, head=cfg.head, normalize=cfg.normalize)  # fail fast, before Ray
    images = list_images(source)
    extractor = describe_extractor(cfg, encoder, checkpoint_sha256(cfg.checkpoint), str(source))
    shard_dir = out_dir.with_name(f".{out_dir.name}.raw-tmp") if cfg.pca_dim else out_dir
    if shard_dir.exists() and shard_dir != out_dir:
        shutil.rmtree(shard_dir)

    ds, n_actors, use_gpu = _encode_dataset(images, encoder, cfg)
    report = ExtractReport(str(source), str(out_dir), len(images.ids), 0,
                           device=f"{n_actors} x {'GPU' if use_gpu else 'CPU'} actor(s)")
    t0 = time.perf_counter()
    done = 0
    writer = ShardWriter(shard_dir, encoder.spec.out_dim, cfg.rows_per_shard, extractor)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ok = batch["error"] == ""
        if ok.any():
            writer.add(batch["id"][ok], batch["feature"][ok],
                       batch["label"][ok] if images.labels is not None else None, batch["path"][ok])
        bad = zip(batch["id"][~ok], batch["path"][~ok], batch["error"][~ok], strict=True)
        report.failed += [{"id": str(i), "path": str(p), "error": str(e)} for i, p, e in bad]
        report.decode_seconds += float(batch["decode_s"].sum())
        report.network_seconds += float(batch["net_s"].sum())
        done += len(ok)
        if progress is not None:
            progress(done, len(images.ids))
    manifest = writer.close()
    report.seconds = time.perf_counter() - t0
    report.n_written = manifest["rows"]
    report.images_per_second = done / report.seconds if report.seconds else 0.0

    if cfg.pca_dim and report.n_written:
        apply_pca(shard_dir, out_dir, cfg.pca_dim, cfg.pca_sample, cfg.rows_per_shard, cfg.seed)
        shutil.rmtree(shard_dir)
    report.manifest_hash = load_manifest(out_dir)[1] if report.n_written else ""
    write_report(report, out_dir / REPORT)
    if report.n_written == 0:
        raise ValueError(f"{source}: all {report.n_images} images failed to decode; see {out_dir / REPORT}")
    return report


def write_report(report: ExtractReport, path: Path) -> None:
    write_json_atomic(report.as_dict(), path)


# ---------------------------------------------------------------------------------------- PCA


def fit_pca(shard_dir: str | os.PathLike, dim: int, sample: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Principal axes of a uniform row sample of the shards (one shard in memory at a time).

    Returns mean (d,), components (dim, d) (rows: unit principal axes, by decreasing variance) and
    explained_variance (dim,), all float64."""
    import pyarrow.parquet as pq

    from cluster_service.io.shards import features_to_numpy, list_shards

    manifest, _ = load_manifest(shard_dir)
    d, n = manifest["d"], manifest["rows"]
    if not 1 <= dim <= d:
        raise ValueError(f"pca_dim must be in [1, d={d}], got {dim}")
    rng = np.random.default_rng(seed)
    take = np.sort(rng.choice(n, size=min(sample, n), replace=False))  # global row numbers
    parts, start = [], 0
    for path in list_shards(shard_dir):
        rows = pq.read_metadata(path).num_rows
        local = take[(take >= start) & (take < start + rows)] - start
        if local.size:
            x = features_to_numpy(pq.read_table(path, columns=["feature"]).column("feature"))
            parts.append(x[local].astype(np.float64))
        start += rows
    x = np.concatenate(parts)
    if x.shape[0] < dim:
        raise ValueError(f"{shard_dir}: PCA to {dim} dimensions needs at least {dim} rows, have {x.shape[0]}")
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False).reshape(d, d)
    evals, evecs = np.linalg.eigh(cov)  # ascending
    order = np.argsort(evals)[::-1][:dim]
    return {"mean": mean, "components": evecs[:, order].T.copy(), "explained_variance": evals[order],
            "total_variance": np.array(evals.sum())}


def apply_pca(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dim: int,
    sample: int = 100_000,
    rows_per_shard: int = MAX_ROW_GROUP,
    seed: int = 0,
) -> dict:
    """Fit PCA on a sample of ``src_dir`` and write every shard projected to ``dim`` dimensions into
    ``out_dir`` (ids, labels and paths kept); the fitted mean/components go to ``out_dir/pca.npz``."""
    import pyarrow.parquet as pq

    from cluster_service.io.shards import features_to_numpy, list_shards

    src_manifest, src_hash = load_manifest(src_dir)
    pca = fit_pca(src_dir, dim, sample, seed)
    mean, comps = pca["mean"].astype(np.float32), pca["components"].astype(np.float32)
    extractor = dict(src_manifest.get("extractor", {}))
    explained = float(pca["explained_variance"].sum() / pca["total_variance"])
    fit_rows = min(sample, src_manifest["rows"])
    params_sha256 = hashlib.sha256(mean.tobytes() + comps.tobytes()).hexdigest()  # the projection's identity
    extractor["pca"] = {"dim": dim, "from_d": src_manifest["d"], "fit_rows": fit_rows, "seed": seed,
                        "explained_variance_ratio": explained, "params": "pca.npz",
                        "params_sha256": params_sha256, "source_manifest_sha256": src_hash}
    writer = ShardWriter(out_dir, dim, rows_per_shard, extractor)
    for path in list_shards(src_dir):
        table = pq.read_table(path)
        x = features_to_numpy(table.column("feature"))
        names = table.column_names
        writer.add(table.column("id").to_numpy(zero_copy_only=False), (x - mean) @ comps.T,
                   table.column("label") if "label" in names else None,  # nulls stay null
                   table.column("path").to_pylist() if "path" in names else None)
    np.savez(Path(out_dir) / "pca.npz", **pca)
    return writer.close()
