"""The mathematics on one process, no Ray and no storage: the notebook API.

    modules     which layers are tracked; hooks that capture a_t and s_t
    gradients   tokenization into windows and batches, the log-prob objective, per-example gradients
    curvature   EK-FAC: covariance and Λ sums, eigendecompositions, the damped inverse
    vectors     preconditioned query vectors Ṽ_q (dense or rank-r)
    influence   the preconditioning chains (multi_stage, single_stage, grad_dot)
    scoring     ⟨Ṽ_q, G_m⟩ over corpus windows, per layer and per token
    topk        per-shard top and bottom k tables and their merge
    index       the corpus gradient index: each document's top terms in the eigenbasis, the scan
    api         TrackedLM, Examples, Scores: the passes above on one model (imports all of them)
"""

from msif_ray.engine.api import Examples, Scores, TrackedLM
from msif_ray.engine.curvature import Factors
from msif_ray.engine.influence import Chain, precondition
from msif_ray.engine.vectors import QueryVectors

__all__ = ["Chain", "Examples", "Factors", "QueryVectors", "Scores", "TrackedLM", "precondition"]
