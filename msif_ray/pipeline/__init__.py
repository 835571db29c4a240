"""The stages of ``msif run`` over a run directory, their keys and reuse rules, and the resource plan.

    run        Pipeline: the stages in order (the driver)
    inputs     validation: what a run maps over, and the content digests of its inputs
    keys       each stage's named inputs and key; what is kept when the corpus grows; the index's identity
    records    the manifest and the done records: whether a stage is reused
    passes     map and accumulating passes over the worker pool, resumable
    factors, queries, scores, index     one module per stage
    plan       memory, storage and time per stage, before anything heavy runs
    locked     a run under the run directory's lock, after every early check (the CLI's entry)
"""
