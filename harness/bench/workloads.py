"""Benchmark workloads: data files under ``cases/workloads/`` turned into tables, weights and a batch.

A file holds one workload (``"name"``) or a family (``"family"`` + ``"sweep"`` + ``"base"``) that
expands into one workload per sweep value, named ``<family>-<value>``. Table groups are written
in FBGEMM's terms (rows E, dim D, bag size L with its spread, id distribution); any of
``num_embeddings``, ``embedding_dim`` and the bag's ``L`` may be a list, one entry per table.
See docs/benchmarks.md ("Workload files") for every field.

Generation is seeded and lazy: `Workload.tables` is cheap, `Workload.problem` allocates the
weights and draws the batch. `check_fits` refuses, before anything is allocated, a workload
whose weights (times the copies a backend may make) would not fit in the available memory.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.cases import CASES_DIR
from harness.model import (
    JaggedBatch,
    Pooling,
    Problem,
    TableConfig,
    dtype_from_name,
    dtype_name,
    stored_row_bytes,
    total_dim,
)
from harness.weights import make_weights

FORMAT = "jagbench-workload/1"
WORKLOADS_DIR = CASES_DIR / "workloads"
STANDARD = ("dlrm-like", "wide", "many-small", "cache-resident")
SWEEP_PARAMS = ("B", "L", "D", "alpha")
BAG_DISTS = ("fixed", "uniform", "normal")
ID_DISTS = ("uniform", "zipf")
# Copies of the weights a run may hold at once: the harness's own, plus up to two made by a
# backend's prepare() (torchrec/FBGEMM modules copy the tables; a fused kernel may stack them).
DEFAULT_COPIES = 3


# Host copies of the weights the built-in backends' prepare() holds, until each declares its own
# ``weight_copies``: torch pools the given tensors in place; numba and triton stack the tables once;
# torchrec allocates its modules then loads the weights; torchrec's fused EBC (FBGEMM TBE with
# its optimizer state) was killed for memory on `wide` (3.8 GiB) at about 4 copies on this machine.
BUILTIN_WEIGHT_COPIES = {
    "torch": 0,
    "torch-cuda": 0,
    "numba": 1,
    "triton": 1,
    "torchrec": 2,
    "torchrec-fused": 4,
    "fbgemm-tbe": 2,
    "fbgemm-tbe-int32": 2,
    "fbgemm-tbe-none": 2,
}


class WorkloadError(ValueError):
    """A workload file or name that cannot be used; names the file and the field."""


class WorkloadTooLarge(WorkloadError):
    """A workload whose estimated memory exceeds what this machine has available."""


@dataclass(frozen=True)
class TableSpec:
    """One table of a workload, with how its features' bags and ids are drawn."""

    config: TableConfig
    bag: dict[str, Any]
    ids: dict[str, Any]


@dataclass(frozen=True)
class Workload:
    """A named benchmark problem: table specs, batch size, seed; generated on demand."""

    name: str
    description: str
    batch_size: int
    specs: tuple[TableSpec, ...]
    weighted: bool = False
    seed: int = 0
    tags: tuple[str, ...] = ()
    family: str | None = None
    sweep: dict[str, Any] | None = None
    source: str | None = None
    scaled: str | None = None
    path: Path | None = None

    @property
    def tables(self) -> tuple[TableConfig, ...]:
        return tuple(s.config for s in self.specs)

    @property
    def weights_bytes(self) -> int:
        return sum(t.num_embeddings * stored_row_bytes(t) for t in self.tables)

    @property
    def mean_ids(self) -> float:
        """Expected ids per batch: B times the mean bag size, summed over features."""
        return sum(self.batch_size * _mean_bag(s.bag) * len(s.config.feature_names) for s in self.specs)

    def parameters(self) -> dict[str, Any]:
        """The workload in FBGEMM's terms (T, E, D, B, L), for ``extra_info`` and reports."""
        tables = self.tables
        return {
            "T": len(tables),
            "features": sum(len(t.feature_names) for t in tables),
            "E": _collapse([t.num_embeddings for t in tables]),
            "D": _collapse([t.embedding_dim for t in tables]),
            "B": self.batch_size,
            "L": _collapse([_mean_bag(s.bag) for s in self.specs]),
            "bag": _collapse([s.bag for s in self.specs]),
            "ids": _collapse([s.ids for s in self.specs]),
            "pooling": _collapse([t.pooling.value for t in tables]),
            "dtype": _collapse([dtype_name(t.dtype) for t in tables]),
            "weighted": self.weighted,
            "total_dim": total_dim(tables),
            "weights_bytes": self.weights_bytes,
            "seed": self.seed,
            "family": self.family,
            "sweep": self.sweep,
            "scaled": self.scaled,
        }

    def problem(self) -> Problem:
        """Allocate the weights and draw the batch (seeded: the same on every run and machine)."""
        tables = self.tables
        weights = make_weights(tables, self.seed)
        rng = np.random.default_rng(self.seed)
        keys, lengths, values, per_sample = [], [], [], []
        for spec in self.specs:
            for feature in spec.config.feature_names:
                n = _draw_lengths(rng, spec.bag, self.batch_size)
                keys.append(feature)
                lengths.append(n)
                values.append(_draw_ids(rng, spec.ids, spec.config.num_embeddings, int(n.sum())))
                if self.weighted:
                    per_sample.append(rng.uniform(0.0, 2.0, int(n.sum())).astype(np.float32))
        batch = JaggedBatch(
            keys=tuple(keys),
            values=torch.from_numpy(np.concatenate(values) if values else np.zeros(0, np.int64)),
            lengths=torch.from_numpy(np.concatenate(lengths) if lengths else np.zeros(0, np.int64)),
            weights=torch.from_numpy(np.concatenate(per_sample)) if self.weighted and per_sample else None,
        )
        return Problem(tables, weights, batch, {"workload": self.name, "seed": self.seed})


def _collapse(items: Sequence[Any]) -> Any:
    """One value when all are equal, else the list (keeps ``extra_info`` short)."""
    first = items[0] if items else None
    return first if all(i == first for i in items) else list(items)


def _mean_bag(bag: Mapping[str, Any]) -> float:
    dist = bag["dist"]
    if dist == "fixed":
        return float(bag["L"])
    if dist == "uniform":
        return (bag["min"] + bag["max"]) / 2
    return float(bag["mean"])  # normal, clipped at 0: close enough for an estimate


def _draw_lengths(rng: np.random.Generator, bag: Mapping[str, Any], batch_size: int) -> np.ndarray:
    dist = bag["dist"]
    if dist == "fixed":
        return np.full(batch_size, int(bag["L"]), dtype=np.int64)
    if dist == "uniform":
        return rng.integers(int(bag["min"]), int(bag["max"]), batch_size, endpoint=True, dtype=np.int64)
    n = np.rint(rng.normal(float(bag["mean"]), float(bag["std"]), batch_size))
    return np.clip(n, 0, None).astype(np.int64)


def _draw_ids(rng: np.random.Generator, ids: Mapping[str, Any], rows: int, count: int) -> np.ndarray:
    """Uniform ids, or Zipf ranks scattered over the table as FBGEMM's request generator does.

    FBGEMM (``fbgemm_gpu/tbe/utils/requests.py``) draws Zipf ranks, folds them into the table
    (``(rank - 1) % E``) and maps the ranks through a random injective map onto rows, so the hot
    rows are spread over the table instead of packed at its start (which would flatter caches).
    FBGEMM also makes ids unique within a bag; we do not (duplicates are legal input).
    """
    if ids["dist"] == "uniform":
        return rng.integers(0, rows, count, dtype=np.int64)
    ranks = (rng.zipf(float(ids["alpha"]), count) - 1) % rows
    used = int(ranks.max()) + 1 if count else 0
    scatter = rng.choice(rows, size=used, replace=False) if used else np.zeros(0, np.int64)
    return scatter[ranks].astype(np.int64)


def _require(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise WorkloadError(f"{where}: missing field {key!r}")
    return d[key]


def _per_table(value: Any, count: int, what: str, where: str) -> list[Any]:
    if isinstance(value, list):
        if len(value) != count:
            raise WorkloadError(f"{where}: {what} has {len(value)} entries but count is {count}")
        return list(value)
    return [value] * count


def _check_bag(bag: Mapping[str, Any], where: str) -> None:
    dist = bag.get("dist")
    need = {"fixed": ("L",), "uniform": ("min", "max"), "normal": ("mean", "std")}.get(dist)
    if need is None:
        raise WorkloadError(f"{where}: bag dist {dist!r} is not one of {BAG_DISTS}")
    for key in need:
        _require(bag, key, f"{where} bag")
    if dist == "uniform" and not 0 <= bag["min"] <= bag["max"]:
        raise WorkloadError(f"{where}: bag needs 0 <= min <= max, got {bag['min']}..{bag['max']}")


def _check_ids(ids: Mapping[str, Any], where: str) -> None:
    if ids.get("dist") not in ID_DISTS:
        raise WorkloadError(f"{where}: ids dist {ids.get('dist')!r} is not one of {ID_DISTS}")
    if ids["dist"] == "zipf" and not float(_require(ids, "alpha", f"{where} ids")) > 1.0:
        raise WorkloadError(f"{where}: Zipf alpha must be > 1, got {ids['alpha']}")


def _specs(groups: Sequence[Mapping[str, Any]], row_cap: int | None, where: str) -> tuple[TableSpec, ...]:
    specs = []
    for g, group in enumerate(groups):
        w = f"{where} tables[{g}]"
        bag = dict(_require(group, "bag", w))
        lists = [
            v
            for v in (group.get("num_embeddings"), group.get("embedding_dim"), bag.get("L"))
            if isinstance(v, list)
        ]
        count = int(group.get("count", len(lists[0]) if lists else 1))
        rows = _per_table(_require(group, "num_embeddings", w), count, "num_embeddings", w)
        dims = _per_table(_require(group, "embedding_dim", w), count, "embedding_dim", w)
        bag_ls = _per_table(bag.get("L"), count, "bag L", w)
        ids = dict(group.get("ids", {"dist": "uniform"}))
        _check_ids(ids, w)
        per_table = int(group.get("features_per_table", 1))
        for i in range(count):
            name = f"t{len(specs)}"
            table_bag = {**bag, "L": bag_ls[i]} if bag["dist"] == "fixed" else bag
            _check_bag(table_bag, w)
            e = int(rows[i]) if row_cap is None else min(int(rows[i]), row_cap)
            if e < 1 or int(dims[i]) < 1:
                raise WorkloadError(f"{w}: table {i} needs num_embeddings >= 1 and embedding_dim >= 1")
            config = TableConfig(
                name=name,
                num_embeddings=e,
                embedding_dim=int(dims[i]),
                feature_names=tuple(f"{name}_f{j}" for j in range(per_table))
                if per_table > 1
                else (f"{name}_f",),
                pooling=Pooling(group.get("pooling", "sum")),
                dtype=dtype_from_name(group.get("dtype", "float32")),
            )
            specs.append(TableSpec(config, table_bag, ids))
    if not specs:
        raise WorkloadError(f"{where}: no tables")
    return tuple(specs)


def _apply_sweep(base: Mapping[str, Any], param: str, value: Any) -> dict[str, Any]:
    d = json.loads(json.dumps(base))
    if param == "B":
        d["batch_size"] = int(value)
    for group in d["tables"]:
        if param == "D":
            group["embedding_dim"] = int(value)
        elif param == "L":
            group["bag"] = {"dist": "fixed", "L": int(value)}
        elif param == "alpha":
            group["ids"] = {"dist": "zipf", "alpha": float(value)}
    return d


def _workload(d: Mapping[str, Any], name: str, where: str, **extra: Any) -> Workload:
    weighted = bool(d.get("weighted", False))
    specs = _specs(_require(d, "tables", where), d.get("row_cap"), where)
    if weighted and any(s.config.pooling is not Pooling.SUM for s in specs):
        raise WorkloadError(f"{where}: per-sample weights require sum pooling")
    batch_size = int(_require(d, "batch_size", where))
    if batch_size < 0:
        raise WorkloadError(f"{where}: batch_size must be >= 0")
    return Workload(
        name=name,
        description=str(extra.pop("description", d.get("description", ""))),
        batch_size=batch_size,
        specs=specs,
        weighted=weighted,
        seed=int(d.get("seed", 0)),
        source=d.get("source"),
        scaled=d.get("scaled"),
        **extra,
    )


def workloads_from_json(d: Mapping[str, Any], path: Path | None = None) -> list[Workload]:
    """The workload(s) described by one file's JSON (a family expands to one per sweep value)."""
    where = str(path) if path else "workload"
    if d.get("format") != FORMAT:
        raise WorkloadError(f"{where}: format is {d.get('format')!r}, expected {FORMAT!r}")
    tags = tuple(d.get("tags", ()))
    if "family" not in d:
        return [_workload(d, str(_require(d, "name", where)), where, tags=tags, path=path)]
    family = str(d["family"])
    sweep = _require(d, "sweep", where)
    param = sweep.get("param")
    if param not in SWEEP_PARAMS:
        raise WorkloadError(f"{where}: sweep param {param!r} is not one of {SWEEP_PARAMS}")
    base = _require(d, "base", where)
    return [
        _workload(
            _apply_sweep(base, param, v),
            f"{family}-{v}",
            where,
            description=f"{d.get('description', '')} ({param} = {v})",
            tags=tags,
            family=family,
            sweep={"param": param, "value": v},
            path=path,
        )
        for v in sweep["values"]
    ]


def load_workloads(directory: Path = WORKLOADS_DIR) -> dict[str, Workload]:
    """Every workload under ``directory``, by name (files in name order, families expanded)."""
    out: dict[str, Workload] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise WorkloadError(f"{path}: not JSON: {e}") from e
        for w in workloads_from_json(data, path):
            if w.name in out:
                raise WorkloadError(f"{path}: workload name {w.name!r} already defined in {out[w.name].path}")
            out[w.name] = w
    return out


def get_workloads(names: Sequence[str], directory: Path = WORKLOADS_DIR) -> list[Workload]:
    """Workloads by name; a family name or a tag (``standard``, ``sweep``) selects all of its members,
    and a path to a ``.json`` workload file loads that file."""
    known = load_workloads(directory)
    out: list[Workload] = []
    for name in names:
        if name.endswith(".json") and Path(name).is_file():
            try:
                chosen = workloads_from_json(json.loads(Path(name).read_text()), Path(name))
            except json.JSONDecodeError as e:
                raise WorkloadError(f"{name}: not JSON: {e}") from e
        elif name in known:
            chosen = [known[name]]
        else:
            chosen = [w for w in known.values() if w.family == name or name in w.tags]
        if not chosen:
            families = sorted({w.family for w in known.values() if w.family})
            raise WorkloadError(
                f"unknown workload {name!r}; known: {', '.join(known)}; families: {', '.join(families)}; "
                "tags: standard, quantized, sweep, model, smoke, extra"
            )
        out += [w for w in chosen if w not in out]
    return out


def available_memory_bytes() -> int:
    """``MemAvailable`` from /proc/meminfo (Linux), else the physical memory size."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def estimated_bytes(workload: Workload, copies: int = DEFAULT_COPIES) -> int:
    """Weights times ``copies``, plus the batch (ids, lengths, weights) and the output."""
    ids = math.ceil(workload.mean_ids)
    batch = ids * (8 + (4 if workload.weighted else 0)) + 8 * workload.batch_size * len(workload.tables)
    output = workload.batch_size * total_dim(workload.tables) * 4
    return workload.weights_bytes * copies + batch + 2 * output


def backend_weight_copies(backend: object) -> int:
    """Copies of the weights a backend's ``prepare`` may hold (for the memory check of one case).

    A backend may say so itself with a ``weight_copies`` attribute. Otherwise a backend with a
    ``world_size`` (ranks in separate processes) is assumed to hold ``2 + 2 * world_size`` copies
    (a shared-memory file, then per rank the loaded tensors and its module's own copy); a built-in
    one the count in `BUILTIN_WEIGHT_COPIES`; any other 2.
    """
    explicit = getattr(backend, "weight_copies", None)
    if explicit is not None:
        return int(explicit)
    world_size = getattr(backend, "world_size", None)
    if isinstance(world_size, int):
        return 2 + 2 * world_size
    return BUILTIN_WEIGHT_COPIES.get(getattr(backend, "name", ""), 2)


def case_fits(workload: Workload, backend: object, fraction: float = 0.8) -> str | None:
    """``None`` when ``backend``'s copies of the (already allocated) weights fit in the memory
    available now, else why not: the case is then skipped instead of risking an out-of-memory kill."""
    copies = backend_weight_copies(backend)
    need = workload.weights_bytes * copies + 2 * workload.batch_size * total_dim(workload.tables) * 4
    available = available_memory_bytes()
    if need <= fraction * available:
        return None
    return (
        f"would not fit in memory: about {need / 2**30:.1f} GiB ({copies} copies of "
        f"{workload.weights_bytes / 2**30:.2f} GiB of weights) with {available / 2**30:.1f} GiB available"
    )


def check_fits(
    workload: Workload, copies: int = DEFAULT_COPIES, available: int | None = None, fraction: float = 0.8
) -> None:
    """Raise `WorkloadTooLarge` unless the estimate fits in ``fraction`` of the available memory."""
    available = available_memory_bytes() if available is None else available
    need = estimated_bytes(workload, copies)
    if need > fraction * available:
        raise WorkloadTooLarge(
            f"workload {workload.name!r} needs about {need / 2**30:.1f} GiB "
            f"({workload.weights_bytes / 2**30:.2f} GiB of weights x {copies} copies a backend may hold, "
            f"plus batch and output) but only {available / 2**30:.1f} GiB is available "
            f"(refusing above {fraction:.0%}); scale its rows down in {workload.path or 'the workload file'}"
        )
