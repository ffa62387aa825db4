"""jagbench in a kernel author's own pytest suite (docs/testing-your-kernel.md).

- `assert_agrees(backend, problem)`: the reference check of ``jagbench fuzz`` as an assertion;
- the Hypothesis strategies: `harness.fuzz.strategies` (``problems()`` and its parts);
- the pytest plugin `harness.testing.plugin` (entry point ``pytest11``, loaded by pytest where
  jagbench is installed): ``--jagbench-backend SPEC`` and the ``jagbench_backend`` fixture.
"""

from harness.testing.agrees import assert_agrees

__all__ = ["assert_agrees"]
