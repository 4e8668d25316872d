"""Contrastive objectives: pure functions of embeddings returning a `LossOutput` (STYLE.md §2).

No Ray, MLflow or data loading here; cross-worker gathering goes through `commlab.dist`.
"""

from commlab.objectives.base import LossOutput, normalize_and_gather
from commlab.objectives.cmc import cmc_loss
from commlab.objectives.comm import comm_loss
from commlab.objectives.cross import LogitScale, clip_loss
from commlab.objectives.cross_self import cross_self_loss
from commlab.objectives.infonce import nt_xent
from commlab.objectives.siglip import SigmoidScaleBias, siglip_loss

__all__ = [
    "LogitScale",
    "LossOutput",
    "SigmoidScaleBias",
    "clip_loss",
    "cmc_loss",
    "comm_loss",
    "cross_self_loss",
    "normalize_and_gather",
    "nt_xent",
    "siglip_loss",
]
