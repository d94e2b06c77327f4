"""The training schedule as data: one row per epoch, computed from `ScheduleConfig`.

Printed by `cluster-service plan`. Freezes after accepted moves depend on the run, so the plan
says which epochs may move; the engine freezes the M-step for `freeze_epochs` after an
accepted move.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cluster_service.config import ScheduleConfig

Move = Literal["split", "merge"] | None


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    m_step: bool  # False during warm-up: parameters stay at the k-means init
    train_subnets: bool
    move: Move


def build_plan(cfg: ScheduleConfig) -> list[EpochPlan]:
    """Per-epoch plan. Splits at first_split + i * period, merges half a period later; the
    moves end with a merge (a last split without one after it is dropped)."""
    last_move = cfg.epochs - cfg.final_epochs
    half = cfg.move_period // 2
    rows = []
    for e in range(cfg.epochs):
        move: Move = None
        if cfg.first_split <= e < last_move:
            phase = (e - cfg.first_split) % cfg.move_period
            move = "split" if phase == 0 else "merge" if phase == half else None
        rows.append(EpochPlan(e, m_step=e >= cfg.warmup_epochs, train_subnets=e >= cfg.subcluster_start, move=move))
    # A last split with no merge round after it would end the fit over-split: drop it, unless
    # it is the only split (short schedules).
    moves = [r for r in rows if r.move]
    if moves and moves[-1].move == "split" and sum(r.move == "split" for r in moves) > 1:
        rows[moves[-1].epoch] = EpochPlan(moves[-1].epoch, moves[-1].m_step, moves[-1].train_subnets, None)
    return rows


def format_plan(plan: list[EpochPlan]) -> str:
    """Compact text: phases as epoch ranges, then the move epochs."""
    warm = [p.epoch for p in plan if not p.m_step]
    sub = next((p.epoch for p in plan if p.train_subnets), None)
    splits = [p.epoch for p in plan if p.move == "split"]
    merges = [p.epoch for p in plan if p.move == "merge"]
    lines = [
        f"epochs           {len(plan)}",
        f"warm-up          {f'0-{warm[-1]}' if warm else 'none'} (clustering net only; parameters from k-means)",
        f"subclusters from {sub if sub is not None else 'never'}",
        f"splits at        {', '.join(map(str, splits)) or 'none'}",
        f"merges at        {', '.join(map(str, merges)) or 'none'}",
        f"split rounds     {len(splits)} (a split may be many-way: moves.split_cells)",
    ]
    return "\n".join(lines)
