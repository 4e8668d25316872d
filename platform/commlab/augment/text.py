"""Token masking (CoMM §3.4) on (B, L) int64 token ids: no 80/10/10 scheme, pads never change."""

from __future__ import annotations

import torch
from torch import Tensor

from commlab.config import TextAugmentConfig


def mask_tokens(
    ids: Tensor,
    pad: Tensor | None,
    generator: torch.Generator,
    mask_p: float,
    mask_token_id: int,
    pad_token_id: int,
) -> Tensor:
    """Replace each non-pad token by `mask_token_id` independently with probability `mask_p`.

    A token is pad when it equals `pad_token_id` or `pad` (bool (B, L), True = padding) says so.
    """
    if mask_p == 0:
        return ids
    hit = (torch.rand(ids.shape, generator=generator) < mask_p).to(ids.device)
    hit &= ids != pad_token_id
    if pad is not None:
        hit &= ~pad.to(ids.device)
    return ids.masked_fill(hit, mask_token_id)


class TextAugmenter:
    """Independent per-token masking; the ids keep their dtype, shape and device."""

    def __init__(self, cfg: TextAugmentConfig | None = None) -> None:
        self.cfg = cfg or TextAugmentConfig()

    def __call__(self, x: Tensor, pad: Tensor | None, generator: torch.Generator) -> Tensor:
        c = self.cfg
        x = self.prepare(x, pad)
        return mask_tokens(x, pad, generator, c.mask_p, c.mask_token_id, c.pad_token_id)

    def prepare(self, x: Tensor, pad: Tensor | None = None) -> Tensor:
        if x.dim() != 2 or x.is_floating_point():
            raise ValueError(
                f"text must be integer token ids (B, L), got {x.dtype} {tuple(x.shape)}"
            )
        return x
