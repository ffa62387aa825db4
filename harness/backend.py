"""The backend contract, the registry of built-in backends and loading a user's backend.

A backend is any object with ``name``, ``supports(tables, batch)`` and ``prepare(tables, weights)``
(see `Backend`). Built-in backends live in ``impls/``, one module per library, and are registered
below by name; a module whose library is missing reports itself unavailable instead of failing.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from harness.model import JaggedBatch, TableConfig

Lookup = Callable[[JaggedBatch], torch.Tensor]


@runtime_checkable
class Backend(Protocol):
    """What every backend provides (DESIGN.md, "The backend contract")."""

    name: str

    def supports(self, tables: Sequence[TableConfig], batch: JaggedBatch) -> str | None:
        """``None`` when this backend can run the problem, else the reason it cannot."""

    def prepare(self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor]) -> Lookup:
        """One-time work outside any timing; returns the lookup that is checked and timed."""


class BackendUnavailable(RuntimeError):
    """A backend that cannot run on this machine (missing library, no device); says why."""


class BackendSpecError(ValueError):
    """A backend name or ``module:ATTR`` / ``file.py:ATTR`` spec that does not resolve."""


@dataclass(frozen=True)
class BuiltinBackend:
    """A registry entry: ``target`` is ``"impls.module:factory"``; the factory takes no arguments."""

    name: str
    target: str
    summary: str


BUILTIN_BACKENDS: tuple[BuiltinBackend, ...] = (
    BuiltinBackend(
        "reference",
        "impls.reference:ReferenceBackend",
        "float64 loop over samples, features and ids: the oracle",
    ),
    BuiltinBackend(
        "torch",
        "impls.torch_embedding_bag:TorchEmbeddingBag",
        "torch.nn.functional.embedding_bag, one call per table, CPU",
    ),
    BuiltinBackend(
        "torch-cuda",
        "impls.torch_embedding_bag:torch_cuda",
        "torch.nn.functional.embedding_bag, one call per table, on the first CUDA device",
    ),
    BuiltinBackend(
        "numba",
        "impls.numba_fused:NumbaFused",
        "our fused parallel numba kernel: every table and feature in one call, CPU",
    ),
    BuiltinBackend(
        "triton",
        "impls.triton_fused:TritonFused",
        "our fused Triton kernel: one launch for all tables (CUDA, or Triton's interpreter on CPU)",
    ),
    BuiltinBackend(
        "torchrec",
        "impls.torchrec_ebc:TorchrecEBC",
        "torchrec EmbeddingBagCollection fed a KeyedJaggedTensor",
    ),
    BuiltinBackend(
        "torchrec-fused",
        "impls.torchrec_ebc:TorchrecFusedEBC",
        "torchrec FusedEmbeddingBagCollection (FBGEMM TBE underneath)",
    ),
    BuiltinBackend(
        "fbgemm-tbe",
        "impls.fbgemm_tbe:FbgemmTBE",
        "FBGEMM SplitTableBatchedEmbeddingBagsCodegen, one module for all tables, CPU host, "
        "bounds check FATAL",
    ),
    BuiltinBackend(
        "fbgemm-tbe-int32",
        "impls.fbgemm_tbe:fbgemm_tbe_int32",
        "fbgemm-tbe fed int32 ids and offsets (converted in the lookup), bounds check FATAL",
    ),
    BuiltinBackend(
        "fbgemm-tbe-none",
        "impls.fbgemm_tbe:fbgemm_tbe_nocheck",
        "fbgemm-tbe with BoundsCheckMode.NONE (FBGEMM 1.8's CPU kernel still raises on a bad id)",
    ),
    BuiltinBackend(
        "torchrec-sharded-tw",
        "impls.torchrec_sharded:sharded_tw",
        "torchrec sharded EBC, table-wise plan, 2 local gloo ranks (persistent pool)",
    ),
    BuiltinBackend(
        "torchrec-sharded-rw",
        "impls.torchrec_sharded:sharded_rw",
        "torchrec sharded EBC, row-wise plan, 2 local gloo ranks (persistent pool)",
    ),
    BuiltinBackend(
        "torchrec-sharded-cw",
        "impls.torchrec_sharded:sharded_cw",
        "torchrec sharded EBC, column-wise plan, 2 local gloo ranks (persistent pool)",
    ),
    BuiltinBackend(
        "torchrec-sharded-twcw",
        "impls.torchrec_sharded:sharded_twcw",
        "torchrec sharded EBC, table-column-wise plan, 2 local gloo ranks (persistent pool)",
    ),
    BuiltinBackend(
        "torchrec-sharded-dp",
        "impls.torchrec_sharded:sharded_dp",
        "torchrec sharded EBC, data-parallel plan, 2 local gloo ranks (persistent pool)",
    ),
)


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str | None
    summary: str


def builtin_names() -> list[str]:
    return [b.name for b in BUILTIN_BACKENDS]


def _resolve_attr(obj: object, spec: str) -> Backend:
    is_factory = isinstance(obj, type) or (callable(obj) and not isinstance(obj, Backend))
    backend = obj() if is_factory else obj
    if not isinstance(backend, Backend):
        raise BackendSpecError(
            f"{spec} is a {type(backend).__name__}, not a backend: it needs name, supports() and "
            "prepare() (or a zero-argument callable returning such an object)"
        )
    return backend


def _import_target(target: str, spec: str) -> object:
    module_name, _, attr = target.partition(":")
    if not attr:
        raise BackendSpecError(f"backend spec {spec!r} must look like module:ATTR or file.py:ATTR")
    if module_name.endswith(".py") or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise BackendSpecError(f"backend file {str(path)!r} (from {spec!r}) does not exist")
        mod_name = f"jagbench_user_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(mod_name)
        if module is None:
            file_spec = importlib.util.spec_from_file_location(mod_name, path)
            assert file_spec is not None and file_spec.loader is not None
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[mod_name] = module
            file_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                raise BackendSpecError(f"no module {module_name!r} (from {spec!r})") from e
            raise
    if not hasattr(module, attr):
        raise BackendSpecError(f"{module_name!r} has no attribute {attr!r} (from {spec!r})")
    return getattr(module, attr)


def load_backend(spec: str) -> Backend:
    """A backend by built-in name, ``package.module:ATTR`` or ``path/to/file.py:ATTR``.

    Raises `BackendUnavailable` (with the reason) for a built-in whose library or device is
    missing, and `BackendSpecError` for a name or spec that does not resolve.
    """
    for b in BUILTIN_BACKENDS:
        if b.name == spec:
            module_name, _, attr = b.target.partition(":")
            try:
                factory = getattr(importlib.import_module(module_name), attr)
            except ImportError as e:
                raise BackendUnavailable(f"{spec}: cannot import {module_name}: {e}") from e
            return _resolve_attr(factory, spec)
    if ":" not in spec:
        raise BackendSpecError(
            f"unknown backend {spec!r}; built-in backends: {', '.join(builtin_names())}; "
            "a user backend is named module:ATTR or path/to/file.py:ATTR"
        )
    return _resolve_attr(_import_target(spec, spec), spec)


def backend_statuses() -> list[BackendStatus]:
    """Every built-in backend, available or not, with the reason."""
    out = []
    for b in BUILTIN_BACKENDS:
        try:
            load_backend(b.name)
        except BackendUnavailable as e:
            out.append(BackendStatus(b.name, False, str(e).removeprefix(f"{b.name}: "), b.summary))
        else:
            out.append(BackendStatus(b.name, True, None, b.summary))
    return out


def available_backends() -> list[Backend]:
    """Every built-in backend that can run here."""
    return [load_backend(s.name) for s in backend_statuses() if s.available]
