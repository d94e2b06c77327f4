"""The one device-name rule (config `device`, `assign --device`): callers resolve once at the edge and
pass the device into the math."""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device) -> torch.device:
    """"auto" -> cuda when available, else cpu; "cpu", "cuda", "cuda:N" as given. Asking for CUDA on a
    machine without it is an error (a silent CPU fallback would hide a misconfigured GPU job)."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def peak_memory(device: torch.device) -> tuple[int, int]:
    """(this process's peak resident bytes so far, the peak bytes torch allocated on `device` so far:
    0 off CUDA)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return rss, int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0
