"""`cluster-service submit JOB CONFIG`: a pipeline job on a Ray cluster through the Ray Job Submission SDK.

    validate CONFIG locally as JOB's typed config (cluster_service.ops.jobconfig)   -> ConfigError, nothing sent
    JobSubmissionClient(address).submit_job(
        entrypoint  = "python -m jobs.<JOB> CONFIG",
        runtime_env = {working_dir: this checkout (minus .venv, data, runs, mlruns, ...),
                       env_vars: CLUSTER_SERVICE_BASE_DIR=$PWD, MLFLOW_TRACKING_URI if set, --env ...})
    stream the job's logs; wait for a terminal status; pick the MLflow run line out of the logs

The same job runs without this wrapper: `ray job submit --working-dir . -- python -m jobs.<JOB> CONFIG`.
The job submission server lives on the Ray dashboard's port (8265 by default).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cluster_service.ops.jobconfig import BASE_DIR_ENV, load_job_config
from cluster_service.ops.pipeline import RUN_LINK_RE

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded with the working directory: environments, data, run outputs, stores, caches.
EXCLUDES = [
    ".git", ".venv", "venv", "data", "runs", "outputs", "mlruns", "mlartifacts", "mlflow.db", "ray_results",
    ".cluster", ".pytest_cache", ".ruff_cache", ".hypothesis", "__pycache__", "*.egg-info",
    "*.parquet", "*.npz", "*.npy", "*.pt", "*.pth", "*.pth.tar", "*.ckpt",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class SubmitResult:
    job_id: str
    status: str  # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED
    mlflow_link: str | None = None  # the run's page (tracking server) or runs:/ID
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    message: str = ""  # Ray's status message (why a job failed)
    logs: list[str] = field(default_factory=list)


def resolve_address(address: str | None = None) -> str:
    """--address > $RAY_API_SERVER_ADDRESS > $RAY_ADDRESS when it is an http(s) URL > 127.0.0.1:8265."""
    for candidate in (address, os.environ.get("RAY_API_SERVER_ADDRESS"), os.environ.get("RAY_ADDRESS")):
        if candidate and (candidate is address or candidate.startswith(("http://", "https://"))):
            return candidate if "://" in candidate else f"http://{candidate}"
    return DEFAULT_ADDRESS


def runtime_env(working_dir: str | os.PathLike, env_vars: dict[str, str] | None = None) -> dict:
    """The job's runtime_env: the checkout as working_dir (with EXCLUDES), and the env vars."""
    env = {BASE_DIR_ENV: str(Path.cwd().resolve())}
    if os.environ.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    env.update(env_vars or {})
    return {"working_dir": str(Path(working_dir).resolve()), "excludes": list(EXCLUDES), "env_vars": env}


def entrypoint(job: str, config: str | os.PathLike, working_dir: str | os.PathLike) -> str:
    """`python -m jobs.JOB CONFIG`; CONFIG relative to the working dir when it lies inside it (it is
    uploaded with it), else absolute (valid on this machine's cluster or on shared storage)."""
    cfg, wd = Path(config).resolve(), Path(working_dir).resolve()
    path = cfg.relative_to(wd) if cfg.is_relative_to(wd) else cfg
    return f"python -m jobs.{job} {path.as_posix()}"


def find_run_link(lines: list[str]) -> tuple[str, str, str] | None:
    """(link, run_id, tracking_uri) from the first `MLflow run: ...` line of a job's log."""
    for line in lines:
        m = RUN_LINK_RE.search(line)
        if m:
            return m.group(1), m.group(2), m.group(3)
    return None


def submit(
    job: str,
    config: str | os.PathLike,
    address: str | None = None,
    wait: bool = True,
    env_vars: dict[str, str] | None = None,
    working_dir: str | os.PathLike = ".",
    on_log: Callable[[str], None] | None = print,
    timeout_s: float | None = None,
) -> SubmitResult:
    """Validate CONFIG as JOB's config, submit it, and (with `wait`) stream the logs until the job ends.

    Raises ConfigError before contacting the cluster when the config is invalid; ConnectionError
    when no job server answers at the address."""
    load_job_config(job, config)  # the whole config, typed, before anything is sent
    wd = Path(working_dir)
    if not (wd / "jobs" / f"{job}.py").is_file():
        raise FileNotFoundError(f"{wd.resolve()}: not the project checkout (no jobs/{job}.py to upload)")
    client = _client(resolve_address(address))
    job_id = client.submit_job(entrypoint=entrypoint(job, config, wd), runtime_env=runtime_env(wd, env_vars),
                               metadata={"job": job, "config": str(config)})
    if not wait:
        return SubmitResult(job_id, str(client.get_job_status(job_id).value))
    lines = asyncio.run(_tail(client, job_id, on_log, timeout_s))
    info = _wait_terminal(client, job_id, timeout_s)
    if not lines:  # the log stream can close before the first line arrives
        lines = client.get_job_logs(job_id).splitlines()
    link = find_run_link(lines)
    return SubmitResult(job_id, str(info.status.value), *(link or (None, None, None)),
                        message=info.message or "", logs=lines)


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as e:
        raise ConnectionError(f"no Ray job server at {address} ({e}); start one with `make cluster-up` or "
                              "pass --address http://HEAD:8265") from None


async def _tail(client, job_id: str, on_log, timeout_s: float | None) -> list[str]:
    lines: list[str] = []

    async def read() -> None:
        async for chunk in client.tail_job_logs(job_id):
            for line in chunk.splitlines():
                lines.append(line)
                if on_log is not None:
                    on_log(line)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except TimeoutError:
        pass
    return lines


def _wait_terminal(client, job_id: str, timeout_s: float | None):
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = client.get_job_info(job_id)
        if str(info.status.value) in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return info
        time.sleep(0.5)
