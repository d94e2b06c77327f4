"""The one policy for reaching Ray: every Ray user in the project calls `ensure_ray()` first.

Use the Ray this process is already connected to; else the cluster at RAY_ADDRESS when it is set
(a Ray job's driver has it); else start a local instance. A local instance keeps the workers' own
lines (Ray Train reports, actor warnings) in Ray's log files unless CLUSTER_SERVICE_VERBOSE=1 or
`verbose=True`: the project prints its own progress from the driver.
"""

from __future__ import annotations

import os

VERBOSE_ENV = "CLUSTER_SERVICE_VERBOSE"


def ensure_ray(verbose: bool | None = None) -> bool:
    """Connect to or start Ray; True when this call started it (the caller may shut it down)."""
    import ray  # RAY

    if ray.is_initialized():
        return False
    if verbose is None:
        verbose = os.environ.get(VERBOSE_ENV, "") not in ("", "0")
    address = os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=verbose)  # RAY
    else:
        ray.init(include_dashboard=False, log_to_driver=verbose)  # RAY
    return True
