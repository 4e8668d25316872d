"""Encoders, adapters, the fusion transformer, heads, and the methods that combine them."""

from commlab.models.adapters import ADAPTERS
from commlab.models.encoders import ENCODERS
from commlab.models.fusion import FusionTransformer, comm_masks
from commlab.models.heads import ProjectionHead
from commlab.models.methods import METHODS, Method, ModalityStack, build_method

__all__ = [
    "ADAPTERS",
    "ENCODERS",
    "METHODS",
    "FusionTransformer",
    "Method",
    "ModalityStack",
    "ProjectionHead",
    "build_method",
    "comm_masks",
]
from commlab.models import text_encoders  # noqa: F401
