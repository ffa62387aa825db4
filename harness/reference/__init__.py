"""The references (oracles) every backend is judged against, computed in float64.

- `harness.reference.forward`: the forward lookup as a readable loop (the definition).
- `harness.reference.training`: one training step (forward, backward, optimizer update), loop and fast.
"""
