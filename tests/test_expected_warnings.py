"""Expected third-party warnings are counted and summarised, not printed; any other warning shows."""

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from harness.expected_warnings import EXPECTED, TALLY_ENV, capture_expected_warnings, install

ROOT = Path(__file__).resolve().parent.parent


_MODULES: dict[str, dict] = {}


def warn_from(module: str, message: str, category=RuntimeWarning) -> None:
    """A warning issued by line 1 of ``module`` (its name, file and warning registry), as numpy's
    floating-point warnings are issued from the line of the interpreter that computes."""
    filename = str(Path("/site-packages", *module.split(".")).with_suffix(".py"))
    code = compile(f"warnings.warn({message!r}, {category.__name__}, stacklevel=1)", filename, "exec")
    exec(
        code,
        _MODULES.setdefault(module, {"__name__": module, "warnings": warnings, category.__name__: category}),
    )


def test_every_expected_kind_says_why():
    for w in EXPECTED:
        assert w.why and "{n}" in w.summary and (w.logger is None) != (w.category is None), w.key


def test_expected_warnings_are_counted_every_time_and_others_still_show(recwarn):
    warnings.simplefilter("default")  # Python's own: each place warns once (pytest restores it after)
    with capture_expected_warnings() as tally:
        for _ in range(3):
            warn_from("triton.runtime.interpreter", "overflow encountered in add")
        warn_from("triton.runtime.interpreter", "invalid value encountered in multiply")
        warn_from("my_kernels", "overflow encountered in add")  # same text, another module: shown
        warnings.warn("something else", UserWarning, stacklevel=1)
    shown = [(Path(w.filename).name, str(w.message)) for w in recwarn]
    assert shown == [
        ("my_kernels.py", "overflow encountered in add"),
        (Path(__file__).name, "something else"),
    ]
    assert tally.counts["triton-interpreter-floating-point"] == 4
    assert tally.summary_lines() == [
        "triton interpreter: 4 floating-point warnings from numpy (overflow, invalid value), expected "
        "for wide-range, inf and NaN values"
    ]


def test_expected_log_records_are_counted_not_emitted(caplog):
    caplog.set_level(logging.WARNING)
    with capture_expected_warnings() as tally:
        logging.getLogger("torch.fx._symbolic_trace").warning(
            "is_fx_tracing will return true for both fx.symbolic_trace and torch.export. Please use ..."
        )
        logging.getLogger("torch.fx._symbolic_trace").warning("is_fx_tracing: something new")
    assert tally.to_json() == {"torch-fx-is-fx-tracing": 1}
    assert [r.getMessage() for r in caplog.records] == ["is_fx_tracing: something new"]
    logging.getLogger("torch.fx._symbolic_trace").warning("is_fx_tracing will return true for both")
    assert len(caplog.records) == 2  # the filter is gone after the block


def test_a_child_that_installs_the_filter_adds_its_counts_to_the_commands(capfd):
    child = (
        "import warnings, logging\n"
        "from harness.expected_warnings import install\n"
        "install()\n"
        "logging.getLogger('torchrec.distributed.utils').warning("
        "'Compute Kernel is dense, caching params will be ignored')\n"
        "logging.getLogger('torchrec.distributed.utils').warning('something unexpected')\n"
    )
    with capture_expected_warnings() as tally:
        assert os.environ[TALLY_ENV]
        subprocess.run([sys.executable, "-c", child], cwd=ROOT, check=True)
    assert TALLY_ENV not in os.environ
    assert tally.to_json() == {"torchrec-caching-params-ignored": 1}
    err = capfd.readouterr().err
    assert "something unexpected" in err and "caching params" not in err


def test_the_real_triton_interpreter_overflow_is_recognised(recwarn):
    pytest.importorskip("triton")
    from harness.backend import load_backend
    from harness.model import JaggedBatch, TableConfig

    tables = [TableConfig("t", 4, 2, ("f",))]
    lookup = load_backend("triton").prepare(tables, {"t": torch.full((4, 2), 3e38)})
    with capture_expected_warnings() as tally:
        out = lookup(JaggedBatch.from_bags({"f": [[0, 1, 2]]}))
    assert torch.isinf(out).all()  # the overflow is the IEEE result, as on a GPU
    assert tally.counts["triton-interpreter-floating-point"] >= 1
    assert [str(w.message) for w in recwarn] == []


def test_a_command_prints_no_raw_third_party_warning_from_torchrec_or_its_sharded_ranks():
    pytest.importorskip("torchrec")
    backends = ["torchrec", "torchrec-sharded-rw"]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "check",
            "--seed",
            "9",
            "--problems",
            "2",
        ]  # 2 tables: rw reduce-scatters
        + [a for b in backends for a in ("--backend", b)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    shown = [line for line in run.stderr.splitlines() if not line.startswith(("not shown: ", "check: "))]
    assert shown == [], run.stderr  # no warning, no log record: nothing but the progress and the summary
    summary = [line for line in run.stderr.splitlines() if line.startswith("not shown: ")]
    assert any("torch.fx:" in line for line in summary), run.stderr
    assert any("torchrec sharding:" in line and "caching params" in line for line in summary), run.stderr


def test_install_counts_for_the_rest_of_the_process(monkeypatch):
    monkeypatch.delenv(TALLY_ENV, raising=False)
    with warnings.catch_warnings():
        before = warnings.showwarning
        tally = install()
        warn_from("triton.runtime.interpreter", "overflow encountered in add")
        warnings.showwarning = before
    assert tally.counts["triton-interpreter-floating-point"] == 1
