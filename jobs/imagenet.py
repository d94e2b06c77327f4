"""The full ImageNet pipeline: train split -> 128-d MoCo features -> distributed fit (K_init 200 in
configs/imagenet-8gpu.yaml) -> assign the val split -> NMI/ARI/ACC against the val labels.

    python -m jobs.imagenet CONFIG.yaml     (config: imagenet, extract, train, fit, assign, tracking)
"""

from __future__ import annotations

from cluster_service.ops.imagenet import run_imagenet
from jobs._common import run


def main(argv: list[str] | None = None) -> None:
    run("imagenet", run_imagenet, argv)


if __name__ == "__main__":
    main()
