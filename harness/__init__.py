"""jagbench's engine: problem model, validation, backend contract, tolerance, agreement check."""

from harness.agreement import Outcome, Verdict, check_agreement, check_problem
from harness.backend import Backend, BackendUnavailable, load_backend
from harness.model import JaggedBatch, Pooling, Problem, TableConfig
from harness.training.contract import OptimizerConfig, TrainResult
from harness.validate import ProblemError, validate_problem
from harness.weights import make_weights

__all__ = [
    "Backend",
    "BackendUnavailable",
    "JaggedBatch",
    "OptimizerConfig",
    "Outcome",
    "Pooling",
    "Problem",
    "ProblemError",
    "TableConfig",
    "TrainResult",
    "Verdict",
    "check_agreement",
    "check_problem",
    "load_backend",
    "make_weights",
    "validate_problem",
]
