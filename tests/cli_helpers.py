"""Running the CLI in the test process: the same exit codes and messages, no interpreter start-up."""

from __future__ import annotations

import subprocess
import sys


def run_inprocess(capsys, monkeypatch, *args) -> subprocess.CompletedProcess:
    """`cluster-service ARGS...` through ops.cli.main() -> CompletedProcess(args, code, stdout, stderr)."""
    from cluster_service.ops import cli

    monkeypatch.setattr(sys, "argv", ["cluster-service", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)
