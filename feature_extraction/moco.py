"""MoCo v2 ResNet-50 encoder loaded from the official checkpoint format (He et al. 2020; Chen et al.
2020, "Improved Baselines with Momentum Contrastive Learning").

The official ``main_moco.py`` saves ``{"epoch", "arch", "state_dict", "optimizer"}`` where
``state_dict`` holds the DDP-wrapped query and key encoders: ``module.encoder_q.conv1.weight, ...``.
With ``--mlp`` (MoCo v2) the query encoder's fc is the projection head

    fc = Sequential(Linear(2048, 2048), ReLU(), Linear(2048, 128))   # keys fc.0.*, fc.2.*

and without it (MoCo v1) a single Linear(2048, 128) (keys fc.*). A plain torchvision ResNet-50 state
dict (fc = the 1000-way classifier) is accepted too; it has no projection head, so only
``head="backbone"`` works with it. Weights are never downloaded: a checkpoint file is required.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BACKBONE_DIM = 2048
HEADS = ("proj", "backbone")
_PREFIXES = ("module.encoder_q.", "encoder_q.", "module.")


class CheckpointError(ValueError):
    """A checkpoint that is missing or not in a format this loader understands; says what was expected."""


@dataclass(frozen=True)
class EncoderSpec:
    """What the encoder outputs; recorded in the shard manifest's ``extractor``."""

    head: str  # "proj" (MoCo projection head output) | "backbone" (2048-d pooled ResNet-50 feature)
    normalize: bool  # L2-normalise the output (DeepDPM used the normalised 128-d head on ImageNet)
    head_kind: str  # "mlp" (MoCo v2) | "linear" (MoCo v1) | "none" (no projection head)
    out_dim: int


class MoCoEncoder(nn.Module):
    """ResNet-50 trunk → optional MoCo projection head → optional L2 normalisation."""

    def __init__(
        self, proj: nn.Module | None, head: str = "proj", normalize: bool = True, head_kind: str = "mlp"
    ):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if head == "proj" and proj is None:
            raise CheckpointError("head='proj' needs a MoCo projection head, but the checkpoint has none "
                                  "(a plain torchvision ResNet-50?); use head='backbone'")
        from torchvision.models import resnet50

        self.backbone = resnet50(weights=None)  # never downloads
        self.backbone.fc = nn.Identity()
        self.proj = proj if head == "proj" else None
        self.spec = EncoderSpec(head, normalize, head_kind if proj is not None else "none", self._out_dim())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) normalised images → (B, 2048) backbone or (B, out_dim) projection."""
        h = self.backbone(x)  # (B, 2048) after global average pooling
        if self.proj is not None:
            h = self.proj(h)  # (B, 128)
        return F.normalize(h, dim=1) if self.spec.normalize else h

    def _out_dim(self) -> int:
        if self.proj is None:
            return BACKBONE_DIM
        last = [m for m in self.proj.modules() if isinstance(m, nn.Linear)][-1]
        return last.out_features


def checkpoint_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _encoder_state(path: Path) -> dict[str, torch.Tensor]:
    """The query encoder's state dict with prefixes stripped (conv1.weight, ..., fc.*)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (weights are never downloaded; pass a MoCo v2 "
                              "checkpoint such as moco_v2_800ep_pretrain.pth.tar)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a non-checkpoint file
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, or a dict with one under 'state_dict' "
                              "(official MoCo format)")
    if any(k.startswith(("module.encoder_q.", "encoder_q.")) for k in state):
        state = {k: v for k, v in state.items() if k.startswith(("module.encoder_q.", "encoder_q."))}
    out = {}
    for k, v in state.items():
        for prefix in _PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        out[k] = v
    return out


def _projection_head(state: dict[str, torch.Tensor]) -> tuple[nn.Module | None, str]:
    """Build the fc head the checkpoint holds: MoCo v2 MLP, MoCo v1 linear, or none (classifier)."""
    if "fc.0.weight" in state and "fc.2.weight" in state:
        hidden, out = state["fc.0.weight"].shape[0], state["fc.2.weight"].shape[0]
        head = nn.Sequential(nn.Linear(BACKBONE_DIM, hidden), nn.ReLU(), nn.Linear(hidden, out))
        head.load_state_dict({"0.weight": state["fc.0.weight"], "0.bias": state["fc.0.bias"],
                              "2.weight": state["fc.2.weight"], "2.bias": state["fc.2.bias"]})
        return head, "mlp"
    if "fc.weight" in state and state["fc.weight"].shape[0] != 1000:
        head = nn.Linear(BACKBONE_DIM, state["fc.weight"].shape[0])
        head.load_state_dict({"weight": state["fc.weight"], "bias": state["fc.bias"]})
        return head, "linear"
    return None, "none"


def load_encoder(checkpoint: str | os.PathLike, head: str = "proj", normalize: bool = True) -> MoCoEncoder:
    """A `MoCoEncoder` in eval mode with the checkpoint's query-encoder weights.

    Raises CheckpointError when the file is missing, unreadable, or its trunk keys/shapes are not
    those of a torchvision ResNet-50."""
    path = Path(checkpoint)
    state = _encoder_state(path)
    try:
        proj, head_kind = _projection_head(state)
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: projection head (fc.*) does not match MoCo's ({e})") from e
    encoder = MoCoEncoder(proj, head=head, normalize=normalize, head_kind=head_kind)
    trunk = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = set(encoder.backbone.state_dict())
    missing, unexpected = sorted(expected - set(trunk)), sorted(set(trunk) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: not a ResNet-50 encoder state dict: {len(missing)} missing key(s) {missing[:3]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:3]} (expected keys like "
            "'module.encoder_q.conv1.weight' under 'state_dict', or a plain torchvision resnet50 state dict)"
        )
    try:
        encoder.backbone.load_state_dict(trunk)
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(f"{path}: tensor shapes do not match ResNet-50 ({e})") from e
    return encoder.eval()


def save_moco_checkpoint(encoder_q: nn.Module, path: str | os.PathLike, epoch: int = 0) -> None:
    """Write ``encoder_q`` (a torchvision resnet50 whose fc is the MoCo head) in the official format,
    key encoder included, as main_moco.py does. Used by tests and to re-export fine-tuned encoders."""
    state = {f"module.encoder_q.{k}": v for k, v in encoder_q.state_dict().items()}
    state.update({f"module.encoder_k.{k}": v for k, v in encoder_q.state_dict().items()})
    state["module.queue"] = torch.zeros(128, 8)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    torch.save({"epoch": epoch, "arch": "resnet50", "state_dict": state, "optimizer": {}}, path)
