"""jagbench in a kernel author's pytest suite (docs/testing-your-kernel.md).

    pytest --jagbench-backend my_kernels.py:MyKernel

The ``jagbench_backend`` fixture is the backend named on the command line (the plugin comes with
jagbench); ``assert_agrees`` is ``jagbench fuzz``'s reference check as an assertion: on a failure
its message is the fuzzer's report of the problem, and the problem is saved under jagbench-cases/
for ``jagbench replay``.
"""

from hypothesis import given, settings

from harness.fuzz.strategies import problems
from harness.model import JaggedBatch, Pooling, Problem, TableConfig
from harness.testing import assert_agrees
from harness.weights import make_weights

SMALL = problems(max_tables=3, max_dim=64, max_num_embeddings=1000, max_batch_size=64, max_cost=50_000)


@settings(max_examples=25, deadline=None)
@given(SMALL)
def test_agrees_with_the_reference_on_generated_problems(jagbench_backend, problem):
    assert_agrees(jagbench_backend, problem)


def test_agrees_on_a_hand_written_problem(jagbench_backend):
    tables = [TableConfig("products", 100, 8, ("product",), Pooling.SUM)]
    batch = JaggedBatch.from_bags({"product": [[1, 2, 1], [], [99]]})
    problem = Problem(tables, make_weights(tables, seed=0), batch)
    assert_agrees(jagbench_backend, problem)
