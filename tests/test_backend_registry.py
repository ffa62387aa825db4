"""The registry of built-in backends and loading a user's backend by spec."""

import textwrap

import pytest

from harness.backend import (
    BackendSpecError,
    BackendUnavailable,
    backend_statuses,
    builtin_names,
    load_backend,
)
from harness.cli import main


def test_reference_and_torch_are_available():
    status = {s.name: s for s in backend_statuses()}
    assert status["reference"].available and status["torch"].available


def test_every_builtin_has_a_status_with_a_reason_when_unavailable():
    for s in backend_statuses():
        assert s.name in builtin_names()
        assert s.available or s.reason


def test_unknown_name_lists_the_builtins():
    with pytest.raises(
        BackendSpecError, match="unknown backend .nope.; built-in backends: reference, torch, "
    ):
        load_backend("nope")


USER_BACKEND = textwrap.dedent("""
    from impls.reference import ReferenceBackend

    class Mine(ReferenceBackend):
        name = "mine"

    INSTANCE = Mine()
    NOT_A_BACKEND = 42

    def make():
        return Mine()
""")


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_backend.py"
    path.write_text(USER_BACKEND)
    return path


@pytest.mark.parametrize("attr", ["INSTANCE", "make", "Mine"])
def test_user_backend_from_file(user_file, attr):
    assert load_backend(f"{user_file}:{attr}").name == "mine"


def test_user_backend_from_module(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    assert load_backend("my_backend:make").name == "mine"


def test_bad_specs_say_what_is_wrong(user_file):
    with pytest.raises(BackendSpecError, match="has no attribute 'MISSING'"):
        load_backend(f"{user_file}:MISSING")
    with pytest.raises(BackendSpecError, match="is a int, not a backend"):
        load_backend(f"{user_file}:NOT_A_BACKEND")
    with pytest.raises(BackendSpecError, match="does not exist"):
        load_backend("no/such/file.py:X")
    with pytest.raises(BackendSpecError, match="no module 'no_such_module_xyz'"):
        load_backend("no_such_module_xyz:X")


def test_unavailable_backend_raises_with_reason(monkeypatch):
    import harness.backend as hb

    entry = hb.BuiltinBackend("ghost", "impls.no_such_impl_module:Ghost", "a backend whose module is missing")
    monkeypatch.setattr(hb, "BUILTIN_BACKENDS", hb.BUILTIN_BACKENDS + (entry,))
    with pytest.raises(BackendUnavailable, match="ghost: cannot import"):
        load_backend("ghost")
    ghost = [s for s in backend_statuses() if s.name == "ghost"][0]
    assert not ghost.available and "cannot import" in ghost.reason


def test_cli_backends_lists_them(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "| reference" in out and "| torch" in out


def test_cli_reports_a_bad_backend_as_usage_error(capsys):
    assert main(["check", "--backend", "nope", "--problems", "1"]) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err


def test_a_backend_file_imports_the_modules_beside_it_as_python_file_py_would(tmp_path, monkeypatch):
    (tmp_path / "helper.py").write_text("from impls.reference import ReferenceBackend as Base\n")
    (tmp_path / "mykernel.py").write_text(
        "from helper import Base\n\nclass K(Base):\n    name = 'mykernel'\n"
    )
    monkeypatch.chdir(tmp_path.parent)  # not the file's folder: it is importable all the same
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    assert load_backend(f"{tmp_path.name}/mykernel.py:K").name == "mykernel"


@pytest.mark.parametrize(
    "source, line, error",
    [
        ("import os\nfrom no_such_helper_xyz import pool\n", 2, "ModuleNotFoundError: No module named"),
        ("x = 1\ny = 1 / 0\n", 2, "ZeroDivisionError: division by zero"),
        ("def broken(:\n", 1, "SyntaxError: "),
    ],
    ids=["missing-module", "raises", "syntax"],
)
def test_a_backend_file_that_fails_to_import_gets_one_line_with_file_line_and_error_and_exit_2(
    tmp_path, capsys, source, line, error
):
    path = tmp_path / "bad_kernel.py"
    path.write_text(source)
    assert main(["check", "--backend", f"{path}:K", "--problems", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"jagbench check: cannot load backend '{path}:K': {path}:{line}: {error}")
    assert "Traceback" not in err[0]
