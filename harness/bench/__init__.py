"""Benchmarking: workload files (`workloads`), the byte model and machine facts (`metrics`), what is
timed per (backend, workload) (`case`, `forward`), the interleaved rounds (`timing`), the noise probe
(`noise`), cold caches and background load (`conditions`), the driver (`runner`), pytest-benchmark's
JSON from the rounds (`record`), paired speedups (`paired`, `derived`), reading runs (`runs`), the
terminal summary (`summary`), comparing runs (`compare`) and the ``bench`` / ``compare`` commands (`cli`)."""
