"""The smoke ImageNet pipeline's stage times (make bench: pipeline): generated ImageFolder splits
(4 classes, 100 train and 32 val images), a random ResNet-50 in the MoCo v2 checkpoint format, 2 CPU
Ray Train workers and the default fit schedule; extract train, extract val, fit, assign, score."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def bench_pipeline(work_dir: str | None = None) -> str:
    import torch
    import yaml
    from torch import nn
    from torchvision.models import resnet50

    from cluster_service.datasets import write_image_folder
    from cluster_service.ops.imagenet import run_imagenet
    from cluster_service.ops.jobconfig import parse_job_config
    from feature_extraction.moco import save_moco_checkpoint

    root = Path(work_dir or tempfile.mkdtemp(prefix="bench-pipeline-"))
    write_image_folder(root / "train", 25, seed=0)
    write_image_folder(root / "val", 8, seed=1)
    torch.manual_seed(0)
    model = resnet50(weights=None)
    model.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128))
    save_moco_checkpoint(model.eval(), root / "moco.pth.tar")
    cfg = {"imagenet": {"train": str(root / "train"), "val": str(root / "val"), "work_dir": str(root / "work")},
           "extract": {"checkpoint": str(root / "moco.pth.tar"), "image_size": 64, "rows_per_shard": 50},
           "train": {"workers": 2, "checkpoint_every": 20},
           "fit": {"seed": 0}, "assign": {"local": True}, "tracking": {"enabled": False}}
    (root / "imagenet.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    scores = run_imagenet(parse_job_config("imagenet", cfg))
    total = time.perf_counter() - t0
    s = scores["seconds"]
    rows = "\n".join(f"| {k.replace('_', ' ')} | {v:.1f} |" for k, v in s.items())
    val = scores["val"]
    return (f"Config: {root / 'imagenet.yaml'} (default fit schedule). Train K {scores['train']['k_found']}, "
            f"val NMI {val['nmi']:.3f} / ARI {val['ari']:.3f} / ACC {val['acc']:.3f}.\n\n"
            f"| stage | seconds |\n|---|---|\n{rows}\n| **total (incl. Ray start)** | **{total:.1f}** |\n")
