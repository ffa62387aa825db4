"""Benchmarking: workload files (`workloads`), the byte model and machine facts (`metrics`), the
pytest-benchmark suite (`suite`) and its driver (`runner`), reading runs (`runs`, `derived`),
comparing them (`compare`) and the ``bench`` / ``compare`` commands (`cli`)."""
