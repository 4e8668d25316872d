"""Ops on (B, n) feature vectors: each feature is a "row" of the MultiBench ops (CoMM §3.3)."""

from __future__ import annotations

import torch
from torch import Tensor

from commlab.augment.sequence import add_noise, drop_rows
from commlab.config import TabularAugmentConfig


class TabularAugmenter:
    """Gaussian noise, then zeroing a random fraction ~ U(0, drop_max) of the features."""

    def __init__(self, cfg: TabularAugmentConfig | None = None) -> None:
        self.cfg = cfg or TabularAugmentConfig()

    def __call__(self, x: Tensor, pad: Tensor | None, generator: torch.Generator) -> Tensor:
        c = self.cfg
        x = self.prepare(x, pad)
        x = add_noise(x, None, generator, c.noise_std, c.noise_p)
        return drop_rows(x, None, generator, c.drop_max, c.drop_p)

    def prepare(self, x: Tensor, pad: Tensor | None = None) -> Tensor:
        if x.dim() != 2:
            raise ValueError(f"tabular inputs must be (B, n), got {tuple(x.shape)}")
        return x.float()
