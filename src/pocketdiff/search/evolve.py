"""Architecture evolution under a latency budget (SnapFusion, Li et al. 2023, sec. 3.2, Algorithm 1).

The search space is the set of ResNet and transformer (cross-attention) blocks of one robustly trained UNet (see
:mod:`pocketdiff.blocks.skipping`): an architecture is the set of blocks removed from it, evaluated without
retraining by skipping them. An action removes one kept block or adds back one removed block; its value is

    value(remove b) = (proxy with b removed - proxy now) / (ms saved by removing b)      (quality lost per ms)
    value(add b)    = (proxy now - proxy with b back) / (ms b costs)                       (quality gained per ms)

with the proxy of :mod:`pocketdiff.search.proxy` (lower is better) and the ms from a latency table
(:mod:`pocketdiff.bench.lut`). Each round, while the predicted latency is over the target, the
``actions_per_round`` lowest-value removals are executed; once under it, the highest-value additions that keep it
under the target and improve the proxy; the search ends when no such addition is left (or after ``max_rounds``).
Before each round an optional ``train_round(unet, removed, round)`` continues robust training (SnapFusion interleaves
it: :mod:`pocketdiff.search.robust`, ``pocketdiff search --train-steps``; without it, the search runs on the
supernet as trained). Duplicating a block (SnapFusion's action set also
adds copies) is not an action here: a copy's value cannot be measured before it is trained.

Every round is logged: the candidates' proxy, saving and value, the executed actions, the predicted latency.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..bench.lut import LatencyTable
from ..blocks.skipping import removed as skipped, skippable_blocks
from .proxy import ValidationSet, proxy_loss


@dataclass
class SearchConfig:
    target_ms: float  # the latency target of one UNet step, on the table's runtime
    kinds: str = "all"  # which blocks are actions: "all" | "attention" | "resnet" | comma-separated name prefixes
    actions_per_round: int = 1  # actions executed per round (re-scored after each round)
    max_rounds: int = 200
    protect: tuple[str, ...] = ()  # name prefixes never removed
    keep_attention: int = 0  # never remove the last N transformer (cross-attention) blocks: keeps text conditioning

    def __post_init__(self) -> None:
        if self.target_ms <= 0 or self.actions_per_round < 1 or self.max_rounds < 1 or self.keep_attention < 0:
            raise ValueError("target_ms must be > 0, actions_per_round and max_rounds >= 1, keep_attention >= 0")


@dataclass
class SearchResult:
    removed: list[str]
    predicted_ms: float
    proxy: float
    rounds: list[dict] = field(default_factory=list)


def candidates(unet: torch.nn.Module, lut: LatencyTable, cfg: SearchConfig) -> list[str]:
    """The blocks actions may touch: of ``cfg.kinds``, in the table, not protected, with a saving."""
    names = [n for n in skippable_blocks(unet, cfg.kinds) if n in lut.blocks]
    return [n for n in names if not any(n.startswith(p) for p in cfg.protect) and lut.blocks[n]["saving_ms"] > 0]


def proxy_with(unet: torch.nn.Module, vset: ValidationSet, removed_set) -> float:
    with skipped(unet, removed_set):
        return proxy_loss(unet, vset)


def score(unet, lut: LatencyTable, vset: ValidationSet, removed_set: set[str], pool: list[str], base: float,
          mode: str) -> list[dict]:
    """Rows {block, action, proxy, saving_ms, value} of every action of ``mode`` ("remove" | "add") on ``pool``."""
    rows = []
    for b in pool:
        after = removed_set | {b} if mode == "remove" else removed_set - {b}
        p = proxy_with(unet, vset, after)
        ms = lut.blocks[b]["saving_ms"]
        value = (p - base) / ms if mode == "remove" else (base - p) / ms
        rows.append({"block": b, "action": mode, "proxy": p, "saving_ms": ms, "value": value})
    return sorted(rows, key=lambda r: r["value"], reverse=mode == "add")


def _round(unet, lut, vset, cfg: SearchConfig, pool: list[str], removed_set: set[str], base: float) -> tuple[list, list]:
    """(scored rows, executed rows) of one round."""
    lat = lut.predict(removed_set)
    if lat > cfg.target_ms:
        attention = [b for b in pool if lut.blocks[b]["type"] == "Transformer2DModel"]
        spare = len([b for b in attention if b not in removed_set]) - cfg.keep_attention  # removable transformers
        open_ = [b for b in pool if b not in removed_set and (spare > 0 or b not in attention)]
        rows = score(unet, lut, vset, removed_set, open_, base, "remove")
        done = []
        for r in rows:
            if len(done) == cfg.actions_per_round:
                break
            if r["block"] in attention:
                if spare <= 0:
                    continue
                spare -= 1
            done.append(r)
        return rows, done
    rows = score(unet, lut, vset, removed_set, sorted(removed_set), base, "add")
    done, budget = [], cfg.target_ms - lat
    for r in rows:
        if len(done) == cfg.actions_per_round or r["value"] <= 0:
            break
        if r["saving_ms"] <= budget:
            done.append(r)
            budget -= r["saving_ms"]
    return rows, done


def evolve(unet: torch.nn.Module, lut: LatencyTable, vset: ValidationSet, cfg: SearchConfig,
           start: set[str] | None = None,
           train_round: Callable[[torch.nn.Module, set[str], int], None] | None = None,
           log: Callable[[dict], None] | None = None) -> SearchResult:
    """Run Algorithm 1 from the removal set ``start`` (default: nothing removed); returns the last architecture."""
    pool = candidates(unet, lut, cfg)
    removed_set = set(start or ())
    history = []
    for k in range(cfg.max_rounds):
        if train_round is not None:
            train_round(unet, removed_set, k)
        base, before = proxy_with(unet, vset, removed_set), lut.predict(removed_set)
        rows, done = _round(unet, lut, vset, cfg, pool, removed_set, base)
        for r in done:
            (removed_set.add if r["action"] == "remove" else removed_set.discard)(r["block"])
        record = {"round": k, "proxy_before": base, "predicted_ms_before": before, "executed": done, "scored": rows,
                  "removed": sorted(removed_set), "predicted_ms": lut.predict(removed_set)}
        history.append(record)
        if log is not None:
            log(record)
        if not done:
            break
    return SearchResult(sorted(removed_set), lut.predict(removed_set), proxy_with(unet, vset, removed_set), history)
