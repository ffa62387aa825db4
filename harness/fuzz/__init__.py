"""Differential fuzzing: strategies (`strategies`), the driver (`driver`), metamorphic relations
(`metamorphic`), replay of saved cases (`replay`), printing (`format`) and the ``fuzz`` /
``replay`` commands (`cli`). Nothing is imported here, so ``jagbench --help`` stays light."""
