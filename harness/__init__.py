"""jagbench's engine: problem model, validation, backend contract, tolerance, agreement check."""

from harness.agreement import Outcome, Verdict, check_agreement, check_problem
from harness.backend import Backend, BackendUnavailable, load_backend
from harness.model import JaggedBatch, Pooling, Problem, TableConfig
from harness.validate import ProblemError, validate_problem
from harness.weights import make_weights

__all__ = [
    "Backend",
    "BackendUnavailable",
    "JaggedBatch",
    "Outcome",
    "Pooling",
    "Problem",
    "ProblemError",
    "TableConfig",
    "Verdict",
    "check_agreement",
    "check_problem",
    "load_backend",
    "make_weights",
    "validate_problem",
]
