"""Installing jagbench into a user's environment, and using it in their own pytest suite.

One module-scoped fixture builds a real virtual environment that already holds torch (this
environment's torch 2.13.0, made visible to it by a ``.pth`` line, as ``--system-site-packages``
would) and runs ``pip install`` of a copy of this checkout into it. The tests then check that
torch was neither reinstalled nor upgraded, that the installed metadata admits torch 2.11, and that
the pytest plugin (entry point ``pytest11``) works in a small example project outside the package:
docs/examples/kernel-suite, copied to a temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.cli import EXIT_FOUND, main

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "kernel-suite"
HOST_SITE = Path(torch.__file__).resolve().parent.parent


def _run(args, cwd=None, **kw) -> subprocess.CompletedProcess:
    """Run outside this checkout (its folder would be importable, metadata included) by default."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAGBENCH_SAVE_DIR")}
    cwd = cwd or Path(args[0]).parent
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=600, **kw)


def _snapshot(python: Path) -> dict:
    code = (
        "import json, torch, importlib.metadata as m; "
        "print(json.dumps({'version': torch.__version__, 'file': torch.__file__, "
        "'dist': str(m.distribution('torch')._path)}))"
    )
    done = _run([str(python), "-c", code])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def user_env(tmp_path_factory):
    """(venv python, its site-packages, pip's output, torch before): jagbench installed next to an
    existing torch."""
    base = tmp_path_factory.mktemp("user-env")
    source = base / "jagbench-src"
    skip = shutil.ignore_patterns(".*", "__pycache__", "reports", "build", "*.egg-info")
    shutil.copytree(ROOT, source, ignore=skip)
    venv = base / "venv"
    created = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert created.returncode == 0, created.stderr
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    site = Path(purelib.stdout.strip())
    (site / "host-torch.pth").write_text(f"{HOST_SITE}\n")  # torch present, as a user's would be
    before = _snapshot(python)
    pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]
    # The build uses the environment's own setuptools (the host's, through the .pth): no download.
    install = _run([*pip, "install", "--no-build-isolation", str(source)], cwd=base)
    assert install.returncode == 0, install.stdout + install.stderr
    return python, site, install.stdout + install.stderr, before


def test_pip_install_keeps_the_torch_already_there(user_env):
    python, site, output, before = user_env
    assert before["version"].startswith("2.13.0") and Path(before["file"]).is_relative_to(HOST_SITE)
    assert _snapshot(python) == before
    assert not list(site.glob("torch*")), "pip installed a torch of its own into the environment"
    installing = [line for line in output.splitlines() if line.startswith("Installing collected packages")]
    assert installing and "torch" not in installing[0].replace("jagbench", ""), output


def test_the_installed_metadata_admits_torch_2_11(user_env):
    python, _, _, _ = user_env
    code = "import importlib.metadata as m; print('\\n'.join(m.requires('jagbench')))"
    requires = _run([str(python), "-c", code]).stdout.splitlines()
    from packaging.requirements import Requirement

    torch_req = [Requirement(r) for r in requires if Requirement(r).name == "torch"]
    assert len(torch_req) == 1, requires
    spec = torch_req[0].specifier
    assert spec.contains("2.11.0") and spec.contains("2.13.0") and not spec.contains("2.10.0"), spec
    assert not any(s.operator == "==" for r in requires for s in Requirement(r).specifier), requires


@pytest.fixture(scope="module")
def example_project(tmp_path_factory):
    project = tmp_path_factory.mktemp("kernel-project")
    for f in EXAMPLE.glob("*.py"):
        shutil.copy(f, project / f.name)
    return project


def test_the_pytest_plugin_names_the_backend_in_a_users_own_suite(user_env, example_project):
    python = user_env[0]
    run = _run(
        [
            str(python),
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--jagbench-backend",
            "my_kernels.py:MyKernel",
        ],
        cwd=example_project,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed" in run.stdout
    assert not (example_project / "jagbench-cases").exists()


@pytest.fixture
def suite(pytester, monkeypatch):
    """The example project in pytester's folder, run in this process with only our plugin loaded."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    for f in EXAMPLE.glob("*.py"):
        shutil.copy(f, pytester.path / f.name)
    return lambda *args: pytester.runpytest_inprocess(
        "-p", "harness.testing.plugin", "-p", "no:cacheprovider", *args
    )


def test_a_wrong_kernel_fails_with_the_fuzzers_text_and_its_case_replays(suite, pytester, capsys):
    result = suite(
        "-k",
        "hand_written",
        "--jagbench-backend",
        "my_kernels.py:DropsLastId",
        "--jagbench-save-dir",
        "failing",
    )
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "AssertionError: ## my_kernels.py:DropsLastId: disagree" in out
    assert "worst element: sample 2, column " in out and "saved as failing/" in out
    (case,) = (pytester.path / "failing").glob("*.json")
    assert json.loads(case.read_text())["backend"] == "my_kernels.py:DropsLastId"
    capsys.readouterr()
    assert main(["replay", str(case.relative_to(pytester.path))]) == EXIT_FOUND
    assert "disagree, found by replaying" in capsys.readouterr().out


def test_without_a_backend_the_fixture_fails_with_advice(suite):
    result = suite("-k", "hand_written")
    result.assert_outcomes(errors=1)
    assert (
        "no backend named for the jagbench_backend fixture: pass --jagbench-backend SPEC"
        in result.stdout.str()
    )
