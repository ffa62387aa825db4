"""Training: the contract of a backend that trains, its validation, reference tolerance and check.

- `harness.training.contract`: `OptimizerConfig`, `TrainResult`, `TrainStep`, `TrainingBackend`
  (DESIGN.md, "Training");
- `harness.training.problem`: `TrainingProblem`, a sequence of `StepInput` over the same tables;
- `harness.training.validate`: every malformed optimizer, grad_output or training problem is
  rejected before any backend runs;
- `harness.training.tolerance`: the error analysis of each quantity a training step returns;
- `harness.training.oracle`: the reference values and their tolerance, step after step;
- `harness.training.check`: one training backend judged on one training problem;
- `harness.training.metamorphic`: relations between training steps that need no reference;
- `harness.training.spec`: `TrainingSpec`, a training problem's structure and seeds (JSON), and
  `build_training_problem`;
- `harness.training.strategies`: Hypothesis strategies for training problems.

The float64 reference step itself is `harness.reference.training`.
"""
