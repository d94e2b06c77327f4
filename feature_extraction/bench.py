"""Benchmarks of the first pipeline stage: extraction images/s (with the decode vs network split) and
shard-reader throughput for 1M x 128 float32 rows. Writes a marked section into a Markdown file.

    python -m feature_extraction.bench --out BENCHMARKS.md [--images 64] [--rows 1000000]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cluster_service.io.atomic import write_text_atomic
from cluster_service.io.shard_validation import validate_shards
from cluster_service.io.shards import iter_feature_batches, read_feature_table, write_shards
from cluster_service.runtime.ray_session import ensure_ray

BEGIN, END = "<!-- feature-extraction-bench:begin -->", "<!-- feature-extraction-bench:end -->"


def bench_reader(workdir: Path, rows: int, d: int = 128) -> dict:
    x = np.random.default_rng(0).standard_normal((rows, d), dtype=np.float32)
    shard_dir = workdir / "read-bench"
    t0 = time.perf_counter()
    write_shards(shard_dir, np.arange(rows), x, labels=np.arange(rows) % 1000)
    write_s = time.perf_counter() - t0
    gb = rows * d * 4 / 1e9
    res = {"rows": rows, "d": d, "feature_gb": gb, "write_s": write_s,
           "disk_mb": sum(p.stat().st_size for p in shard_dir.glob("*.parquet")) / 1e6}
    for name, fn in (("table", lambda: read_feature_table(shard_dir).features.shape),
                     ("stream", lambda: sum(len(b.ids) for b in iter_feature_batches(shard_dir))),
                     ("stream_torch", lambda: sum(b.features.shape[0]
                                                  for b in iter_feature_batches(shard_dir, as_torch=True)))):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        res[f"{name}_s"] = min(times)
    t0 = time.perf_counter()
    assert validate_shards(shard_dir) == []
    res["validate_s"] = time.perf_counter() - t0
    return res


def bench_extract(workdir: Path, n_images: int, image_size: int, batch_size: int) -> dict:
    from PIL import Image
    from torch import nn
    from torchvision.models import resnet50

    from feature_extraction.extract import ExtractConfig, extract
    from feature_extraction.moco import save_moco_checkpoint

    rng = np.random.default_rng(0)
    root = workdir / "images"
    for i in range(n_images):
        cls = root / f"class{i % 4}"
        cls.mkdir(parents=True, exist_ok=True)
        # smooth-ish content so JPEG sizes resemble photos (~ImageNet's typical 400x350 resolution)
        small = rng.integers(0, 255, (30, 40, 3), np.uint8)
        Image.fromarray(small).resize((500, 375), Image.BILINEAR).save(cls / f"{i}.jpg", quality=90)
    m = resnet50(weights=None)
    m.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128))
    ckpt = workdir / "moco.pth.tar"
    save_moco_checkpoint(m, ckpt)
    ensure_ray()
    cfg = ExtractConfig(ckpt, image_size=image_size, batch_size=batch_size)
    extract(root, workdir / "warmup", cfg)  # first run: worker imports, allocator and oneDNN caches
    report = extract(root, workdir / "extract", cfg)
    return {"images": n_images, "image_size": image_size, "batch_size": batch_size, "device": report.device,
            "wall_s": report.seconds, "images_per_s": report.images_per_second,
            "decode_s": report.decode_seconds, "network_s": report.network_seconds,
            "decode_share": report.decode_share,
            "network_images_per_s": n_images / report.network_seconds if report.network_seconds else 0.0,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def render(reader: dict | None, ext: dict | None, load: float) -> str:
    """The Markdown body (no heading): extraction and reader tables."""
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"
    lines = [f"Measured with `python -m feature_extraction.bench` on {cpu}"
             f"{'; GPU ' + ext['gpu'] if ext and ext.get('gpu') else ', no GPU'}; "
             f"load average at start {load:.1f} (other jobs share the machine).", ""]
    if ext:
        lines += [
            f"**Extraction** (`cluster-service extract`, Ray Data, {ext['device']}, ResNet-50 + MoCo head, "
            f"{ext['images']} JPEGs of 500x375, crop {ext['image_size']}, batch {ext['batch_size']}; "
            "second run, so actor start-up is included but imports are warm):", "",
            "| images/s (wall) | images/s (network only) | decode share | decode s | network s |",
            "|---|---|---|---|---|",
            f"| {ext['images_per_s']:.1f} | {ext['network_images_per_s']:.1f} | {ext['decode_share']:.1%} "
            f"| {ext['decode_s']:.2f} | {ext['network_s']:.2f} |", "",
            "Decode share = time in decode tasks (PIL decode, resize, crop) / (decode + encoder calls), both "
            "summed over workers. Wall rate includes starting the actor and loading the encoder (~6 s)."
            + ("" if ext.get("gpu") else " GPU: not measured (no GPU here); run the same command on a GPU "
               "node to add it."), ""]
    if reader:
        gb = reader["feature_gb"]
        rate = [(k, reader[f"{k}_s"]) for k in ("table", "stream", "stream_torch")]
        lines += [
            f"**Shard reader**, {reader['rows']:,} x {reader['d']} float32 rows ({gb:.2f} GB of features, "
            f"{reader['disk_mb']:.0f} MB zstd on disk, 64k-row shards; best of 3, page cache warm):", "",
            "| path | seconds | rows/s | GB/s |", "|---|---|---|---|"]
        names = {"table": "`read_feature_table` (one (n, d) array, one copy)",
                 "stream": "`iter_feature_batches` (zero-copy numpy views)",
                 "stream_torch": "`iter_feature_batches(as_torch=True)`"}
        lines += [f"| {names[k]} | {s:.2f} | {reader['rows'] / s:,.0f} | {gb / s:.2f} |" for k, s in rate]
        lines += ["", f"Writing them took {reader['write_s']:.1f} s; `shards validate` (sha256, every row, "
                      f"duplicate ids) {reader['validate_s']:.1f} s."]
    return "\n".join(lines) + "\n"


def bench_features(rows: int = 1_000_000, images: int = 64, image_size: int = 224, batch_size: int = 32,
                   skip_extract: bool = False) -> str:
    """Run both benchmarks in a temporary directory; return the Markdown body. (Also the hook for
    `cluster_service.bench`'s optional sections.)"""
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        reader = bench_reader(Path(tmp), rows)
        ext = None if skip_extract else bench_extract(Path(tmp), images, image_size, batch_size)
    return render(reader, ext, load)


def write_section(path: Path, body: str) -> None:
    """Replace (or append) this benchmark's marked section of ``path``, keeping everything else."""
    section = f"{BEGIN}\n## Feature extraction and shard reading\n\n{body}{END}\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END) + "\n?", lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    write_text_atomic(text, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="Markdown file to update (default: print)")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--skip-extract", action="store_true")
    args = ap.parse_args()
    body = bench_features(args.rows, args.images, args.image_size, args.batch_size, args.skip_extract)
    print(body)
    if args.out:
        write_section(args.out, body)


if __name__ == "__main__":
    main()
