"""The pytest plugin (entry point ``pytest11``): name the backend under test on the command line.

    pytest --jagbench-backend my_kernels.py:Backend    # repeatable: the tests run for each
    pytest --jagbench-save-dir failing-cases/           # where assert_agrees saves (jagbench-cases/)

or in the ini file (``[tool.pytest.ini_options]``): ``jagbench_backend = ["my_kernels.py:Backend"]``.
The session-scoped fixture ``jagbench_backend`` is the loaded backend (so it mixes with ``@given``);
a test that asks for it while none is named fails with that advice. pytest loads this module in
every session of an environment where jagbench is installed; the backend is loaded only by the
fixture.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

BACKEND_OPTION = "--jagbench-backend"


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("jagbench", "jagbench (pooled embedding lookup backends)")
    group.addoption(
        BACKEND_OPTION,
        action="append",
        default=[],
        metavar="SPEC",
        help="backend for the jagbench_backend fixture: a built-in name, module:ATTR or file.py:ATTR "
        "(repeatable: tests that use the fixture run once per backend)",
    )
    group.addoption(
        "--jagbench-save-dir",
        default=None,
        metavar="DIR",
        help="where assert_agrees saves failing cases (default jagbench-cases/ in the working directory)",
    )
    parser.addini(
        "jagbench_backend", "backend specs used when --jagbench-backend is not given", type="linelist"
    )


def _specs(config: Any) -> list[str]:
    return list(config.getoption(BACKEND_OPTION) or config.getini("jagbench_backend") or [])


SAVE_DIR_ENV = "JAGBENCH_SAVE_DIR"
"""Where `harness.testing.agrees.assert_agrees` saves failing cases (its ``default_save_dir``)."""
_saved_env: list[str | None] = []


def pytest_configure(config: Any) -> None:
    save_dir = config.getoption("--jagbench-save-dir")
    if save_dir:
        _saved_env.append(os.environ.get(SAVE_DIR_ENV))
        os.environ[SAVE_DIR_ENV] = str(save_dir)


def pytest_unconfigure(config: Any) -> None:
    if _saved_env:
        before = _saved_env.pop()
        if before is None:
            os.environ.pop(SAVE_DIR_ENV, None)
        else:
            os.environ[SAVE_DIR_ENV] = before


def pytest_generate_tests(metafunc: Any) -> None:
    if "jagbench_backend" in metafunc.fixturenames:
        specs = _specs(metafunc.config)
        metafunc.parametrize(
            "jagbench_backend", specs or [None], indirect=True, scope="session", ids=specs or None
        )


@pytest.fixture(scope="session")
def jagbench_backend(request: Any) -> Any:
    """The backend named by ``--jagbench-backend`` (or the ``jagbench_backend`` ini option)."""
    spec = getattr(request, "param", None)
    if spec is None:
        pytest.fail(
            f"no backend named for the jagbench_backend fixture: pass {BACKEND_OPTION} SPEC "
            "(a built-in name, module:ATTR or file.py:ATTR) or set jagbench_backend in the ini file",
            pytrace=False,
        )
    from harness.backend import BackendSpecError, BackendUnavailable, load_backend

    try:
        backend = load_backend(spec)
    except (BackendSpecError, BackendUnavailable) as e:
        pytest.fail(f"{BACKEND_OPTION} {spec}: {e}", pytrace=False)
    _SPECS[id(backend)] = spec
    return backend


_SPECS: dict[int, str] = {}


def spec_of(backend: object) -> str | None:
    """The spec a backend of the fixture was named by (what a saved case names it by), or None."""
    return _SPECS.get(id(backend))
