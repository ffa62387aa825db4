"""The Python steps of ``scripts/gpu-check`` (see docs/gpu-check.md); run from the checkout.

    python scripts/gpu_check.py env OUTDIR        versions, device, backends -> env.json
    python scripts/gpu_check.py fuzz OUTDIR ...   the fuzz driver's Python API, when `jagbench fuzz` is absent
    python scripts/gpu_check.py kernels OUTDIR    device copy bandwidth, kernel times with the ids
                                                  already on the device, a small tuning sweep -> kernels.json
    python scripts/gpu_check.py train OUTDIR      triton's training step: a bounded fuzz against the
                                                  reference, the step timed on small workloads -> train.json
    python scripts/gpu_check.py summary OUTDIR    summary.md from whatever the other steps left

Each step writes its own file and never needs the network or torchrec. ``kernels`` times with
``triton.testing.do_bench`` (CUDA events, L2 flushed before every run, median), so it measures the
lookup with the batch's ids and per-sample weights already resident on the GPU: the part that the
``jagbench bench`` figures (which copy the batch from the host inside every timed call, for every
backend) cannot isolate.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GPU_WORKLOADS = ("gpu-large", "gpu-large-zipf", "gpu-large-fp16", "gpu-large-bf16", "gpu-large-jagged")
BACKENDS = ("torch-cuda", "triton")
# The training step's timing: standard workloads small enough to draw in seconds (the gpu-* ones
# take 15-25 s each), with FBGEMM's EXACT_ROWWISE_ADAGRAD, the DLRM optimizer.
TRAIN_WORKLOADS = ("dlrm-like", "many-small")


def _write(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def _versions() -> dict[str, Any]:
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch.version.cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    for name in ("triton", "numba", "numpy", "hypothesis", "pytest_benchmark", "torchrec", "fbgemm_gpu"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "installed")
        except Exception as e:  # noqa: BLE001 - absent or broken: say which
            out[name] = f"not importable: {type(e).__name__}: {e}"[:200]
    # Triton builds its launcher with the system C compiler on first use (cc, gcc or $CC).
    out["c_compiler"] = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), "none found")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["device"] = p.name
        out["device_memory_gib"] = round(p.total_memory / 2**30, 1)
        out["multiprocessors"] = p.multi_processor_count
    return out


def cmd_env(out: Path) -> int:
    from harness.backend import backend_statuses

    data = _versions()
    data["backends"] = [
        {"name": s.name, "available": s.available, "reason": s.reason} for s in backend_statuses()
    ]
    _write(out / "env.json", data)
    return 0 if data["cuda_available"] else 2


def cmd_fuzz(out: Path, seconds: float, backends: list[str]) -> int:
    """Fallback fuzz step: the fuzz driver's Python API, saving failures under OUTDIR/regressions."""
    from harness.backend import load_backend
    from harness.fuzz.driver import fuzz
    from harness.fuzz.format import format_report
    from harness.progress import progress_for

    chosen = [load_backend(b) for b in backends]
    report = fuzz(
        chosen,
        labels=backends,
        time_budget=seconds,
        save_dir=out / "regressions",
        shrink_budget=min(30.0, seconds / 2),
        progress=progress_for(),
    )
    text = format_report(report)
    (out / "fuzz.md").write_text(text + "\n")
    print(text)
    return 1 if report.failures else 0


def device_copy_bandwidth(size_bytes: int = 1 << 30) -> dict[str, Any]:
    """Device-to-device ``copy_`` of a float32 buffer (read + write bytes), do_bench median."""
    from triton.testing import do_bench

    n = size_bytes // 4
    src = torch.ones(n, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    host = torch.ones(64 << 20, dtype=torch.float32)
    h2d_ms = do_bench(lambda: host.to("cuda"), warmup=5, rep=50, return_mode="median")
    pinned = host.pin_memory()
    pinned_ms = do_bench(lambda: pinned.to("cuda", non_blocking=True), warmup=5, rep=50, return_mode="median")
    return {
        "method": "torch copy_ of a 1 GiB float32 buffer into another on the device; "
        "triton.testing.do_bench median (CUDA events); bytes = read + write",
        "buffer_bytes": n * 4,
        "median_ms": ms,
        "gbps": 2 * n * 4 / (ms * 1e-3) / 1e9,
        "host_to_device_pageable_gbps": host.numel() * 4 / (h2d_ms * 1e-3) / 1e9,
        "host_to_device_pinned_gbps": host.numel() * 4 / (pinned_ms * 1e-3) / 1e9,
    }


def _cache_weights() -> None:
    """Make the workloads' weights once per table shape and seed, cast per dtype.

    ``harness.weights.make_table_weights`` draws float32 values and casts them to the table's
    dtype, so casting one cached float32 draw gives bit-identical weights: the five GPU workloads
    share 8 tables x 2,000,000 x 128 values, and drawing them takes most of this step otherwise.
    """
    import harness.bench.workloads as hw
    from harness.model import TableConfig
    from harness.weights import make_weights

    @functools.lru_cache(maxsize=1)
    def fp32(key: tuple[tuple[str, int, int], ...], seed: int) -> dict[str, torch.Tensor]:
        tables = [TableConfig(n, e, d, (f"{n}_f",)) for n, e, d in key]
        return make_weights(tables, seed)

    def cached(tables, seed=0, scale=1.0):  # noqa: ANN001, ANN202 - same signature as make_weights
        if scale != 1.0:
            return make_weights(tables, seed, scale)
        base = fp32(tuple((t.name, t.num_embeddings, t.embedding_dim) for t in tables), seed)
        return {t.name: base[t.name].to(t.dtype) for t in tables}

    hw.make_weights = cached


def _resident(batch: Any) -> Any:
    """The batch with its ids and per-sample weights on the GPU (lengths stay on the host)."""
    from harness.model import JaggedBatch

    w = batch.weights.cuda() if batch.weights is not None else None
    return JaggedBatch(batch.keys, batch.values.cuda(), batch.lengths, w)


def _time(lookup: Any, batch: Any) -> float:
    from triton.testing import do_bench

    return do_bench(lambda: lookup(batch), warmup=10, rep=100, return_mode="median")


def cmd_kernels(out: Path, workloads: list[str], tune_seconds: float) -> int:
    from harness.backend import load_backend
    from harness.bench.metrics import BYTE_MODEL, byte_model
    from harness.bench.workloads import get_workloads
    from impls.triton_fused import Tuning

    data: dict[str, Any] = {
        "versions": _versions(),
        "byte_model": BYTE_MODEL,
        "baseline": BACKENDS[0],
        "cases": [],
        "tuning": [],
    }
    path = out / "kernels.json"
    data["bandwidth"] = device_copy_bandwidth()
    ceiling = data["bandwidth"]["gbps"]
    _write(path, data)
    _cache_weights()
    backends = {}
    status = 0
    for name in BACKENDS:
        try:
            backends[name] = load_backend(name)
        except Exception as e:  # noqa: BLE001 - say why and measure the others
            error = f"{type(e).__name__}: {e}"[:500]
            data["cases"].append({"workload": "-", "backend": name, "error": error})
            status = 1
    for w in get_workloads(workloads):
        t0 = time.monotonic()
        problem = w.problem()
        batch = _resident(problem.batch)
        bytes_ = byte_model(problem.tables, problem.batch)["bytes"]
        results = {}
        for name, backend in backends.items():
            row: dict[str, Any] = {"workload": w.name, "backend": name, "bytes": bytes_}
            try:
                lookup = backend.prepare(problem.tables, problem.weights)
                results[name] = lookup(batch)
                ms = _time(lookup, batch)
                row.update(median_ms=ms, gbps=bytes_ / (ms * 1e-3) / 1e9)
                row["fraction_of_copy_bandwidth"] = row["gbps"] / ceiling
                if name == "triton" and w.name == workloads[0] and tune_seconds > 0:
                    data["tuning"] = _tune(lookup, batch, bytes_, tune_seconds, Tuning)
                del lookup
            except Exception as e:  # noqa: BLE001 - record it and go on with the rest
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                traceback.print_exc()
                status = 1
            data["cases"].append(row)
            torch.cuda.empty_cache()
        # The last row is triton's: how it compares with the baseline (torch-cuda) on this workload.
        baseline = BACKENDS[0]
        if baseline in results and "triton" in results:
            a, b = results[baseline], results["triton"]
            diff = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
            data["cases"][-1]["max_abs_diff_vs_baseline"] = diff
        times = {r["backend"]: r.get("median_ms") for r in data["cases"] if r["workload"] == w.name}
        if times.get(baseline) and times.get("triton"):
            data["cases"][-1]["speedup_vs_baseline"] = times[baseline] / times["triton"]
        print(f"{w.name}: {times} ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
        del problem, batch, results
        _write(path, data)
    return status


def _tune(lookup: Any, batch: Any, bytes_: int, seconds: float, tuning: Any) -> list[dict[str, Any]]:
    """Median time of other launch parameters on the same prepared tables, within ``seconds``."""
    grid = [(b, u, 4) for b in (8, 16, 32) for u in (1, 2, 4)] + [(16, 2, 8), (32, 2, 8), (8, 2, 2)]
    rows = []
    end = time.monotonic() + seconds
    for block_b, unroll, warps in grid:
        if time.monotonic() > end:
            break
        t = tuning(block_b=block_b, unroll=unroll, num_warps=warps)
        try:
            ms = _time(lookup.with_tuning(t), batch)
            rows.append(
                {
                    "block_b": block_b,
                    "unroll": unroll,
                    "num_warps": warps,
                    "median_ms": ms,
                    "gbps": bytes_ / (ms * 1e-3) / 1e9,
                }
            )
        except Exception as e:  # noqa: BLE001
            rows.append({"block_b": block_b, "unroll": unroll, "num_warps": warps, "error": str(e)[:300]})
    return rows


def _train_fuzz(backend: Any, out: Path, seconds: float) -> dict[str, Any]:
    """The training fuzz driver on ``backend`` for ``seconds`` (its failure minimised and saved under
    OUTDIR/regressions); a plain Hypothesis loop over `check_training` where the driver is absent."""
    try:
        from harness.fuzz.training import fuzz_training_backend
    except ImportError:
        fuzz_training_backend = None
    if fuzz_training_backend is not None:
        stats, failure = fuzz_training_backend(
            backend,
            time_budget=seconds,
            save_dir=out / "regressions",
            shrink_budget=min(15.0, seconds / 2),
        )
        return {
            "driver": "harness.fuzz.training",
            "examples": stats.examples,
            "agreed": stats.agreed,
            "known": stats.known,
            "unsupported": stats.unsupported,
            "failed": failure is not None,
            "detail": None if failure is None else failure.verdict.detail,
            "case": None if failure is None or failure.case_path is None else str(failure.case_path),
        }
    from hypothesis import HealthCheck, given, settings

    from harness.training.check import check_training
    from harness.training.spec import build_training_problem
    from harness.training.strategies import training_specs

    counts = {"examples": 0, "agreed": 0, "unsupported": 0, "failed": False, "detail": None}
    deadline = time.monotonic() + seconds

    @settings(max_examples=10_000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(training_specs())
    def run(spec: Any) -> None:
        if counts["failed"] or time.monotonic() > deadline:
            return
        verdict = check_training(backend, build_training_problem(spec))
        counts["examples"] += 1
        counts["agreed"] += verdict.outcome.value == "agree"
        counts["unsupported"] += verdict.outcome.value == "unsupported"
        if verdict.failed:
            counts.update(failed=True, detail=verdict.detail, spec=spec.to_json())

    run()
    return {"driver": "check_training over training_specs", **counts}


def cmd_train(out: Path, workloads: list[str], fuzz_seconds: float) -> int:
    """triton's training step on the GPU: the fuzz (`_train_fuzz`), then the step timed with the
    batch and grad_output resident on the device (do_bench median, the step continuing its own
    state from call to call), beside the forward alone on the same tables, with the training byte
    model (`harness.bench.training`) and the copy bandwidth of kernels.json."""
    from harness.backend import load_backend
    from harness.bench.workloads import get_workloads
    from harness.training.contract import OptimizerConfig

    optimizer = OptimizerConfig("rowwise_adagrad", 0.01)
    data: dict[str, Any] = {
        "versions": _versions(),
        "optimizer": optimizer.describe(),
        "fuzz": None,
        "cases": [],
    }
    path = out / "train.json"
    status = 0
    try:
        backend = load_backend("triton")
        data["fuzz"] = _train_fuzz(backend, out, fuzz_seconds)
        status = int(bool(data["fuzz"]["failed"]))
    except Exception as e:  # noqa: BLE001 - record it, time the step anyway
        data["fuzz"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        traceback.print_exc()
        _write(path, data)
        return 1
    _write(path, data)
    kernels = out / "kernels.json"
    bandwidth = json.loads(kernels.read_text()).get("bandwidth", {}) if kernels.exists() else {}
    ceiling = bandwidth.get("gbps") or device_copy_bandwidth()["gbps"]
    data["copy_bandwidth_gbps"] = ceiling
    try:
        from harness.bench.training import TRAIN_BYTE_MODEL, training_byte_model
    except ImportError:
        TRAIN_BYTE_MODEL, training_byte_model = None, None
    data["byte_model"] = TRAIN_BYTE_MODEL
    for w in get_workloads(workloads):
        t0 = time.monotonic()
        row: dict[str, Any] = {"workload": w.name, "backend": "triton"}
        try:
            row.update(_time_train_step(backend, w, optimizer, training_byte_model))
            if "bytes" in row:
                row["gbps"] = row["bytes"] / (row["median_ms"] * 1e-3) / 1e9
                row["fraction_of_copy_bandwidth"] = row["gbps"] / ceiling
        except Exception as e:  # noqa: BLE001 - record it and go on with the rest
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            traceback.print_exc()
            status = 1
        data["cases"].append(row)
        torch.cuda.empty_cache()
        print(f"train {w.name}: {row.get('median_ms')} ms ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
        _write(path, data)
    return status


def _time_train_step(backend: Any, workload: Any, optimizer: Any, byte_model: Any) -> dict[str, Any]:
    """One workload's step and forward medians (ms), with the batch and grad_output on the device."""
    from harness.training.spec import make_grad_output

    problem = workload.problem()
    row: dict[str, Any] = {}
    if byte_model is not None:
        row["bytes"] = byte_model(problem.tables, problem.batch, optimizer)["bytes"]
    step = backend.prepare_training(problem.tables, problem.weights, optimizer)
    batch = _resident(problem.batch)
    grad = make_grad_output(problem.tables, batch.batch_size, "normal", workload.seed).cuda()
    step(batch, grad)  # compiles the kernels
    row["median_ms"] = _time(lambda b: step(b, grad), batch)
    row["forward_ms"] = _time(step.lookup, batch)
    return row


def _load_bench(out: Path) -> dict[str, Any] | None:
    path = out / "bench.json"
    if path.exists():
        return json.loads(path.read_text())
    partial = out / "bench.json.partial.jsonl"
    if partial.exists():
        lines = [json.loads(x) for x in partial.read_text().splitlines() if x.strip()]
        return {"partial": True, "records": lines}
    return None


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.3g}"
        return "" if x is None else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def cmd_summary(out: Path) -> int:
    parts = ["# jagbench GPU check", ""]
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
    parts.append(
        f"Device: {env.get('device', 'unknown')}; torch {env.get('torch')} "
        f"(CUDA {env.get('torch.version.cuda')}), triton {env.get('triton')}, "
        f"C compiler for Triton's launcher: {env.get('c_compiler')}."
    )
    steps = out / "steps.tsv"
    if steps.exists():
        rows = [line.split("\t") for line in steps.read_text().splitlines() if line.strip()]
        parts += ["", "## Steps", "", _table(["step", "exit", "seconds"], rows)]
    kernels = json.loads((out / "kernels.json").read_text()) if (out / "kernels.json").exists() else None
    if kernels:
        bw = kernels.get("bandwidth", {})
        parts += [
            "",
            "## Kernel times, ids resident on the device (triton.testing.do_bench median)",
            "",
            f"Device copy bandwidth (read + write, 1 GiB copy_): {bw.get('gbps', float('nan')):.0f} GB/s; "
            f"host-to-device {bw.get('host_to_device_pageable_gbps', float('nan')):.1f} GB/s pageable, "
            f"{bw.get('host_to_device_pinned_gbps', float('nan')):.1f} GB/s pinned.",
            f"Bytes: {kernels.get('byte_model')}.",
            "",
        ]
        rows = [
            [
                c["workload"],
                c["backend"],
                c.get("median_ms"),
                c.get("gbps"),
                c.get("fraction_of_copy_bandwidth"),
                c.get("speedup_vs_baseline"),
                c.get("error"),
            ]
            for c in kernels.get("cases", [])
        ]
        parts.append(
            _table(
                ["workload", "backend", "median ms", "GB/s", "of copy bw", "triton vs torch-cuda", "error"],
                rows,
            )
        )
        if kernels.get("tuning"):
            parts += ["", "### triton launch parameters on the first workload", ""]
            parts.append(
                _table(
                    ["bags/program", "unroll", "warps", "median ms", "GB/s"],
                    [
                        [t["block_b"], t["unroll"], t["num_warps"], t.get("median_ms"), t.get("gbps")]
                        for t in kernels["tuning"]
                    ],
                )
            )
        goal = [
            c for c in kernels.get("cases", []) if c["workload"] == "gpu-large" and c["backend"] == "triton"
        ]
        if goal and "gbps" in goal[0]:
            g = goal[0]
            parts += [
                "",
                f"Goal (gpu-large): triton at {g.get('speedup_vs_baseline') or float('nan'):.2f}x "
                f"torch-cuda (goal >= 1.0) and {g['fraction_of_copy_bandwidth']:.0%} of the copy "
                "bandwidth (goal >= 70%).",
            ]
    train = json.loads((out / "train.json").read_text()) if (out / "train.json").exists() else None
    if train:
        fuzz = train.get("fuzz") or {}
        parts += ["", f"## triton training ({train.get('optimizer')})", ""]
        if "error" in fuzz:
            parts.append(f"Fuzz: error {fuzz['error']}")
        else:
            verdict = f"FAILED: {fuzz.get('detail')}" if fuzz.get("failed") else "no failure"
            parts.append(
                f"Fuzz ({fuzz.get('driver')}): {fuzz.get('examples')} examples, {fuzz.get('agreed')} agreed, "
                f"{fuzz.get('unsupported')} unsupported; {verdict}"
                + (f" (case {fuzz['case']})" if fuzz.get("case") else "")
            )
        parts += [
            "",
            "Step (forward, backward, update) with the batch and grad_output on the device, do_bench "
            f"median; copy bandwidth {train.get('copy_bandwidth_gbps') or float('nan'):.0f} GB/s. "
            f"Bytes: {train.get('byte_model')}.",
            "",
        ]
        rows = [
            [
                c["workload"],
                c.get("median_ms"),
                c.get("forward_ms"),
                c.get("gbps"),
                c.get("fraction_of_copy_bandwidth"),
                c.get("error"),
            ]
            for c in train.get("cases", [])
        ]
        parts.append(_table(["workload", "step ms", "forward ms", "GB/s", "of copy bw", "error"], rows))
    bench = _load_bench(out)
    if bench and "benchmarks" in bench:
        parts += ["", "## jagbench bench (batch copied from the host inside every timed call)", ""]
        rows = []
        for b in bench["benchmarks"]:
            info = b.get("extra_info", {})
            rows.append(
                [
                    info.get("workload"),
                    info.get("backend"),
                    b["stats"]["median"] * 1e3,
                    info.get("gbps"),
                    info.get("bandwidth_fraction"),
                    info.get("speedup_vs_baseline"),
                ]
            )
        parts.append(
            _table(["workload", "backend", "median ms", "GB/s", "of bandwidth", "vs baseline"], rows)
        )
    elif bench:
        parts += [
            "",
            "## jagbench bench",
            "",
            "Interrupted: see bench.json.partial.jsonl and the report folder.",
        ]
    for name in ("fuzz.md", "fuzz.log"):
        if (out / name).exists():
            tail = (out / name).read_text().strip().splitlines()[-25:]
            parts += ["", f"## Fuzz ({name}, last lines)", "", "```", *tail, "```"]
            break
    (out / "summary.md").write_text("\n".join(parts) + "\n")
    print("\n".join(parts))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="step", required=True)
    for name in ("env", "summary"):
        sub.add_parser(name).add_argument("outdir", type=Path)
    f = sub.add_parser("fuzz")
    f.add_argument("outdir", type=Path)
    f.add_argument("--seconds", type=float, default=60.0)
    f.add_argument("--backend", action="append", default=None)
    k = sub.add_parser("kernels")
    k.add_argument("outdir", type=Path)
    k.add_argument("--workload", action="append", default=None)
    k.add_argument("--tune-seconds", type=float, default=20.0)
    t = sub.add_parser("train")
    t.add_argument("outdir", type=Path)
    t.add_argument("--workload", action="append", default=None)
    t.add_argument("--fuzz-seconds", type=float, default=15.0)
    args = p.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    if args.step == "env":
        return cmd_env(args.outdir)
    if args.step == "fuzz":
        return cmd_fuzz(args.outdir, args.seconds, args.backend or list(BACKENDS))
    if args.step == "kernels":
        if not torch.cuda.is_available():
            print("gpu_check kernels: torch sees no CUDA device", file=sys.stderr)
            return 2
        return cmd_kernels(args.outdir, args.workload or list(GPU_WORKLOADS), args.tune_seconds)
    if args.step == "train":
        if not torch.cuda.is_available():
            print("gpu_check train: torch sees no CUDA device", file=sys.stderr)
            return 2
        return cmd_train(args.outdir, args.workload or list(TRAIN_WORKLOADS), args.fuzz_seconds)
    return cmd_summary(args.outdir)


if __name__ == "__main__":
    sys.exit(main())
