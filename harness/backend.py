"""The backend contract, the registry of built-in backends and loading a user's backend.

A backend is any object with ``name``, ``supports(tables, batch)`` and ``prepare(tables, weights)``
(see `Backend`). Built-in backends live in ``impls/``, one module per library, and are registered
below by name; a module whose library is missing reports itself unavailable instead of failing.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Protocol, runtime_checkable

import torch

from harness.model import SUPPORTED_DTYPES, JaggedBatch, TableConfig, TableDtype, dtype_name

Lookup = Callable[[JaggedBatch], torch.Tensor]


@runtime_checkable
class Backend(Protocol):
    """What every backend provides (DESIGN.md, "The backend contract")."""

    name: str

    def supports(self, tables: Sequence[TableConfig], batch: JaggedBatch) -> str | None:
        """``None`` when this backend can run the problem, else the reason it cannot."""

    def prepare(self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor]) -> Lookup:
        """One-time work outside any timing; returns the lookup that is checked and timed."""


def can_train(backend: object) -> bool:
    """Whether ``backend`` also trains: it has ``supports_training`` and ``prepare_training``
    (DESIGN.md, "Training"; the protocol is `harness.training.contract.TrainingBackend`)."""
    return callable(getattr(backend, "supports_training", None)) and callable(
        getattr(backend, "prepare_training", None)
    )


def table_dtypes(backend: object) -> tuple[TableDtype, ...]:
    """The table dtypes ``backend`` reads: its optional ``table_dtypes`` attribute, by default the
    float dtypes (`SUPPORTED_DTYPES`). Quantized storage is opt-in: a backend written before it
    existed is neither fuzzed nor probed on quantized tables (``table_dtypes = TABLE_DTYPES``
    opts in)."""
    return tuple(getattr(backend, "table_dtypes", SUPPORTED_DTYPES))


def undeclared_dtypes(backend: object, tables: Sequence[TableConfig]) -> str | None:
    """Why ``backend`` is not run on ``tables``: some table's dtype is not one it declares
    (`table_dtypes`); None when every one is."""
    declared = table_dtypes(backend)
    missing = sorted({dtype_name(t.dtype) for t in tables if t.dtype not in declared})
    if not missing:
        return None
    names = ", ".join(dtype_name(d) for d in declared)
    return f"tables of {', '.join(missing)}: not among the table dtypes it declares ({names})"


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
        "torch.nn.functional.embedding_bag, one call per table, CPU (quantized tables: "
        "torch.ops.quantized's embedding_bag_{byte,4bit,2bit}_rowwise_offsets)",
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
        "fbgemm-tbe-int-n",
        "impls.fbgemm_tbe_int_n:FbgemmIntNBitTBE",
        "FBGEMM IntNBitTableBatchedEmbeddingBagsCodegen for int8/int4/int2 tables, CPU, FP32 output, "
        "bounds check FATAL",
    ),
    BuiltinBackend(
        "fbgemm-tbe-int-n-warning",
        "impls.fbgemm_tbe_int_n:fbgemm_tbe_int_n_warning",
        "fbgemm-tbe-int-n with BoundsCheckMode.WARNING (a bad id becomes row 0, logged)",
    ),
    BuiltinBackend(
        "fbgemm-tbe-int-n-ignore",
        "impls.fbgemm_tbe_int_n:fbgemm_tbe_int_n_ignore",
        "fbgemm-tbe-int-n with BoundsCheckMode.IGNORE (a bad id becomes row 0, silently)",
    ),
    BuiltinBackend(
        "fbgemm-tbe-int-n-none",
        "impls.fbgemm_tbe_int_n:fbgemm_tbe_int_n_none",
        "fbgemm-tbe-int-n with BoundsCheckMode.NONE (the kernel's own check reaches the table's padding)",
    ),
    BuiltinBackend(
        "torchrec-quant",
        "impls.torchrec_quant:TorchrecQuantEBC",
        "torchrec QuantEmbeddingBagCollection (int8/int4/int2) fed a KeyedJaggedTensor, bounds check "
        "set to FATAL",
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


def _where(error: BaseException, path: Path | None) -> str:
    """``file:line`` of an import failure: a syntax error's own place, else the innermost frame in
    ``path`` (the plugin file), else the innermost frame that is not the import machinery's."""
    if isinstance(error, SyntaxError) and error.filename:
        return f"{error.filename}:{error.lineno}"
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith("<frozen")]
    mine = [f for f in frames if path is not None and Path(f.filename).resolve() == path.resolve()]
    frame = (mine or frames or [None])[-1]
    return f"{frame.filename}:{frame.lineno}" if frame is not None else str(path or "?")


def _import_failed(error: BaseException, spec: str, path: Path | None) -> BackendSpecError:
    """One line for a plugin that fails to import: where, and the error (no traceback)."""
    message = f"{type(error).__name__}: {error}".splitlines()[0]
    return BackendSpecError(f"cannot load backend {spec!r}: {_where(error, path)}: {message}")


def _load_file(path: Path, spec: str) -> ModuleType:
    """Import a plugin file as ``python path/to/file.py`` would run it: its folder importable first,
    so that it can import the modules beside it (the folder stays on ``sys.path`` for its lazy
    imports). The module gets a name of its own, so it shadows no installed module."""
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    mod_name = f"jagbench_user_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
    module = sys.modules.get(mod_name)
    if module is not None:
        return module
    file_spec = importlib.util.spec_from_file_location(mod_name, path)
    assert file_spec is not None and file_spec.loader is not None
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[mod_name] = module
    try:
        file_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise _import_failed(e, spec, path) from e
    return module


def _import_target(target: str, spec: str) -> object:
    module_name, _, attr = target.partition(":")
    if not attr:
        raise BackendSpecError(f"backend spec {spec!r} must look like module:ATTR or file.py:ATTR")
    if module_name.endswith(".py") or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise BackendSpecError(f"backend file {str(path)!r} (from {spec!r}) does not exist")
        module = _load_file(path, spec)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name or module_name.startswith(f"{e.name}."):
                raise BackendSpecError(
                    f"no module {module_name!r} (from {spec!r}): not installed, nor on PYTHONPATH"
                ) from e
            raise _import_failed(e, spec, None) from e
        except Exception as e:
            raise _import_failed(e, spec, None) from e
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
