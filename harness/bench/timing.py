"""Interleaved timing: every case of a workload is timed in the same rounds, in a new order each round.

Why not pytest-benchmark's fixture: a fixture times one function, all of its rounds in one block,
and is used once per test; two tests cannot share rounds. A co-tenant's burst then lands on one
backend's block and not on the other's, and a speedup taken from two such blocks flips between runs.
So this loop does the rounds itself, with pytest-benchmark's timer
(`pytest_benchmark.timers.default_timer`) and, when the run is written, its statistics
(`pytest_benchmark.stats`, in `harness.bench.record`). Per round:

1. the noise probe runs (a fixed reference kernel, `harness.bench.noise`), timed on its own;
2. the slots run in an order drawn from a seeded generator (a new permutation each round), each
   ``iterations`` times between two reads of the timer; before each slot the caches may be flushed
   (``between``, `harness.bench.conditions.CacheFlush`), or the slot called ``warm_up_calls`` times,
   and the device synchronised (``sync``), all outside the timed span; the garbage collector is
   off during the span, as with ``--benchmark-disable-gc``.

Warm-up rounds go the same way and are not recorded. A slot that raises is dropped from the rounds
that follow; its error and round are kept. ``timer`` can be replaced (the tests use a fake clock).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pytest_benchmark.timers import default_timer

Timer = Callable[[], float]


@dataclass
class Slot:
    """One case in the rounds: the call to time, how many times per round, how to synchronise, and
    how many untimed calls go just before each span (``warm_up_calls``: the caches then hold what
    this case reads, not what the case before it in the round left; two backends reading the same
    tables would otherwise warm them for each other, by the luck of the round's order)."""

    name: str
    call: Callable[[], Any]
    iterations: int = 1
    sync: Callable[[], None] | None = None
    warm_up_calls: int = 0


@dataclass
class SlotTimes:
    """One slot's recorded rounds: the span of each (all its iterations), the round and position."""

    name: str
    iterations: int
    seconds: list[float] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    error: str | None = None
    error_round: int | None = None


@dataclass
class Interleaved:
    """The result of one interleaved timing: per slot its rounds, and the probe's time per round."""

    slots: list[SlotTimes]
    probe: list[float]
    orders: list[list[int]]
    warmup_rounds: int
    seconds: float


def time_one(slot: Slot, timer: Timer = default_timer) -> float:
    """Seconds for one span of ``slot`` (its iterations), after its untimed warm-up calls, the
    device synchronised before and after."""
    for _ in range(slot.warm_up_calls):
        slot.call()
    if slot.sync is not None:
        slot.sync()
    start = timer()
    for _ in range(slot.iterations):
        slot.call()
    if slot.sync is not None:
        slot.sync()
    return timer() - start


def calibrate(
    slot: Slot,
    *,
    min_round_s: float,
    calls: int = 3,
    timer: Timer = default_timer,
    max_iterations: int = 100_000,
) -> tuple[float, int]:
    """``(seconds per call, iterations)``: the fastest of ``calls`` single calls, and the iterations
    that make one span last at least ``min_round_s`` (as pytest-benchmark's calibration does)."""
    single = Slot(slot.name, slot.call, 1, slot.sync)
    per_call = min(time_one(single, timer) for _ in range(max(1, calls)))
    if per_call <= 0:
        return per_call, max_iterations
    return per_call, int(min(max_iterations, max(1, math.ceil(min_round_s / per_call))))


def plan_rounds(round_s: float, budget_s: float, min_rounds: int, max_rounds: int) -> int:
    """Rounds that fill ``budget_s`` when one round takes ``round_s``, within the bounds."""
    wanted = math.ceil(budget_s / round_s) if round_s > 0 else max_rounds
    return int(min(max_rounds, max(min_rounds, wanted)))


def time_interleaved(
    slots: Sequence[Slot],
    rounds: int,
    *,
    rng: np.random.Generator,
    warmup_rounds: int = 0,
    between: Callable[[], None] | None = None,
    probe: Callable[[], float] | None = None,
    timer: Timer = default_timer,
    disable_gc: bool = True,
    on_round: Callable[[int], None] | None = None,
) -> Interleaved:
    """Time ``slots`` in ``rounds`` interleaved rounds after ``warmup_rounds`` unrecorded ones."""
    times = [SlotTimes(s.name, s.iterations) for s in slots]
    live = list(range(len(slots)))
    probe_s: list[float] = []
    orders: list[list[int]] = []
    start = timer()
    for r in range(-warmup_rounds, rounds):
        if not live:
            break
        p = probe() if probe is not None else None
        order = [live[i] for i in rng.permutation(len(live))]
        for position, i in enumerate(order):
            if between is not None:
                between()
            gc_was_on = gc.isenabled()
            if disable_gc:
                gc.disable()
            try:
                span = time_one(slots[i], timer)
            except Exception as e:  # noqa: BLE001 - a backend's exception is recorded, the others go on
                times[i].error = f"{type(e).__name__}: {e}"
                times[i].error_round = r
                live.remove(i)
                continue
            finally:
                if gc_was_on:
                    gc.enable()
            if r >= 0:
                times[i].seconds.append(span)
                times[i].rounds.append(r)
                times[i].positions.append(position)
        if r >= 0:
            orders.append(order)
            if p is not None:
                probe_s.append(p)
            if on_round is not None:
                on_round(r)
    return Interleaved(times, probe_s, orders, warmup_rounds, timer() - start)
