"""Batched, seeded, on-device augmentations: one pipeline per modality kind."""

from commlab.augment.image import ImageAugmenter
from commlab.augment.pipeline import AUGMENTERS, Deterministic, MultimodalAugmenter, build_augmenter
from commlab.augment.sequence import SequenceAugmenter
from commlab.augment.tabular import TabularAugmenter
from commlab.augment.text import TextAugmenter

__all__ = [
    "AUGMENTERS",
    "Deterministic",
    "ImageAugmenter",
    "MultimodalAugmenter",
    "SequenceAugmenter",
    "TabularAugmenter",
    "TextAugmenter",
    "build_augmenter",
]
