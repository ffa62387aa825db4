"""The shrink passes, in the order the minimiser runs them: structure first, then sizes, then
attributes and values.

Each pass proposes candidates smaller first and keeps one only through `Shrinker.attempt`. Three
search shapes do the work:

- `drop_chunks`: delta debugging over a list of units (tables, features, samples, ids): remove
  everything, then halves, quarters, ... down to single units, skipping a granularity once it
  would take more than `CHUNK_LIMIT` candidates (a bug that needs 4 097 samples keeps them all,
  and trying each one alone would cost more than it tells);
- `replace_chunks`: the same chunking, replacing values by simpler ones instead of removing them;
- `smallest`: the smallest value of a size (a dim, a bag length, a batch size, an id) at which
  the failure persists: the first few values in turn, then bisection. A bug that needs a
  257-id bag is found at 257 in about ten tries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from harness.fuzz.minimise import edits
from harness.fuzz.minimise.engine import Pass, Shrinker, element_costs, flat_values, value_cost
from harness.model import Pooling, Problem, is_quantized
from harness.quantized import QuantizedTable

CHUNK_LIMIT = 64
"""Most candidates one granularity of `drop_chunks` / `replace_chunks` may take (on a small
problem: `chunk_limit` lowers it for large ones, whose every try costs more)."""

SMALL_WORK = 16_384
"""Problems up to this much work (ids plus output elements) get the whole `CHUNK_LIMIT`."""


def work(p: Problem) -> int:
    """What one try of ``p`` costs, roughly: its ids plus its output elements."""
    width = sum(t.embedding_dim * len(t.feature_names) for t in p.tables)
    return len(p.batch.values) + p.batch.batch_size * width


def chunk_limit(p: Problem) -> int:
    """`CHUNK_LIMIT` for a small problem, proportionally fewer (at least 4) for a large one, so
    that a bug that needs size (65 536 bags, say) is not tried chunk by chunk. Deterministic."""
    w = work(p)
    return CHUNK_LIMIT if w <= SMALL_WORK else max(4, CHUNK_LIMIT * SMALL_WORK // w)


_LINEAR = 4  # `smallest` tries this many values in turn before bisecting


# -- search shapes -----------------------------------------------------------------------------


def drop_chunks(
    s: Shrinker,
    count: Callable[[Problem], int],
    without: Callable[[Problem, range], Problem | None],
    *,
    min_keep: int = 0,
) -> None:
    """Remove runs of units ``[i, j)`` (``without``) while the failure persists, largest runs first."""
    size = count(s.current)
    while size >= 1:
        n = count(s.current)
        if n <= min_keep:
            return
        size = min(size, n)
        if -(-n // size) > chunk_limit(s.current):
            return
        start = 0
        while start < count(s.current):
            n = count(s.current)
            stop = min(start + size, n)
            if n - (stop - start) >= min_keep and s.attempt(without(s.current, range(start, stop))):
                continue
            start += size
        if size == 1:
            return
        size = (size + 1) // 2


def replace_chunks(
    s: Shrinker,
    units: Callable[[Problem], torch.Tensor],
    apply: Callable[[Problem, torch.Tensor], Problem | None],
) -> None:
    """Simplify runs of the units ``units(problem)`` lists (indices still worth simplifying):
    all of them at once, then halves, ... down to one at a time, while the failure persists."""
    size = len(units(s.current))
    while size >= 1:
        todo = units(s.current)
        if not len(todo):
            return
        size = min(size, len(todo))
        if -(-len(todo) // size) > chunk_limit(s.current):
            return
        start = 0
        while start < len(todo):
            if s.attempt(apply(s.current, todo[start : start + size])):
                todo = units(s.current)  # the simplified ones are gone: the next run is at `start`
                continue
            start += size
        if size == 1:
            return
        size = (size + 1) // 2


def smallest(s: Shrinker, lo: int, hi: int, make: Callable[[Problem, int], Problem | None]) -> int:
    """The smallest ``v`` in ``[lo, hi]`` at which ``make(current, v)`` still fails, ``hi`` being
    the current value: ``lo, lo + 1, ...`` in turn, then bisection (exact when failing is monotone)."""
    for v in range(lo, min(lo + _LINEAR, hi)):
        if s.attempt(make(s.current, v)):
            return v
    lo = min(lo + _LINEAR, hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if s.attempt(make(s.current, mid)):
            hi = mid
        else:
            lo = mid + 1
    return hi


def _touched_rows(p: Problem, table: int) -> torch.Tensor:
    mine = edits.table_of_ids(p) == table
    return torch.unique(p.batch.values[mine].to(torch.int64))


# -- structure ---------------------------------------------------------------------------------


def drop_tables(s: Shrinker) -> None:
    def without(p: Problem, r: range) -> Problem:
        gone = {f for t in p.tables[r.start : r.stop] for f in t.feature_names}
        return edits.restrict(p, keys=[k for k in p.batch.keys if k not in gone])

    drop_chunks(s, lambda p: len(p.tables), without, min_keep=1)


def merge_tables(s: Shrinker) -> None:
    """Neighbouring tables of the same dim, pooling and dtype become one shared table."""
    i = 0
    while i < len(s.current.tables) - 1:
        a, b = s.current.tables[i], s.current.tables[i + 1]
        same = (a.embedding_dim, a.pooling, a.dtype) == (b.embedding_dim, b.pooling, b.dtype)
        if not (same and s.attempt(edits.merge_tables(s.current, i))):
            i += 1


def drop_features(s: Shrinker) -> None:
    def without(p: Problem, r: range) -> Problem:
        gone = set(p.batch.keys[r.start : r.stop])
        return edits.restrict(p, keys=[k for k in p.batch.keys if k not in gone])

    drop_chunks(s, lambda p: len(p.batch.keys), without, min_keep=1)


def drop_samples(s: Shrinker) -> None:
    """The first ``k`` samples for the smallest ``k``, then the last ``k``, then runs of samples
    anywhere (a bug that needs an id in sample 4 096 keeps 4 097 samples, not a few more)."""

    def first(p: Problem, k: int) -> Problem:
        return edits.restrict(p, samples=torch.arange(p.batch.batch_size) < k)

    def last(p: Problem, k: int) -> Problem:
        b = p.batch.batch_size
        return edits.restrict(p, samples=torch.arange(b) >= b - k)

    smallest(s, 0, s.current.batch.batch_size, first)
    smallest(s, 0, s.current.batch.batch_size, last)

    def without(p: Problem, r: range) -> Problem:
        keep = torch.ones(p.batch.batch_size, dtype=torch.bool)
        keep[r.start : r.stop] = False
        return edits.restrict(p, samples=keep)

    drop_chunks(s, lambda p: p.batch.batch_size, without)


def join_samples(s: Shrinker) -> None:
    """Runs of samples joined into one sample (their bags concatenated), largest runs first: a bug
    that needs many ids in one feature keeps them in one bag."""
    drop_chunks(
        s,
        lambda p: p.batch.batch_size,
        lambda p, r: edits.join_samples(p, r.start, r.stop) if len(r) > 1 else None,
    )


def cut_bags(s: Shrinker) -> None:
    """Every bag cut to its first ``k`` ids, for the smallest ``k``."""

    def cut_all(p: Problem, k: int) -> Problem:
        return edits.restrict(p, ids=edits.position_in_bag(p.batch) < k)

    lengths = s.current.batch.lengths
    if len(lengths):
        smallest(s, 0, int(lengths.max()), cut_all)


def shorten_bags(s: Shrinker) -> None:
    """Each long bag (the longest first) cut to its first ``k`` ids, for the smallest ``k``."""
    order = torch.argsort(s.current.batch.lengths, descending=True, stable=True)
    for bag in order[: chunk_limit(s.current)].tolist():
        length = int(s.current.batch.lengths[bag])
        if length <= 1:
            break

        def cut(p: Problem, k: int, bag: int = bag) -> Problem:
            keep = (edits.bag_of_ids(p.batch) != bag) | (edits.position_in_bag(p.batch) < k)
            return edits.restrict(p, ids=keep)

        smallest(s, 0, length, cut)


def drop_ids(s: Shrinker) -> None:
    def without(p: Problem, r: range) -> Problem:
        keep = torch.ones(len(p.batch.values), dtype=torch.bool)
        keep[r.start : r.stop] = False
        return edits.restrict(p, ids=keep)

    drop_chunks(s, lambda p: len(p.batch.values), without)


def drop_sample_weights(s: Shrinker) -> None:
    if s.current.batch.weights is not None:
        s.attempt(edits.with_sample_weights(s.current, None))


# -- sizes -------------------------------------------------------------------------------------


def dims_to_one(s: Shrinker) -> None:
    """Every table's dim 1 at once: one try that makes every later try cheaper."""
    p = s.current
    if any(t.embedding_dim > 1 for t in p.tables):
        every = p
        for i in range(len(p.tables)):
            every = edits.with_dim(every, i, 1)
        s.attempt(every)


def halve_dims(s: Shrinker) -> None:
    """Each table's smallest dim (a column prefix), then runs of columns dropped anywhere (the
    column a bug shows in may not be the first)."""
    dims_to_one(s)
    for i in range(len(s.current.tables)):
        dim = s.current.tables[i].embedding_dim
        if dim > 1:
            smallest(s, 1, dim, lambda p, d, i=i: edits.with_dim(p, i, d))

        def without(p: Problem, r: range, i: int = i) -> Problem:
            keep = torch.ones(p.tables[i].embedding_dim, dtype=torch.bool)
            keep[r.start : r.stop] = False
            return edits.with_columns(p, i, torch.nonzero(keep).reshape(-1))

        drop_chunks(s, lambda p, i=i: p.tables[i].embedding_dim, without, min_keep=1)


def _compacted(p: Problem, table: int) -> Problem | None:
    rows = _touched_rows(p, table)
    n = p.tables[table].num_embeddings
    if len(rows) == n:
        return None
    if not len(rows):
        return edits.with_rows(p, table, p.weights[p.tables[table].name][:1].clone(), lambda ids: ids)
    weights = p.weights[p.tables[table].name][rows].clone()
    return edits.with_rows(p, table, weights, lambda ids: torch.searchsorted(rows, ids))


def compact_rows(s: Shrinker) -> None:
    """Only the rows the ids touch, renumbered in order (every table at once, then each)."""
    every: Problem | None = s.current
    for i in range(len(s.current.tables)):
        every = _compacted(every, i) or every
    if every is not s.current:
        s.attempt(every)
    for i in range(len(s.current.tables)):
        s.attempt(_compacted(s.current, i))


def simplify_ids(s: Shrinker) -> None:
    """Ids towards 0: all of them, then runs of them, then each one by bisection."""

    def nonzero(p: Problem) -> torch.Tensor:
        return torch.nonzero(p.batch.values != 0).reshape(-1)

    def zeroed(p: Problem, where: torch.Tensor) -> Problem:
        values = p.batch.values.clone()
        values[where] = 0
        return edits.with_ids(p, values)

    replace_chunks(s, nonzero, zeroed)
    left = nonzero(s.current)
    if len(left) > chunk_limit(s.current):
        return
    for position in left.tolist():

        def at(p: Problem, v: int, position: int = position) -> Problem:
            values = p.batch.values.clone()
            values[position] = v
            return edits.with_ids(p, values)

        smallest(s, 0, int(s.current.batch.values[position]), at)


def trim_rows(s: Shrinker) -> None:
    """Each table's row count down to just past its largest id (when compacting rows does not
    keep the failure, e.g. a bug that needs an id of 32 768)."""
    for i in range(len(s.current.tables)):
        rows = _touched_rows(s.current, i)
        need = int(rows.max()) + 1 if len(rows) else 1
        n = s.current.tables[i].num_embeddings
        if need < n:

            def cut(p: Problem, k: int, i: int = i) -> Problem:
                name = p.tables[i].name
                return edits.with_rows(p, i, p.weights[name][:k].clone(), lambda ids: ids)

            smallest(s, need, n, cut)


# -- attributes --------------------------------------------------------------------------------


def _each_table(s: Shrinker, change: Callable[[Problem, int], Problem | None]) -> None:
    """``change`` on every table at once, then on each table alone."""
    every: Problem | None = s.current
    for i in range(len(s.current.tables)):
        every = change(every, i) or every
    if every is not s.current:
        s.attempt(every)
    for i in range(len(s.current.tables)):
        s.attempt(change(s.current, i))


def float32_tables(s: Shrinker) -> None:
    def to32(p: Problem, i: int) -> Problem | None:
        if p.tables[i].dtype == torch.float32 or is_quantized(p.tables[i]):
            return None  # a quantized table's values may not fit float32: it stays quantized
        return edits.with_attribute(p, i, dtype=torch.float32)

    _each_table(s, to32)


def sum_pooling(s: Shrinker) -> None:
    def to_sum(p: Problem, i: int) -> Problem | None:
        return None if p.tables[i].pooling is Pooling.SUM else edits.with_attribute(p, i, pooling=Pooling.SUM)

    _each_table(s, to_sum)


def int64_ids(s: Shrinker) -> None:
    if s.current.batch.values.dtype != torch.int64:
        s.attempt(edits.with_id_dtype(s.current, torch.int64))


def keys_in_table_order(s: Shrinker) -> None:
    s.attempt(edits.with_keys_in_table_order(s.current))


# -- values ------------------------------------------------------------------------------------


def _rounded(x: torch.Tensor) -> torch.Tensor:
    """Each value as a nearby small integer: rounded, at least 1 in magnitude, at most 64."""
    v = x.to(torch.float64)
    r = torch.round(v).clamp(-64, 64)
    r = torch.where((r == 0) & (v != 0), torch.sign(v), r)
    return torch.where(torch.isfinite(v), r, torch.sign(v).nan_to_num(0.0)).to(x.dtype)


def _simplify_rows(s: Shrinker, table: int, to: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Touched rows of ``table`` replaced by ``to(rows)`` in runs, where that lowers their cost."""

    if is_quantized(s.current.tables[table]):
        return  # codes, scale and bias are left as they are

    def units(p: Problem) -> torch.Tensor:
        rows = _touched_rows(p, table)
        w = p.weights[p.tables[table].name][rows]
        better = element_costs(to(w)).sum(dim=1) < element_costs(w).sum(dim=1)
        return rows[better]

    def apply(p: Problem, rows: torch.Tensor) -> Problem:
        w = p.weights[p.tables[table].name].clone()
        w[rows] = to(w[rows])
        return edits.with_table_weights(p, table, w)

    replace_chunks(s, units, apply)


def simplify_values(s: Shrinker) -> None:
    """Table values and per-sample weights towards 1.0 and small integers, while the failure
    persists; rows no id reads become 0 first (they only matter to a backend that reads them).
    A quantized table's unread rows become codes 0, scale 1, bias 0; its read rows stay."""
    untouched: Problem | None = s.current
    for i, t in enumerate(s.current.tables):
        w = untouched.weights[t.name]
        unread = torch.ones(t.num_embeddings, dtype=torch.bool)
        unread[_touched_rows(untouched, i)] = False
        if isinstance(w, QuantizedTable):
            zeroed = _zero_rows(w, unread)
            if zeroed is not None:
                untouched = edits.with_table_weights(untouched, i, zeroed)
            continue
        if bool((w[unread] != 0).any()):
            w = w.clone()
            w[unread] = 0
            untouched = edits.with_table_weights(untouched, i, w)
    if untouched is not s.current:
        s.attempt(untouched)
    for to in (torch.ones_like, _rounded):
        every: Problem = s.current
        for i, t in enumerate(every.tables):
            if not is_quantized(t):
                every = edits.with_table_weights(every, i, to(every.weights[t.name]))
        if value_cost(_all_values(every)) < value_cost(_all_values(s.current)):
            s.attempt(every)
        for i in range(len(s.current.tables)):
            _simplify_rows(s, i, to)
        _simplify_sample_weights(s, to)
    for i in range(len(s.current.tables)):
        _simplify_quantized(s, i)


def _all_values(p: Problem) -> torch.Tensor:
    return torch.cat([flat_values(w) for w in p.weights.values()])


def _simplify_quantized(s: Shrinker, table: int) -> None:
    """A quantized table's biases towards 0, scales towards 1, codes towards 0 and 1: each for the
    whole table, kept while the failure persists."""
    if not is_quantized(s.current.tables[table]):
        return

    def changed(part: str, to: Callable[[torch.Tensor], torch.Tensor]) -> Problem:
        w = s.current.weights[s.current.tables[table].name]
        parts = {"codes": w.codes, "scale": w.scale, "bias": w.bias}
        parts[part] = to(parts[part])
        new = QuantizedTable(parts["codes"], parts["scale"], parts["bias"], w.storage)
        return edits.with_table_weights(s.current, table, new)

    s.attempt(changed("bias", torch.zeros_like))
    s.attempt(changed("scale", torch.ones_like))
    s.attempt(changed("codes", torch.zeros_like))
    s.attempt(changed("codes", lambda c: (c > 0).to(c.dtype)))


def _zero_rows(w: QuantizedTable, rows: torch.Tensor) -> QuantizedTable | None:
    """``w`` with ``rows`` (a mask) made codes 0, scale 1, bias 0; None when they already are."""
    if not bool((w.codes[rows] != 0).any() | (w.scale[rows] != 1).any() | (w.bias[rows] != 0).any()):
        return None
    z = w.clone()
    z.codes[rows], z.scale[rows], z.bias[rows] = 0, 1.0, 0.0
    return z


def _simplify_sample_weights(s: Shrinker, to: Callable[[torch.Tensor], torch.Tensor]) -> None:
    def units(p: Problem) -> torch.Tensor:
        w = p.batch.weights
        if w is None:
            return torch.zeros(0, dtype=torch.int64)
        return torch.nonzero(element_costs(to(w)) < element_costs(w)).reshape(-1)

    def apply(p: Problem, where: torch.Tensor) -> Problem:
        w = p.batch.weights.clone()
        w[where] = to(w[where])
        return edits.with_sample_weights(p, w)

    replace_chunks(s, units, apply)


PASSES: tuple[Pass, ...] = (
    Pass("dims-to-1", dims_to_one),
    Pass("drop-tables", drop_tables),
    Pass("drop-features", drop_features),
    Pass("cut-bags", cut_bags),
    Pass("drop-ids", drop_ids),
    Pass("drop-samples", drop_samples),
    Pass("join-samples", join_samples),
    Pass("shorten-bags", shorten_bags),
    Pass("drop-sample-weights", drop_sample_weights),
    Pass("halve-dims", halve_dims),
    Pass("compact-rows", compact_rows),
    Pass("simplify-ids", simplify_ids),
    Pass("trim-rows", trim_rows),
    Pass("float32-tables", float32_tables),
    Pass("sum-pooling", sum_pooling),
    Pass("int64-ids", int64_ids),
    Pass("keys-in-table-order", keys_in_table_order),
    Pass("merge-tables", merge_tables),
    Pass("simplify-values", simplify_values),
)
"""Every pass, in the order the minimiser runs them each round."""


def pass_names(passes: Sequence[Pass] = PASSES) -> list[str]:
    return [p.name for p in passes]
