"""The training schedule as data: one row per epoch, computed from `ScheduleConfig`.

Printed by `cluster-service plan`. Freezes after accepted moves depend on the run, so the plan
says which epochs may move; the engine freezes the M-step for `freeze_epochs` after an
accepted move.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

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


def format_plan(plan: list[EpochPlan], cfg: ScheduleConfig | None = None) -> str:
    """Compact text: phases as epoch ranges, then the move epochs and the early-stop rule."""
    cfg = cfg or ScheduleConfig(epochs=len(plan))
    early_stop = (
        f"at a merge epoch once K is the same (within {cfg.stop_k_tol:g} x K, rounded down) over "
        f"{cfg.stop_rounds} move rounds and the log marginal "
        f"moved <= {cfg.stop_tol:g} nats per row and dimension; epochs {len(plan)} is then a cap"
    )
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
        f"early stop       {'off (stop_rounds 0)' if cfg.stop_rounds == 0 else early_stop}",
    ]
    return "\n".join(lines)


class _Record(Protocol):  # what Convergence reads of an EpochRecord
    epoch: int
    n_clusters: int
    log_marginal: float
    splits_accepted: int
    merges_accepted: int
    pruned: int
    deletes_accepted: int


@dataclass
class Convergence:
    """When a fit may stop before its planned epochs (ScheduleConfig.stop_rounds / stop_tol).

    Fed every epoch's record in order (`observe`). A "round end" is the epoch before the first
    split and every merge epoch. At a round end the fit has converged when K at the last
    stop_rounds + 1 round ends is one number (up to stop_k_tol x K: `k_slack`) and the log
    marginal likelihood changed by at most stop_tol nats per row and dimension between the
    first and the last of them. It then stops right away, or after freeze_epochs + 1 settle
    epochs without moves (the frozen epochs of the last move and one M-step) when the last round
    changed the partition (a split and a merge back). Decisions come from all-reduced figures
    only, so every rank of a distributed fit decides alike. `state`/`from_state` go into
    checkpoints.
    """

    cfg: ScheduleConfig
    n_rows: int = 1  # the fit's rows (all ranks) and their dimension: stop_tol is per row and dimension
    n_features: int = 1
    round_ends: list[tuple[int, int, float]] = field(default_factory=list)  # (epoch, K, log marginal)
    last_change: int = -1  # last epoch with an accepted move or a prune
    stop_at: int | None = None  # first epoch not to run, once converged
    reason: str = ""

    def observe(self, plan: EpochPlan, rec: _Record) -> None:
        if rec.splits_accepted or rec.merges_accepted or rec.pruned or rec.deletes_accepted:
            self.last_change = rec.epoch
        end = plan.move == "merge" or rec.epoch == self.cfg.first_split - 1
        if not end or self.stop_at is not None or self.cfg.stop_rounds == 0:
            return
        self.round_ends.append((rec.epoch, rec.n_clusters, rec.log_marginal))
        window = self.round_ends[-(self.cfg.stop_rounds + 1) :]
        ks = [k for _, k, _ in window]
        if len(window) < self.cfg.stop_rounds + 1 or max(ks) - min(ks) > self.k_slack(ks[-1]):
            return
        change = abs(window[-1][2] - window[0][2]) / max(1, self.n_rows * self.n_features)
        if change > self.cfg.stop_tol:
            return
        moved = self.last_change > window[-2][0]
        settle = self.cfg.freeze_epochs + 1 if moved else 0
        self.stop_at = rec.epoch + 1 + settle
        self.reason = (
            f"converged at epoch {rec.epoch}: K {', '.join(map(str, ks))} at the last {len(ks)} round ends "
            f"(schedule.stop_k_tol {self.cfg.stop_k_tol:g}: within {self.k_slack(ks[-1])}), "
            f"log marginal changed {change:.1e} nats per row and dimension (schedule.stop_tol {self.cfg.stop_tol:g})"
            + (f"; {settle} settle epochs without moves" if moved else "")
        )

    def k_slack(self, k: int) -> int:
        """How far apart K at the window's round ends may be and still count as settled."""
        return int(self.cfg.stop_k_tol * k)

    def allows(self, plan: EpochPlan) -> EpochPlan | None:
        """The row to run for `plan` (moves off while settling), or None when the fit is over."""
        if self.stop_at is None:
            return plan
        if plan.epoch >= self.stop_at:
            return None
        return EpochPlan(plan.epoch, plan.m_step, plan.train_subnets, None)

    def done_after(self, epoch: int) -> bool:
        """True when `epoch` is the last one the early stop lets run."""
        return self.stop_at is not None and epoch + 1 >= self.stop_at

    def why_stopped(self, last_epoch: int, n_epochs: int) -> str:
        """Why the fit ended after `last_epoch` (of a plan of n_epochs)."""
        if self.done_after(last_epoch):
            return self.reason
        if last_epoch + 1 >= n_epochs:
            tail = ""
            if len(self.round_ends) >= 2:
                ks = [k for _, k, _ in self.round_ends[-(self.cfg.stop_rounds + 1) :]]
                tail = f" (K at the last round ends: {', '.join(map(str, ks))})"
            return f"epoch cap: schedule.epochs {n_epochs} reached before convergence{tail}"
        return ""

    def state(self) -> dict:
        return {"round_ends": self.round_ends, "last_change": self.last_change, "stop_at": self.stop_at,
                "reason": self.reason}

    @classmethod
    def from_state(cls, cfg: ScheduleConfig, n_rows: int, n_features: int, state: dict | None) -> Convergence:
        if not state:
            return cls(cfg, n_rows, n_features)
        ends = [tuple(r) for r in state["round_ends"]]
        return cls(cfg, n_rows, n_features, ends, int(state["last_change"]), state["stop_at"], str(state["reason"]))
