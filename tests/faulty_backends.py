"""Realistic faulty backends: a small correct vectorised pooling, and one bug per subclass.

`VectorPool` gathers each feature's rows, multiplies them by the per-sample weights, adds them
into their bags with ``index_add_`` in float32 and divides MEAN bags by their length: a correct
backend, quite unlike the float64 reference loop. Each subclass overrides one hook with a bug seen
in real kernels. The fuzzer must catch every one: `FAULTY_BACKENDS` in tests/test_fuzz.py, and
`SCALE_FAULTS` (bugs that live at scale or in the structure: fixed-size buffers, tiles and grids,
narrow offsets, many features, grouped tables) in tests/test_planted_faults.py, which also checks
that each minimises to a small case.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from harness.model import JaggedBatch, Pooling, TableConfig
from harness.quantized import QuantizedTable, dequantize


class VectorPool:
    """Correct: gather, weight, ``index_add_`` into bags in float32, divide MEAN by the length (a
    quantized table's rows dequantized first, rounded to float32 once)."""

    name = "vector-pool"
    acc_dtype = torch.float32

    def supports(self, tables: Sequence[TableConfig], batch: JaggedBatch) -> str | None:
        return None

    def prepare(self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor]):
        tables = tuple(tables)
        weights = dict(weights)
        return lambda batch: self.pool(tables, weights, batch)

    # -- hooks a faulty subclass overrides -----------------------------------------------------

    def widen(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.to(self.acc_dtype)

    def ids(self, batch: JaggedBatch, lo: int, hi: int) -> torch.Tensor:
        return batch.values[lo:hi].to(torch.int64)

    def segments(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(len(lengths)), lengths)

    def sample_weights(self, batch: JaggedBatch, lo: int, hi: int) -> torch.Tensor | None:
        return None if batch.weights is None else batch.weights[lo:hi]

    def mean_divisor(self, lengths: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return lengths.clamp(min=1)

    def table_of(self, tables: tuple[TableConfig, ...], t: int, feature: int) -> int:
        return t

    def columns(self, tables: tuple[TableConfig, ...], batch: JaggedBatch) -> list[tuple[int, str]]:
        return [(i, f) for i, t in enumerate(tables) for f in t.feature_names]

    def finish(self, out: torch.Tensor, tables: tuple[TableConfig, ...]) -> torch.Tensor:
        return out

    def fix_bag(self, acc: torch.Tensor, dim: int, is_last_feature: bool) -> torch.Tensor:
        return acc

    def bag_ranges(self, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each bag's ``[start, end)`` within its feature's ids."""
        ends = torch.cumsum(lengths, 0)
        return ends - lengths, ends

    def pooled_ids(self, lengths: torch.Tensor) -> torch.Tensor | None:
        """Which of a feature's ids are pooled (a boolean mask), None for all."""
        return None

    def feature_output(self, acc: torch.Tensor, column: int, bag_base: int) -> torch.Tensor:
        """The pooled ``[batch, dim]`` block of output feature ``column`` whose bags are numbered
        from ``bag_base`` in the batch (``key index * batch_size``)."""
        return acc

    # -- the pooling ---------------------------------------------------------------------------

    def pool(self, tables: tuple[TableConfig, ...], weights: dict, batch: JaggedBatch) -> torch.Tensor:
        b = batch.batch_size
        offsets = batch.offsets
        out = []
        for n, (t, feature) in enumerate(self.columns(tables, batch)):
            table = tables[self.table_of(tables, t, n)]
            f = batch.keys.index(feature)
            lo, hi = int(offsets[f * b]), int(offsets[(f + 1) * b])
            lengths = batch.lengths[f * b : (f + 1) * b].to(torch.int64)
            ids = self.ids(batch, lo, hi)
            rows = weights[table.name][ids]
            if isinstance(rows, QuantizedTable):  # dequantized in float64, rounded to float32 once
                rows = dequantize(rows).to(torch.float32)
            rows = self.widen(rows)
            per_sample = self.sample_weights(batch, lo, hi)
            if per_sample is not None:
                rows = rows * per_sample.to(self.acc_dtype)[:, None]
            segments = self.segments(lengths)
            picked = self._picked(lengths)
            if picked is not None:
                rows, segments = rows[picked[0]], picked[1]
            acc = torch.zeros(b, table.embedding_dim, dtype=self.acc_dtype)
            acc.index_add_(0, segments, rows)
            if table.pooling is Pooling.MEAN:
                acc = acc / self.mean_divisor(lengths, ids).to(self.acc_dtype)[:, None]
            acc = self.fix_bag(acc, table.embedding_dim, f == len(batch.keys) - 1)
            acc = self.feature_output(acc, n, f * b)
            out.append(acc.to(torch.float32))
        return self.finish(torch.cat(out, dim=1), tables)

    def _picked(self, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Positions (within the feature) and bags of the ids a faulty `bag_ranges` or
        `pooled_ids` selects; None when every id is pooled into its own bag."""
        starts, ends = self.bag_ranges(lengths)
        mask = self.pooled_ids(lengths)
        default = torch.cumsum(lengths, 0)
        if mask is None and torch.equal(ends, default) and torch.equal(starts, default - lengths):
            return None
        counts = (ends - starts).clamp(min=0)
        bags = torch.repeat_interleave(torch.arange(len(lengths)), counts)
        first = torch.cumsum(counts, 0) - counts
        positions = torch.repeat_interleave(starts, counts) + torch.arange(int(counts.sum())) - first[bags]
        if mask is not None:
            keep = mask[positions]
            positions, bags = positions[keep], bags[keep]
        return positions, bags


class OffsetsOffByOne(VectorPool):
    """Bag ``i`` read as ``values[o[i] + 1 : o[i + 1] + 1]``: each id lands in the previous bag."""

    name = "fault-offsets-off-by-one"

    def segments(self, lengths: torch.Tensor) -> torch.Tensor:
        seg = super().segments(lengths)
        return torch.cat([seg[1:], seg[-1:]]) if len(seg) else seg


class DroppedDimTail(VectorPool):
    """Dims above 8 processed in vectors of 8 with no tail loop: the last ``dim % 8`` columns stay 0."""

    name = "fault-dropped-dim-tail"

    def fix_bag(self, acc: torch.Tensor, dim: int, is_last_feature: bool) -> torch.Tensor:
        if dim > 8 and dim % 8:
            acc = acc.clone()
            acc[:, dim - dim % 8 :] = 0
        return acc


class MeanByDistinctIds(VectorPool):
    """MEAN divided by the number of *distinct* ids in the bag (a deduplicating kernel's count)."""

    name = "fault-mean-distinct-count"

    def mean_divisor(self, lengths: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        counts, start = [], 0
        for n in lengths.tolist():
            counts.append(max(len(set(ids[start : start + n].tolist())), 1))
            start += n
        return torch.tensor(counts, dtype=torch.int64)


class MeanEmptyBagNaN(VectorPool):
    """MEAN divided by the raw length: an empty bag gives 0 / 0 = NaN instead of zeros."""

    name = "fault-mean-empty-nan"

    def mean_divisor(self, lengths: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return lengths


class WeightsWithoutFeatureOffset(VectorPool):
    """Per-sample weights indexed from the start of the batch, not of the feature's ids."""

    name = "fault-weights-wrong-position"

    def sample_weights(self, batch: JaggedBatch, lo: int, hi: int) -> torch.Tensor | None:
        return None if batch.weights is None else batch.weights[: hi - lo]


class TableByFeatureIndex(VectorPool):
    """Tables indexed by the feature's position instead of its table: shared tables go wrong."""

    name = "fault-shared-table-wrong-table"

    def table_of(self, tables: tuple[TableConfig, ...], t: int, feature: int) -> int:
        return min(feature, len(tables) - 1)


class Float16Accumulation(VectorPool):
    """Accumulates in float16."""

    name = "fault-float16-accumulation"
    acc_dtype = torch.float16


class SortsIdsInPlace(VectorPool):
    """Sorts each bag's ids (and weights) in place for cache locality: the caller's batch changes."""

    name = "fault-mutates-input"

    def pool(self, tables: tuple[TableConfig, ...], weights: dict, batch: JaggedBatch) -> torch.Tensor:
        if len(batch.values):
            bag = torch.repeat_interleave(torch.arange(len(batch.lengths)), batch.lengths.to(torch.int64))
            order = torch.argsort(bag * (int(batch.values.max()) + 1) + batch.values.to(torch.int64))
            batch.values.copy_(batch.values[order].clone())
            if batch.weights is not None:
                batch.weights.copy_(batch.weights[order].clone())
        return super().pool(tables, weights, batch)


class ColumnsInBatchKeyOrder(VectorPool):
    """Output columns in the batch's key order instead of the tables' order."""

    name = "fault-columns-in-key-order"

    def columns(self, tables: tuple[TableConfig, ...], batch: JaggedBatch) -> list[tuple[int, str]]:
        table_of = {f: i for i, t in enumerate(tables) for f in t.feature_names}
        return [(table_of[k], k) for k in batch.keys]


class IgnoresSampleWeights(VectorPool):
    """Per-sample weights ignored."""

    name = "fault-ignores-sample-weights"

    def sample_weights(self, batch: JaggedBatch, lo: int, hi: int) -> torch.Tensor | None:
        return None


class Ids16Bit(VectorPool):
    """Ids packed into 16 bits (an overflowing narrow index type): ids >= 32768 wrap negative and
    index from the table's end. The int32 overflow of large tables, at a size a fuzzer can reach."""

    name = "fault-ids-16-bit"

    def ids(self, batch: JaggedBatch, lo: int, hi: int) -> torch.Tensor:
        return batch.values[lo:hi].to(torch.int16).to(torch.int64)


class LastBagDropped(VectorPool):
    """The loop over bags stops one short: the last bag of the batch pools to zeros."""

    name = "fault-last-bag-dropped"

    def fix_bag(self, acc: torch.Tensor, dim: int, is_last_feature: bool) -> torch.Tensor:
        if is_last_feature and len(acc):
            acc = acc.clone()
            acc[-1] = 0
        return acc


class Bfloat16SignLost(VectorPool):
    """bfloat16 widened by hand, ``(bits & 0x7fff) << 16``: the mask drops the sign bit."""

    name = "fault-bfloat16-widened-wrongly"

    def widen(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.dtype != torch.bfloat16:
            return super().widen(rows)
        bits = rows.view(torch.int16).to(torch.int32) & 0x7FFF
        return (bits << 16).view(torch.float32)


class ResultInTableDtype(VectorPool):
    """Returns the result in the first table's dtype instead of float32."""

    name = "fault-wrong-result-dtype"

    def finish(self, out: torch.Tensor, tables: tuple[TableConfig, ...]) -> torch.Tensor:
        return out.to(tables[0].dtype)


# -- faults that live at scale or in the structure ------------------------------------------------


class BagTruncatedAt256(VectorPool):
    """Each bag staged in a 256-id buffer: the ids past the 256th are never pooled (MEAN still
    divides by the whole length). Got through the old fuzzer: its bags were rarely that long."""

    name = "fault-bag-truncated-at-256"

    def pooled_ids(self, lengths: torch.Tensor) -> torch.Tensor | None:
        starts = torch.cumsum(lengths, 0) - lengths
        bag = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        return torch.arange(int(lengths.sum())) - starts[bag] < 256


class WarpTailDropped(VectorPool):
    """Bags longer than a warp (32 ids) reduced in whole warps: the last ``L % 32`` ids are lost."""

    name = "fault-warp-tail-dropped"

    def pooled_ids(self, lengths: torch.Tensor) -> torch.Tensor | None:
        starts = torch.cumsum(lengths, 0) - lengths
        bag = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        position = torch.arange(int(lengths.sum())) - starts[bag]
        whole = torch.where(lengths > 32, lengths // 32 * 32, lengths)
        return position < whole[bag]


class DimTile128TailDropped(VectorPool):
    """Columns processed in tiles of 128 with no tail tile: in a table of dim > 128 the last
    ``dim % 128`` columns stay 0."""

    name = "fault-dim-tile-128-tail-dropped"

    def fix_bag(self, acc: torch.Tensor, dim: int, is_last_feature: bool) -> torch.Tensor:
        if dim > 128 and dim % 128:
            acc = acc.clone()
            acc[:, dim - dim % 128 :] = 0
        return acc


class SampleBlocksCapped(VectorPool):
    """The batch split into blocks of 512 samples, at most 8 of them launched: samples from 4096
    on pool to zeros."""

    name = "fault-sample-blocks-capped"

    def feature_output(self, acc: torch.Tensor, column: int, bag_base: int) -> torch.Tensor:
        if len(acc) > 4096:
            acc = acc.clone()
            acc[4096:] = 0
        return acc


class BagGrid65535(VectorPool):
    """One program per bag on a grid of at most 65 535 programs: bags (feature-major, as in the
    batch) from index 65 535 on pool to zeros."""

    name = "fault-bag-grid-65535"

    def feature_output(self, acc: torch.Tensor, column: int, bag_base: int) -> torch.Tensor:
        first_lost = 65_535 - bag_base
        if first_lost < len(acc):
            acc = acc.clone()
            acc[max(first_lost, 0) :] = 0
        return acc


class Offsets16Bit(VectorPool):
    """A feature's bag offsets kept as int16: past 2**15 ids they wrap negative, and the kernel's
    ``start <= end`` guard pools such bags to zeros."""

    name = "fault-offsets-int16"

    def bag_ranges(self, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts, ends = super().bag_ranges(lengths)
        starts, ends = starts.to(torch.int16).to(torch.int64), ends.to(torch.int16).to(torch.int64)
        bad = (starts < 0) | (ends < starts)
        return torch.where(bad, 0, starts), torch.where(bad, 0, ends)


class OffsetsUint16(VectorPool):
    """A feature's bag offsets kept as uint16: past 2**16 ids they wrap to small values, and a bag
    whose end wrapped below its start is empty."""

    name = "fault-offsets-uint16"

    def bag_ranges(self, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts, ends = super().bag_ranges(lengths)
        starts, ends = starts % 65536, ends % 65536
        return starts, torch.where(ends < starts, starts, ends)


class FeaturesPast8Zero(VectorPool):
    """Feature descriptors held in 8 slots: every output feature past the eighth pools to zeros.
    Got through the old fuzzer: 1.75% of its problems had 9 or more features."""

    name = "fault-features-past-8-zero"

    def feature_output(self, acc: torch.Tensor, column: int, bag_base: int) -> torch.Tensor:
        return torch.zeros_like(acc) if column >= 8 else acc


class FeatureSlotsMod16(VectorPool):
    """Feature descriptors (table and ids) looked up in a 16-entry table by feature index mod 16:
    the 17th output feature repeats the first."""

    name = "fault-feature-slots-mod-16"

    def columns(self, tables: tuple[TableConfig, ...], batch: JaggedBatch) -> list[tuple[int, str]]:
        right = super().columns(tables, batch)
        return [right[n % 16] for n in range(len(right))]


class GroupedByPoolingDtype(VectorPool):
    """Tables grouped by (pooling, dtype) for one launch per group, the groups' outputs
    concatenated in sorted group order instead of the tables' order."""

    name = "fault-grouped-by-pooling-dtype"

    def columns(self, tables: tuple[TableConfig, ...], batch: JaggedBatch) -> list[tuple[int, str]]:
        right = super().columns(tables, batch)
        return sorted(right, key=lambda c: (tables[c[0]].pooling.value, str(tables[c[0]].dtype)))


class GroupedByDim(VectorPool):
    """Tables grouped by dim (one fused launch per dim), the outputs concatenated by ascending dim
    instead of in the tables' order."""

    name = "fault-grouped-by-dim"

    def columns(self, tables: tuple[TableConfig, ...], batch: JaggedBatch) -> list[tuple[int, str]]:
        return sorted(super().columns(tables, batch), key=lambda c: tables[c[0]].embedding_dim)


SCALE_FAULTS: tuple[type[VectorPool], ...] = (
    BagTruncatedAt256,
    FeaturesPast8Zero,
    WarpTailDropped,
    DimTile128TailDropped,
    SampleBlocksCapped,
    BagGrid65535,
    Offsets16Bit,
    OffsetsUint16,
    FeatureSlotsMod16,
    GroupedByPoolingDtype,
    GroupedByDim,
)
"""Bugs that live at scale or in the structure; tests/test_planted_faults.py."""


FAULTY_BACKENDS: tuple[type[VectorPool], ...] = (
    OffsetsOffByOne,
    DroppedDimTail,
    MeanByDistinctIds,
    MeanEmptyBagNaN,
    WeightsWithoutFeatureOffset,
    TableByFeatureIndex,
    Float16Accumulation,
    SortsIdsInPlace,
    ColumnsInBatchKeyOrder,
    IgnoresSampleWeights,
    Ids16Bit,
    LastBagDropped,
    Bfloat16SignLost,
    ResultInTableDtype,
)
