"""Ray glue around the engine: worker actors (``worker``), the fault-tolerant pool (``pool``), worker
checkpoints (``checkpoints``), per-layer reduce jobs run on the actors (``reduce``), the tree merge (``merge``), the
report's pass (``report_pass``), starting Ray (``runtime``)."""
