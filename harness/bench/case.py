"""What the interleaved timing times: one backend on one workload in one mode, a `BenchCase`.

The runner (`harness.bench.runner`) does the same for every kind of case: ask whether the backend
can run it (`unsupported`), `prepare` it outside any timing, make one call and `check` its result
against the reference, then time the call in rounds interleaved with the workload's other cases.
A kind of case says only what differs: what is prepared and called, how a result is judged, and
what a call moves (`byte_model`). `harness.bench.forward.ForwardCase` is the forward lookup; a
training step (``--mode train``) or a quantized-table lookup is another subclass, registered in
`harness.bench.runner.CASE_KINDS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from harness.agreement import Verdict, mark_known
from harness.backend import Backend
from harness.bench.workloads import Workload, case_fits
from harness.model import JaggedBatch, Problem


class BenchCase(ABC):
    """One (backend, workload) of a mode. Subclasses set the class variables and the methods."""

    mode: ClassVar[str]
    """The ``--mode`` that selects this kind, recorded in ``extra_info.mode``."""
    test_name: ClassVar[str]
    """The benchmark's name stem in the JSON, as pytest-benchmark names a test: ``test_lookup``."""
    byte_model_text: ClassVar[str]
    """How `byte_model` counts, in words (recorded in the JSON and the report)."""

    def __init__(self, backend: Backend, workload: Workload, problem: Problem, batch: JaggedBatch) -> None:
        self.backend = backend
        self.workload = workload
        self.problem = problem
        self.batch = batch

    @property
    def name(self) -> str:
        """``test_lookup[numba@dlrm-like]``: the benchmark's name in pytest-benchmark's JSON."""
        return f"{self.test_name}[{self.backend.name}@{self.workload.name}]"

    def unsupported(self) -> str | None:
        """Why this case cannot run (the backend declines it, or it would not fit in memory now)."""
        return self.backend_declines() or case_fits(self.workload, self.backend)

    @abstractmethod
    def backend_declines(self) -> str | None:
        """The backend's own reason not to run this case (``supports``), or ``None``."""

    @abstractmethod
    def prepare(self) -> Callable[[], Any]:
        """The one-time work, outside any timing; returns the zero-argument call that is timed."""

    @abstractmethod
    def check(self, result: Any, samples: int) -> Verdict:
        """Judge one call's result against the reference on up to ``samples`` samples."""

    def mark_known(self, verdict: Verdict, known: Sequence[Any]) -> Verdict:
        """``verdict`` relabelled `Outcome.KNOWN` where this kind's known cases explain it (the
        forward cases, ``known``, by default; a training step has its own)."""
        return mark_known([verdict], self.problem, known)[0]

    @abstractmethod
    def byte_model(self) -> dict[str, int]:
        """What one call moves: at least ``bytes`` (for GB/s); recorded in ``extra_info``."""

    def device_of(self, result: Any) -> str:
        """Where the result lives (``"cpu"``, ``"cuda:0"``): a CUDA result makes timing synchronise."""
        return str(getattr(result, "device", "cpu"))

    def extra_info(self) -> dict[str, Any]:
        """What the JSON records about this case beside its timings."""
        return {
            "backend": self.backend.name,
            "workload": self.workload.name,
            "mode": self.mode,
            "parameters": self.workload.parameters(),
            **self.byte_model(),
            "byte_model": self.byte_model_text,
        }
