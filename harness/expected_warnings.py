"""Third-party warnings that are expected: counted and summarised, not printed. Every other
warning is shown as usual.

`EXPECTED` is the documented list: what each warning is (a ``warnings.warn`` of a category from
a module, or a record of a ``logging`` logger), the pattern of its message, and why it is
expected, i.e. why it says nothing about the backend or the run. A command (`harness.cli.main`)
runs inside `capture_expected_warnings` and ends with one line per kind seen, e.g.
``triton interpreter: 48 floating-point warnings from numpy (overflow, invalid value), expected
for wide-range, inf and NaN values``.

Child processes whose output reaches the terminal (torchrec's sharded ranks) call `install` at
start: their counts go to a tally file named by the ``JAGBENCH_EXPECTED_WARNINGS`` environment
variable, which the command's `capture_expected_warnings` sets and adds up at the end.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TALLY_ENV = "JAGBENCH_EXPECTED_WARNINGS"


@dataclass(frozen=True)
class ExpectedWarning:
    """One kind of expected warning: either ``category`` + ``module`` or ``logger``, and ``message``.

    ``module`` is a regular expression on the module that issues the warning (as the
    ``warnings`` filters match it); ``message`` one matched at the start of the text.
    ``summary`` is the summary line, with ``{n}`` for the count.
    """

    key: str
    message: str
    summary: str
    why: str
    category: type[Warning] | None = None
    module: str | None = None
    logger: str | None = None

    def matches_warning(self, message: object, category: type[Warning], filename: str) -> bool:
        if self.category is None or self.module is None or not issubclass(category, self.category):
            return False
        path = self.module.replace(r"\.", ".").replace(".", r"[/\\]") + r"\.py$"
        return bool(re.search(path, filename)) and bool(re.match(self.message, str(message)))

    def matches_record(self, record: logging.LogRecord) -> bool:
        return record.name == self.logger and bool(re.match(self.message, record.getMessage()))


EXPECTED: tuple[ExpectedWarning, ...] = (
    ExpectedWarning(
        key="triton-interpreter-floating-point",
        category=RuntimeWarning,
        module=r"triton\.runtime\.interpreter",
        message=r"(overflow|invalid value|divide by zero|underflow) encountered in ",
        summary="triton interpreter: {n} floating-point warnings from numpy (overflow, invalid "
        "value), expected for wide-range, inf and NaN values",
        why="Without a GPU, Triton's interpreter (TRITON_INTERPRET=1) runs each kernel operation "
        "with numpy. Sums of values near the float32 limit overflow to inf, and inf - inf or "
        "inf * 0 give NaN, exactly as on a GPU; numpy warns where the hardware is silent. The "
        "fuzzer and the robustness catalogue draw such values on purpose, and every result is "
        "still checked against the reference.",
    ),
    ExpectedWarning(
        key="torch-fx-is-fx-tracing",
        logger="torch.fx._symbolic_trace",
        message=r"is_fx_tracing will return true for both fx\.symbolic_trace and torch\.export",
        summary="torch.fx: {n} 'is_fx_tracing will return true ...' notices (once per process "
        "that runs a torchrec module), expected",
        why="torch 2.13 logs this advice for torch.export authors once per process, the first "
        "time anything asks torch.fx.is_fx_tracing(); torchrec's KeyedTensor (a torch.fx proxyable "
        "class) asks in every EmbeddingBagCollection forward. It says nothing about the lookup.",
    ),
    ExpectedWarning(
        key="torchrec-caching-params-ignored",
        logger="torchrec.distributed.utils",
        message=r"(Compute Kernel is dense|Sharding Type is data_parallel), caching params will be "
        r"ignored",
        summary="torchrec sharding: {n} 'caching params will be ignored' notices, expected for "
        "dense CPU kernels",
        why="The sharded backends shard on the CPU with the dense compute kernel (and the "
        "data-parallel plan), where FBGEMM's UVM caching parameters do not apply; torchrec logs "
        "this for every table it shards so.",
    ),
    ExpectedWarning(
        key="torchrec-ddp-broadcast-buffers",
        category=FutureWarning,
        module=r"torchrec\.distributed\.embeddingbag",
        message=r"`broadcast_buffers` is deprecated",
        summary="torchrec sharding: {n} '`broadcast_buffers` is deprecated' warnings (torchrec "
        "1.8 on torch 2.13's DistributedDataParallel), expected",
        why="torchrec 1.8 builds the data-parallel plan's DistributedDataParallel with an "
        "argument that torch 2.13 deprecates; it is torchrec's call, nothing of ours.",
    ),
    ExpectedWarning(
        key="torchrec-reduce-scatter-tensor",
        category=FutureWarning,
        module=r"torch\.distributed\.c10d_logger",
        message=r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
        summary="torchrec sharding: {n} '`reduce_scatter_tensor` is deprecated' warnings (torchrec "
        "1.8's row-wise plan on torch 2.13), expected",
        why="torchrec 1.8's row-wise sharding reduces the pooled embeddings with "
        "torch.distributed.reduce_scatter_tensor, which torch 2.13 deprecates (the warning is "
        "issued from torch's c10d_logger wrapper, once per rank); torchrec's call, nothing of ours.",
    ),
)


@dataclass
class WarningTally:
    """How many expected warnings of each kind a run swallowed (children's counts included)."""

    expected: Sequence[ExpectedWarning] = EXPECTED
    counts: Counter = field(default_factory=Counter)
    sink: Path | None = None
    """In a child process: the tally file its counts are appended to (one key per line)."""

    def add(self, key: str) -> None:
        if self.sink is None:
            self.counts[key] += 1
            return
        try:  # the file is the parent's; it may be gone when a child outlives the command
            fd = os.open(self.sink, os.O_WRONLY | os.O_APPEND)
        except OSError:
            return
        with os.fdopen(fd, "a") as f:
            f.write(key + "\n")

    def add_file(self, path: Path) -> None:
        try:
            keys = path.read_text().split()
        except OSError:
            return
        self.counts.update(keys)

    def summary_lines(self) -> list[str]:
        """One line per kind seen: its summary with the count."""
        return [w.summary.format(n=self.counts[w.key]) for w in self.expected if self.counts[w.key]]

    def to_json(self) -> dict[str, int]:
        return {w.key: self.counts[w.key] for w in self.expected if self.counts[w.key]}


class _RecordFilter(logging.Filter):
    def __init__(self, tally: WarningTally, kinds: Sequence[ExpectedWarning]) -> None:
        super().__init__()
        self.tally, self.kinds = tally, kinds

    def filter(self, record: logging.LogRecord) -> bool:
        for w in self.kinds:
            if w.matches_record(record):
                self.tally.add(w.key)
                return False
        return True


def _hook(tally: WarningTally, previous: Any) -> Any:
    def showwarning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        for w in tally.expected:
            if w.matches_warning(message, category, filename):
                tally.add(w.key)
                return
        previous(message, category, filename, lineno, file, line)

    return showwarning


def _always_show_expected(expected: Sequence[ExpectedWarning]) -> None:
    """Let every occurrence of an expected warning reach the hook (to be counted), not the first."""
    for w in expected:
        if w.category is not None:
            warnings.filterwarnings("always", message=w.message, category=w.category, module=w.module or "")


def _add_record_filters(tally: WarningTally) -> list[tuple[logging.Logger, logging.Filter]]:
    added = []
    for name in sorted({w.logger for w in tally.expected if w.logger}):
        f = _RecordFilter(tally, [w for w in tally.expected if w.logger == name])
        logger = logging.getLogger(name)
        logger.addFilter(f)
        added.append((logger, f))
    return added


def install(expected: Sequence[ExpectedWarning] = EXPECTED) -> WarningTally:
    """For the rest of this process, count the expected warnings instead of printing them.

    In a child of a command (``JAGBENCH_EXPECTED_WARNINGS`` set) the counts go to the command's
    tally file.
    """
    sink = os.environ.get(TALLY_ENV)
    tally = WarningTally(expected, sink=Path(sink) if sink else None)
    _always_show_expected(expected)
    warnings.showwarning = _hook(tally, warnings.showwarning)
    _add_record_filters(tally)
    return tally


@contextmanager
def capture_expected_warnings(expected: Sequence[ExpectedWarning] = EXPECTED) -> Iterator[WarningTally]:
    """Count the expected warnings of this process and of its children (that `install`) meanwhile.

    The counts are complete when the block ends. Warnings filters, ``warnings.showwarning``, the
    loggers' filters and the environment are restored then.
    """
    tally = WarningTally(expected)
    fd, name = tempfile.mkstemp(prefix="jagbench-warnings-", suffix=".txt")
    os.close(fd)
    before = os.environ.get(TALLY_ENV)
    os.environ[TALLY_ENV] = name
    added: list[tuple[logging.Logger, logging.Filter]] = []
    try:
        with warnings.catch_warnings():
            _always_show_expected(expected)
            warnings.showwarning = _hook(tally, warnings.showwarning)
            added = _add_record_filters(tally)
            yield tally
    finally:
        for logger, f in added:
            logger.removeFilter(f)
        if before is None:
            os.environ.pop(TALLY_ENV, None)
        else:
            os.environ[TALLY_ENV] = before
        tally.add_file(Path(name))
        Path(name).unlink(missing_ok=True)
