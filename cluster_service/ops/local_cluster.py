"""A Ray head and an MLflow tracking server on loopback, for laptops and tests (`make cluster-up` /
`make cluster-down`, `cluster-service cluster up|down`).

Each service is started in its own session (setsid), and its session id is written to STATE_DIR
(default ./.cluster/, with the logs), so `stop` ends exactly the processes it started (the Ray head
daemonises: gcs_server, raylet, dashboard and the workers stay in the session) and never another
user's Ray, as `ray stop` would.

    ray     ray start --head --node-ip-address 127.0.0.1 --port P --dashboard-host 127.0.0.1
            --dashboard-port 8265 --include-dashboard=true      (job submission: http://127.0.0.1:8265)
    mlflow  mlflow server --backend-store-uri sqlite:///STATE_DIR/mlflow.db
            --artifacts-destination STATE_DIR/mlartifacts --host 127.0.0.1 --port 5000
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from cluster_service.io.atomic import write_json_atomic

STATE_FILE = "cluster.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """The executable beside this interpreter (the venv's ray / mlflow)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def _env() -> dict[str, str]:
    """The services' environment: no RAY_ADDRESS (a new head, not a client), this venv first on PATH so
    that `python` in a job's entrypoint is this interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Loopback only, so no token authentication unless the user asks for it (RAY_AUTH_MODE=token, then
    # clients need it too); Ray would otherwise turn it on whenever ~/.ray/auth_token exists.
    env.setdefault("RAY_AUTH_MODE", "disabled")
    return env


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    """Poll `url` until it answers 200; raise RuntimeError (with the log's tail) on timeout or exit."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):  # up, with Ray token authentication (~/.ray/auth_token)
                return
        except OSError:
            pass
        if proc is not None and proc.poll() not in (None, 0):
            break
        time.sleep(0.5)
    tail = log.read_text()[-2000:] if log is not None and log.is_file() else ""
    raise RuntimeError(f"{url} did not come up within {timeout_s:.0f} s\n{tail}")


def start_ray_head(state_dir: str | os.PathLike, num_cpus: int | None = None, port: int | None = None,
                   dashboard_port: int = 8265, timeout_s: float = 90) -> dict:
    """Start a Ray head on loopback with the dashboard (the job server); return its addresses and session."""
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    # Ray's unix sockets live under the temp dir, whose path must stay short (108-byte socket paths).
    temp_dir = tempfile.mkdtemp(prefix="cs-ray-")
    log = state / "ray.log"
    cmd = [_bin("ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
           "--include-dashboard=true", "--temp-dir", temp_dir, "--disable-usage-stats"]
    # Every other port the head opens is chosen free too, so it can run beside another Ray instance.
    for flag in ("--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port",
                 "--object-manager-port"):
        cmd += [flag, str(free_port())]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    info = {"session": proc.pid, "gcs_address": f"127.0.0.1:{port}", "temp_dir": temp_dir,
            "dashboard": f"http://127.0.0.1:{dashboard_port}", "log": str(log)}
    _save(state, "ray", info)
    rc = proc.wait(timeout=timeout_s)
    if rc != 0:
        stop(state, "ray")
        raise RuntimeError(f"ray start failed (exit {rc}); see {log}:\n{log.read_text()[-2000:]}")
    try:
        wait_http(info["dashboard"] + "/api/version", timeout_s, log=log)
    except RuntimeError:
        stop(state, "ray")
        raise
    return info


def start_mlflow(state_dir: str | os.PathLike, port: int = 5000, timeout_s: float = 60) -> dict:
    """Start an MLflow tracking server on loopback: sqlite store and artifacts under STATE_DIR."""
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    log = state / "mlflow.log"
    cmd = [_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
           "--artifacts-destination", str(state / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    info = {"session": proc.pid, "uri": f"http://127.0.0.1:{port}", "log": str(log)}
    _save(state, "mlflow", info)
    try:
        wait_http(info["uri"] + "/health", timeout_s, proc, log)
    except RuntimeError:
        stop(state, "mlflow")
        raise
    return info


def start(state_dir: str | os.PathLike = ".cluster", num_cpus: int | None = None, dashboard_port: int = 8265,
          mlflow_port: int = 5000, mlflow: bool = True) -> dict:
    """`make cluster-up`: the Ray head, then (optionally) the MLflow server. Refuses if already up."""
    state = Path(state_dir).resolve()
    running = [name for name, info in status(state).items() if info.get("alive")]
    if running:
        raise RuntimeError(f"{state}: {', '.join(running)} already running; `make cluster-down` first")
    out = {"ray": start_ray_head(state, num_cpus, dashboard_port=dashboard_port)}
    if mlflow:
        try:
            out["mlflow"] = start_mlflow(state, mlflow_port)
        except RuntimeError:
            stop(state)
            raise
    return out


def status(state_dir: str | os.PathLike = ".cluster") -> dict:
    """{service: info + alive} for the services recorded in STATE_DIR."""
    path = Path(state_dir) / STATE_FILE
    services = json.loads(path.read_text()) if path.is_file() else {}
    for info in services.values():
        info["alive"] = bool(_session_pids(info["session"]))
    return services


def stop(state_dir: str | os.PathLike = ".cluster", only: str | None = None,
         grace_s: float = 10) -> list[str]:
    """`make cluster-down`: SIGTERM every process of each recorded session, SIGKILL what is left after
    `grace_s`. Returns the names of the services stopped."""
    state = Path(state_dir)
    path = state / STATE_FILE
    services = json.loads(path.read_text()) if path.is_file() else {}
    stopped = []
    for name, info in list(services.items()):
        if only is not None and name != only:
            continue
        _kill_session(info["session"], grace_s)
        if info.get("temp_dir"):
            subprocess.run(["rm", "-rf", info["temp_dir"]], check=False)
        services.pop(name)
        stopped.append(name)
    if path.is_file():
        path.write_text(json.dumps(services, indent=1))
    return stopped


def _save(state: Path, name: str, info: dict) -> None:
    path = state / STATE_FILE
    services = json.loads(path.read_text()) if path.is_file() else {}
    services[name] = info
    write_json_atomic(services, path, indent=1)


def _session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid` (psutil: Linux and macOS)."""
    import psutil

    pids = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                pids.append(pid)
        except (OSError, psutil.Error):
            continue
    return pids


def _kill_session(sid: int, grace_s: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _session_pids(sid):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5)
        while _session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _session_pids(sid):
            return
