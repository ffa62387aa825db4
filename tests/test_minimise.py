"""The minimiser: each pass does its job, only the same failure is kept, the result is a
deterministic fixed point, the budget holds, and the input is never modified."""

from __future__ import annotations

import pytest
import torch
from faulty_backends import VectorPool

from harness.agreement import Outcome, Verdict
from harness.cases import Case
from harness.fuzz.driver import copy_problem, failure_kind, judge, same_failure
from harness.fuzz.minimise import PASSES, describe_size, minimise, smaller
from harness.known import model_from_json
from harness.model import JaggedBatch, Pooling, Problem, TableConfig

FAILED = Verdict("predicate", Outcome.DISAGREE, "planted")


@pytest.fixture(autouse=True)
def one_thread():
    """As the fuzz driver runs it: small tensors, where torch's thread hand-off costs the most."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _problem(seed: int = 0, *, tables: int = 5, features: int = 3, batch: int = 6, weighted: bool = False):
    """A messy problem: several shared tables of mixed dims, dtypes and pooling, keys shuffled,
    bags of 0 to 40 ids and one of 300, int32 ids, random values."""
    g = torch.Generator().manual_seed(seed)
    configs, weights, bags = [], {}, {}
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    for i in range(tables):
        names = tuple(f"f{i}_{j}" for j in range(1 + (i + seed) % features))
        rows, dim = 50 + 31 * i, 3 + 37 * i
        pooling = Pooling.SUM if weighted or i % 2 else Pooling.MEAN
        t = TableConfig(f"t{i}", rows, dim, names, pooling, dtypes[i % 3])
        configs.append(t)
        weights[t.name] = torch.randn(rows, dim, generator=g).to(t.dtype)
        for name in names:
            lengths = torch.randint(0, 40, (batch,), generator=g).tolist()
            bags[name] = [torch.randint(0, rows, (n,), generator=g).tolist() for n in lengths]
    bags[configs[-1].feature_names[0]][batch // 2] = torch.randint(0, 50, (300,), generator=g).tolist()
    keys = list(bags)
    order = torch.randperm(len(keys), generator=g).tolist()
    shuffled = {keys[k]: bags[keys[k]] for k in order}
    per_sample = None
    if weighted:
        per_sample = {k: [torch.randn(len(b), generator=g).tolist() for b in v] for k, v in shuffled.items()}
    batch_ = JaggedBatch.from_bags(shuffled, per_sample, id_dtype=torch.int32)
    return Problem(tuple(configs), weights, batch_)


def _when(holds):
    """A predicate failing exactly when ``holds(problem)``."""
    return lambda p: FAILED if holds(p) else None


def _longest(p: Problem) -> int:
    return int(p.batch.lengths.max()) if len(p.batch.lengths) else 0


def test_a_bug_needing_a_long_bag_keeps_that_length_and_nothing_else():
    original = _problem(weighted=True)
    result = minimise(original, FAILED, _when(lambda p: _longest(p) >= 257), budget=60)
    assert result.complete and result.steps > 0
    p = result.problem
    assert describe_size(p) == {
        "tables": 1,
        "features": 1,
        "samples": 1,
        "ids": 257,
        "longest_bag": 257,
        "max_dim": 1,
        "rows": 1,
    }
    (t,) = p.tables
    assert t.dtype == torch.float32 and t.pooling is Pooling.SUM
    assert p.batch.weights is None and p.batch.values.dtype == torch.int64
    assert set(p.batch.values.tolist()) == {0} and p.weights[t.name].tolist() in ([[0.0]], [[1.0]])


def test_sizes_are_found_exactly_by_bisection():
    original = _problem(1)
    widest = _when(lambda p: max(t.embedding_dim for t in p.tables) >= 129)
    dim = minimise(original, FAILED, widest, budget=60)
    assert describe_size(dim.problem)["max_dim"] == 129 and len(dim.problem.tables) == 1
    many = minimise(original, FAILED, _when(lambda p: len(p.batch.keys) >= 9), budget=60)
    assert len(many.problem.batch.keys) == 9
    assert len(many.problem.tables) == 1, "same-kind neighbouring tables are merged into one"
    big_id = minimise(
        original, FAILED, _when(lambda p: len(p.batch.values) and int(p.batch.values.max()) >= 150), budget=60
    )
    assert big_id.problem.batch.values.tolist() == [150]
    assert describe_size(big_id.problem)["rows"] == 151


def test_values_are_simplified_only_while_the_failure_persists():
    original = _problem(2)

    def negative_value_read(p: Problem) -> bool:  # a bug that needs some row read to be negative
        for t in p.tables:
            mine = [k for k in p.batch.keys if k in t.feature_names]
            for k in mine:
                ids = p.batch.values[p.batch.feature_slice(k)].to(torch.int64)
                if bool((p.weights[t.name][ids].to(torch.float32) < 0).any()):
                    return True
        return False

    result = minimise(original, FAILED, _when(negative_value_read), budget=60)
    p = result.problem
    assert describe_size(p)["ids"] == 1
    (t,) = p.tables
    assert p.weights[t.name].tolist() == [[-1.0]]


def test_the_result_is_a_deterministic_fixed_point_and_the_input_is_untouched():
    original = _problem(3, weighted=True)
    before = copy_problem(original)

    def holds(p: Problem) -> bool:
        return len(p.tables) >= 2 and _longest(p) >= 3 and p.batch.weights is not None

    first = minimise(original, FAILED, _when(holds), budget=60)
    second = minimise(original, FAILED, _when(holds), budget=60)
    assert first.steps == second.steps and first.attempts == second.attempts
    assert _same(first.problem, second.problem)
    again = minimise(first.problem, FAILED, _when(holds), budget=60)
    assert again.steps == 0 and again.complete
    assert _same(original, before)
    assert smaller(first.problem, original) and not smaller(original, first.problem)


def test_the_budget_bounds_the_time_and_keeps_the_smallest_so_far():
    original = _problem(4)
    result = minimise(original, FAILED, _when(lambda p: _longest(p) >= 257), budget=0.0)
    assert not result.complete and result.steps == 0 and result.problem is original


def test_every_pass_is_named_once():
    names = [p.name for p in PASSES]
    assert len(names) == len(set(names))
    for name in ("drop-tables", "drop-samples", "drop-ids", "halve-dims", "simplify-values"):
        assert name in names


class _TwoBugs(VectorPool):
    """Raises ValueError on a bag of more than 4 ids, TypeError on a bag of more than 8."""

    name = "two-bugs"

    def pool(self, tables, weights, batch):
        longest = _longest(Problem(tables, weights, batch))
        if longest > 8:
            raise TypeError(f"bag of {longest} ids")
        if longest > 4:
            raise ValueError(f"bag of {longest} ids")
        return super().pool(tables, weights, batch)


def test_only_the_same_failure_is_kept():
    original = _problem(5)
    verdict, _ = judge(_TwoBugs(), original)
    assert failure_kind(verdict) == "raised TypeError"
    result = minimise(original, verdict, same_failure(_TwoBugs(), verdict, []), budget=60)
    assert failure_kind(result.verdict) == "raised TypeError" and _longest(result.problem) == 9
    assert result.problem.batch.batch_size == 1
    # A candidate that a known case explains is not the same failure either: with a (reproduced,
    # modelled) known case explaining the TypeError on batches of one sample, two samples stay.
    known = Case(
        name="two-bugs-one-sample",
        kind="known-discrepancy",
        backend="two-bugs",
        summary="",
        expect="raised",
        problem=result.problem,
        scope={"batch_size": [1]},
        model=model_from_json({"kind": "raises", "exception": "TypeError", "message": "^bag of"}),
        reproduced=True,
    )
    assert judge(_TwoBugs(), result.problem, [known])[0].outcome is Outcome.KNOWN
    kept = minimise(original, verdict, same_failure(_TwoBugs(), verdict, [known]), budget=60)
    assert kept.problem.batch.batch_size == 2 and _longest(kept.problem) == 9
    assert failure_kind(judge(_TwoBugs(), kept.problem, [known])[0]) == "raised TypeError"


def _same(a: Problem, b: Problem) -> bool:
    return (
        a.tables == b.tables
        and a.batch.keys == b.batch.keys
        and torch.equal(a.batch.values, b.batch.values)
        and torch.equal(a.batch.lengths, b.batch.lengths)
        and (a.batch.weights is None) == (b.batch.weights is None)
        and (a.batch.weights is None or torch.equal(a.batch.weights, b.batch.weights))
        and all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    )


def test_ids_a_bug_needs_in_one_feature_end_up_in_one_bag():
    """Samples are joined (their bags concatenated) when that keeps the failure."""
    original = _problem(6, batch=8)

    def many_ids_in_a_feature(p: Problem) -> bool:
        b = p.batch.batch_size
        per_feature = p.batch.lengths.reshape(len(p.batch.keys), b).sum(dim=1) if b else torch.zeros(1)
        return bool((per_feature >= 200).any())

    result = minimise(original, FAILED, _when(many_ids_in_a_feature), budget=60)
    assert describe_size(result.problem) == {
        "tables": 1, "features": 1, "samples": 1, "ids": 200, "longest_bag": 200, "max_dim": 1, "rows": 1
    }  # fmt: skip
