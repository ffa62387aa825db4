"""A seeded generator of small random problems, for smoke checks that need no Hypothesis.

The fuzzer (`harness.fuzz.strategies`) explores far more of the input space; this module gives the
same few problems on every run so a quick check is repeatable.
"""

from __future__ import annotations

import random

import torch

from harness.model import JaggedBatch, Pooling, Problem, TableConfig
from harness.weights import make_weights

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def random_problem(seed: int, *, max_tables: int = 3, max_batch: int = 8, max_bag: int = 12) -> Problem:
    """A problem with 1..max_tables tables (some shared by two features), any dtype and pooling."""
    rng = random.Random(seed)
    weighted = rng.random() < 0.3
    tables = []
    keys = []
    for t in range(rng.randint(1, max_tables)):
        features = tuple(f"t{t}_f{i}" for i in range(rng.choice((1, 1, 2))))
        keys += features
        tables.append(
            TableConfig(
                name=f"t{t}",
                num_embeddings=rng.randint(1, 100),
                embedding_dim=rng.choice((1, 3, 4, 8, 16, 33)),
                feature_names=features,
                pooling=Pooling.SUM if weighted else rng.choice((Pooling.SUM, Pooling.MEAN)),
                dtype=rng.choice(DTYPES),
            )
        )
    rng.shuffle(keys)
    size_of = {f: t.num_embeddings for t in tables for f in t.feature_names}
    batch_size = rng.randint(0, max_batch)
    bags = {
        k: [[rng.randrange(size_of[k]) for _ in range(rng.randint(0, max_bag))] for _ in range(batch_size)]
        for k in keys
    }
    per_sample = None
    if weighted:
        per_sample = {k: [[rng.uniform(-2, 2) for _ in bag] for bag in bags[k]] for k in keys}
    batch = JaggedBatch.from_bags(bags, per_sample)
    return Problem(tuple(tables), make_weights(tables, seed), batch, {"seed": seed})
