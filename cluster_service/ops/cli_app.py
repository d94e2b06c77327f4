"""The `cluster-service` Typer app and what its command modules share: the consoles (progress and errors
on stderr, results on stdout), plain progress lines for logs, and readable summary values. The
commands are in `ops.cli` (which also runs the app), `ops.curate_cli` and `ops.shards_cli`."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="DeepDPM clustering that infers K.")
console = Console(stderr=True)
out = Console()


def _log_line(line: str) -> None:
    """A plain progress line on stderr, as written (no markup, no wrapping)."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def _rate_lines(what: str, unit: str, quiet: bool):
    """Plain `RateLines` for assign and extract when stderr is not a terminal, else None (the bar)."""
    from cluster_service.ops.progress import RateLines

    return None if quiet or console.is_terminal else RateLines(what, unit, emit=_log_line)


def readable(key: str, value) -> str:
    """A summary value as a person reads it: seconds to 0.1 s with minutes beside them, large numbers
    to 0.1, scores and other floats to 3 decimals (small ones to 2 significant digits)."""
    from cluster_service.ops.progress import duration

    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if "seconds" in key:
        return f"{value:,.1f}" + (f" ({duration(value)})" if value >= 60 else "")
    if abs(value) >= 100:
        return f"{value:,.1f}"
    if value != 0 and abs(value) < 0.01:
        return f"{value:.2g}"
    return f"{value:.3f}"
