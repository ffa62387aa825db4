"""torchrec-sharded backends: agreement per sharding type, the rank pool's lifecycle and errors.

One pool of 2 gloo ranks serves the whole module (started by the first ``prepare``). Skipped, with
the reason, where torchrec is not installed.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "torchrec", reason="torchrec is not installed: the torchrec-sharded backends are unavailable"
)

from harness.agreement import Outcome, check_problem, mark_known  # noqa: E402
from harness.backend import load_backend  # noqa: E402
from harness.cases import load_cases  # noqa: E402
from harness.generate import random_problem  # noqa: E402
from harness.model import JaggedBatch, Pooling, Problem, TableConfig  # noqa: E402
from harness.weights import make_weights  # noqa: E402
from impls import torchrec_sharded  # noqa: E402
from impls.torchrec_sharded_worker import sample_ranges  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NAMES = tuple(f"torchrec-sharded-{s}" for s in ("tw", "rw", "cw", "twcw", "dp"))
KNOWN = load_cases()


def _problem(tables, bags, per_sample=None, seed=0) -> Problem:
    return Problem(tuple(tables), make_weights(tables, seed), JaggedBatch.from_bags(bags, per_sample))


def _bags(rng: random.Random, n: int, batch: int, max_len: int) -> list[list[int]]:
    return [[rng.randrange(n) for _ in range(rng.randint(0, max_len))] for _ in range(batch)]


def handcrafted() -> dict[str, Problem]:
    """The corners a sharding bug would show in: shared tables, MEAN, weights, empty bags, odd
    sizes (rows not divisible by the world size, dims not divisible by 4), B not divisible by 2."""
    rng = random.Random(8)
    t_shared = TableConfig("shared", 37, 8, ("a", "b"), Pooling.SUM)
    t_mean = TableConfig("mean", 21, 16, ("c",), Pooling.MEAN)
    t_third = TableConfig("third", 5, 4, ("d",), Pooling.SUM)
    out = {
        "shared-mean-odd-rows-B7": _problem(
            [t_shared, t_mean, t_third],
            {k: _bags(rng, n, 7, 6) for k, n in (("c", 21), ("b", 37), ("a", 37), ("d", 5))},
        ),
        "weighted-B5": _problem(
            [t_shared, t_third],
            bags := {k: _bags(rng, n, 5, 5) for k, n in (("a", 37), ("d", 5), ("b", 37))},
            {k: [[rng.uniform(-2, 2) for _ in bag] for bag in v] for k, v in bags.items()},
        ),
        "empty-bags-mean-B3": _problem([t_mean], {"c": [[], [3, 4, 20], []]}),
        "odd-dims-B2": _problem(
            [TableConfig("odd", 9, 3, ("e",)), TableConfig("wide", 9, 33, ("f",), Pooling.MEAN)],
            {"e": [[1, 8], [0]], "f": [[2], [8, 8, 1]]},
        ),
        "batch-1": _problem([t_third], {"d": [[1, 2, 3]]}),
        "batch-0": Problem(
            (t_third,),
            make_weights([t_third]),
            JaggedBatch(("d",), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)),
        ),
    }
    return out


PROBLEMS = {**handcrafted(), **{f"seed-{s}": random_problem(s) for s in range(8)}}


@pytest.fixture(scope="module")
def backends():
    yield {name: load_backend(name) for name in NAMES}
    torchrec_sharded.shutdown_pools()


def test_sample_ranges_cover_the_batch_in_order() -> None:
    assert sample_ranges(7, 2) == [(0, 4), (4, 7)]
    assert sample_ranges(1, 2) == [(0, 1), (1, 1)]
    assert sample_ranges(0, 3) == [(0, 0)] * 3
    p = PROBLEMS["shared-mean-odd-rows-B7"]
    parts = [p.batch.select_samples(a, b) for a, b in sample_ranges(7, 2)]
    assert [x.batch_size for x in parts] == [4, 3]
    assert sum(len(x.values) for x in parts) == len(p.batch.values)
    assert parts[1].bag("c", 0).tolist() == p.batch.bag("c", 4).tolist()


@pytest.mark.parametrize("name", NAMES)
def test_agrees_with_the_reference(backends, name: str) -> None:
    outcomes = {}
    for label, problem in PROBLEMS.items():
        verdict = mark_known(check_problem([backends[name]], problem), problem, KNOWN)[0]
        assert not verdict.failed, f"{name} on {label}: {verdict.outcome.value}: {verdict.detail}"
        outcomes[label] = verdict.outcome
    assert outcomes["weighted-B5"] is Outcome.AGREE
    # row-wise MEAN: cases/known/torchrec-sharded-rw-mean-divides-by-length-plus-eps.json
    mean_outcome = Outcome.KNOWN if name == "torchrec-sharded-rw" else Outcome.AGREE
    assert outcomes["shared-mean-odd-rows-B7"] is mean_outcome, outcomes
    assert outcomes["batch-0"] is Outcome.UNSUPPORTED and outcomes["batch-1"] is Outcome.UNSUPPORTED


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("torchrec-sharded-tw", [{"t": [(0, 0, 11, 8)], "v": [(0, 0, 2, 3)]}, {"u": [(0, 0, 6, 4)]}]),
        (
            "torchrec-sharded-rw",
            [
                {"t": [(0, 0, 6, 8)], "u": [(0, 0, 3, 4)], "v": [(0, 0, 1, 3)]},
                {"t": [(6, 0, 5, 8)], "u": [(3, 0, 3, 4)], "v": [(1, 0, 1, 3)]},
            ],
        ),
        (
            "torchrec-sharded-cw",
            [
                {"t": [(0, 0, 11, 4)], "u": [(0, 0, 6, 2)], "v": [(0, 0, 2, 2)]},
                {"t": [(0, 4, 11, 4)], "u": [(0, 2, 6, 2)], "v": [(0, 2, 2, 1)]},
            ],
        ),
        ("torchrec-sharded-dp", [{"t": [(0, 0, 11, 8)], "u": [(0, 0, 6, 4)], "v": [(0, 0, 2, 3)]}] * 2),
    ],
)
def test_each_rank_holds_the_planned_shards(backends, name: str, expected) -> None:
    """The shards each rank loaded and read back (row/column offsets and sizes) follow the plan."""
    tables = [TableConfig("t", 11, 8, ("a",)), TableConfig("u", 6, 4, ("b",)), TableConfig("v", 2, 3, ("c",))]
    backend = backends[name]
    backend.prepare(tables, make_weights(tables, 3))
    held = [{k: [tuple(s[:4]) for s in v] for k, v in rank.items()} for rank in backend.last_shards]
    assert held == expected


def test_a_rank_error_reaches_the_user_and_the_pool_survives(backends) -> None:
    pool = torchrec_sharded.get_pool(2)
    t = TableConfig("t", 4, 4, ("a",))
    msgs = [("setup", pool.new_key(), (t,), "row_wise", "/nonexistent/weights.pt")] * 2
    with pytest.raises(RuntimeError, match=r"(?s)rank \d raised.*FileNotFoundError"):
        pool.call("sharding the tables", msgs)
    assert pool.alive
    p = PROBLEMS["batch-1"]
    assert backends["torchrec-sharded-tw"].prepare(p.tables, p.weights)(_two(p.batch)).shape == (2, 4)


def _two(batch: JaggedBatch) -> JaggedBatch:
    return JaggedBatch.from_bags({"d": [batch.bag("d", 0).tolist(), []]})


@pytest.mark.parametrize("name", NAMES)
def test_fuzz_each_sharding_type(backends, tmp_path, name: str) -> None:
    """A bounded differential fuzz run per plan, the rank pool kept across examples."""
    from harness.fuzz.driver import fuzz_backend
    from harness.fuzz.format import format_failure

    pids = torchrec_sharded.get_pool(2).pids
    stats, failure = fuzz_backend(
        backends[name], max_examples=25, seed=8, save_dir=tmp_path, known=KNOWN, shrink_budget=20
    )
    assert failure is None, format_failure(failure)
    assert stats.examples == 25 and stats.agreed > 0, stats
    assert torchrec_sharded.get_pool(2).pids == pids


@pytest.mark.parametrize("name", NAMES)
def test_a_table_holding_nan_is_sharded_and_pools_to_nan(backends, name: str) -> None:
    """NaN is a value: the shards' read-back check must not call a NaN shard different from itself."""
    t = TableConfig("t", 6, 4, ("a",))
    weights = make_weights([t], 1)
    weights["t"][2, 1] = float("nan")
    problem = Problem((t,), weights, JaggedBatch.from_bags({"a": [[2, 0], [1], [5, 2]]}))
    verdict = check_problem([backends[name]], problem)[0]
    assert verdict.outcome is Outcome.AGREE, verdict.detail


def test_a_rank_left_waiting_in_a_collective_is_noticed_without_the_long_wait(backends, monkeypatch):
    """An out-of-range id makes the rank owning the table raise in the lookup while the other waits
    for it in torchrec's output all-to-all; that rank must be seen idle, not waited for."""
    monkeypatch.setattr(torchrec_sharded, "AFTER_ERROR_S", 600.0)
    pids = torchrec_sharded.get_pool(2).pids
    p = PROBLEMS["batch-1"]  # table "third": 5 rows, on rank 0 under the table-wise plan
    lookup = backends["torchrec-sharded-tw"].prepare(p.tables, p.weights)
    bad = JaggedBatch.from_bags({"d": [[1], [7]]})
    with pytest.raises(RuntimeError) as raised:
        lookup(bad)
    first, _, rest = str(raised.value).partition("\n")
    assert first.endswith("; the rank pool was stopped and restarts with the next prepare."), first
    raising = re.match(r"torchrec-sharded \(2 ranks\) failed while looking up: rank (\d) raised \w", first)
    waiting = re.search(r"ranks \[(\d)\] sat idle", rest)
    assert raising and waiting and {raising[1], waiting[1]} == {"0", "1"}, str(raised.value)
    assert all(_gone(pid) for pid in pids)
    again = backends["torchrec-sharded-tw"].prepare(p.tables, p.weights)(_two(p.batch))
    assert again.shape == (2, 4) and torchrec_sharded.get_pool(2).pids != pids


def test_a_dead_rank_stops_the_pool_and_leaves_no_child(backends) -> None:
    """Runs last of the in-process tests: it ends the module's pool the hard way."""
    pool = torchrec_sharded.get_pool(2)
    p = PROBLEMS["seed-1"]
    lookup = backends["torchrec-sharded-tw"].prepare(p.tables, p.weights)
    os.kill(pool.pids[1], signal.SIGKILL)
    with pytest.raises(RuntimeError, match=r"rank 1 \(pid \d+\) exited with code -9"):
        lookup(p.batch)
    assert not pool.alive
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("jagbench-sharded")]
    assert all(_gone(pid) for pid in pool.pids)
    with pytest.raises(RuntimeError, match="shut down"):
        pool.call("looking up", [("release", [])] * 2)


CHILD = textwrap.dedent(
    """
    import multiprocessing, os, sys, time
    from harness.model import JaggedBatch, TableConfig
    from harness.weights import make_weights
    from impls.torchrec_sharded import TorchrecSharded, get_pool, shutdown_pools
    if __name__ == "__main__":
        pids = get_pool(2).pids
        if sys.argv[1] == "shutdown":
            shutdown_pools()
            alive = [p for p in pids if os.path.exists(f"/proc/{p}")]
            print("children", len(multiprocessing.active_children()), "alive", alive, flush=True)
        elif sys.argv[1] == "sigint":  # Ctrl-C to the whole process group in the middle of lookups
            tables = [TableConfig("t", 4, 4, ("a",))]
            lookup = TorchrecSharded("tw").prepare(tables, make_weights(tables))
            batch = JaggedBatch.from_bags({"a": [[0, 1], [2], [3, 3]]})
            lookup(batch)
            print(*pids, flush=True)
            while True:
                lookup(batch)
        else:
            print(*pids, flush=True)
            time.sleep(120)
    """
)


def _gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for its (new) parent to reap it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_shutdown_and_interrupts_leave_no_orphan(tmp_path) -> None:
    """Three parents at once: one shuts its pool down, one gets Ctrl-C (SIGINT to its process group)
    while looking up, one is killed with SIGKILL (as SIGTERM, it runs no exit handler)."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    modes = {"shutdown": None, "sigint": signal.SIGINT, "sigkill": signal.SIGKILL}
    procs = {
        m: subprocess.Popen(
            [sys.executable, str(script), m],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        for m in modes
    }
    try:
        lines = {m: p.stdout.readline() for m, p in procs.items()}
        assert lines["shutdown"].split() == ["children", "0", "alive", "[]"], lines["shutdown"]
        assert procs["shutdown"].wait(30) == 0
        for m in ("sigint", "sigkill"):
            pids = [int(x) for x in lines[m].split()]
            assert len(pids) == 2 and not any(_gone(p) for p in pids), lines[m]
            if m == "sigint":  # Ctrl-C: the terminal signals the whole foreground process group
                os.killpg(procs[m].pid, signal.SIGINT)
            else:  # only the parent dies; its ranks must notice by themselves
                procs[m].send_signal(signal.SIGKILL)
            procs[m].wait(30)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not all(_gone(p) for p in pids):
                time.sleep(0.1)
            assert all(_gone(p) for p in pids), f"ranks {pids} outlived their parent after {m}"
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


def test_without_torchrec_each_entry_reports_itself_unavailable(monkeypatch) -> None:
    from harness.backend import BackendUnavailable

    monkeypatch.setattr(torchrec_sharded.importlib.util, "find_spec", lambda name: None)
    for name in NAMES:
        with pytest.raises(BackendUnavailable, match=f"{name}: torchrec .* is not installed"):
            load_backend(name)
