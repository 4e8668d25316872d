"""Dropout with cheap keep-masks on CPU, and a Transformer encoder layer that uses it.

torch's CPU dropout draws one Bernoulli sample per element from a scalar generator; in the MOSI
model (a 2048-wide feed-forward under 40-d tokens, dropout 0.1) that was 40 % of the training
step. Here one 64-bit draw of the same generator feeds four elements: each 16-bit lane is
uniform, and an element is kept when its lane is >= round(p * 2^16) - 2^15. The keep probability
is 1 - p up to 2^-16 (p = 0.1 drops with probability 0.100006); torch.manual_seed makes it
reproducible as before. On other devices torch's own dropout is used (fused kernels there).

Measured on a 2-core AMX Xeon, (3200, 2048) fp32: torch's dropout 39 ms, `dropout` 14 ms.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_PARALLEL_MIN_WORDS = 1 << 18  # below this, one generator is faster than handing off work
_pool: ThreadPoolExecutor | None = None


def _random_words(n: int, device: torch.device) -> Tensor:
    """n int64 words with all 64 bits uniform, from torch's default generator. Large CPU
    draws are split over torch's intra-op thread count: one seed drawn from the default
    generator seeds a generator per part (torch's CPU generator is sequential; the intra-op
    threads idle while it runs), so torch.manual_seed still reproduces every mask."""
    words = torch.empty(n, dtype=torch.int64, device=device)
    parts = min(torch.get_num_threads(), 4)
    if device.type != "cpu" or parts < 2 or n < _PARALLEL_MIN_WORDS:
        return words.random_(-(2**63), 2**63 - 1)
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(4, thread_name_prefix="commlab-dropout-rng")
    seed = int(torch.randint(0, 2**62, (1,)).item())

    def fill(k: int, chunk: Tensor) -> None:
        gen = torch.Generator().manual_seed(seed + k)
        chunk.random_(-(2**63), 2**63 - 1, generator=gen)

    for f in [_pool.submit(fill, k, c) for k, c in enumerate(words.chunk(parts))]:
        f.result()
    return words


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> Tensor:
    """Bool tensor of `shape`, each element True with probability 1 - p (p in [0, 1))."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"keep_mask needs p in [0, 1), got {p}")
    n = 1
    for s in shape:
        n *= s
    lanes = _random_words((n + 3) // 4, device).view(torch.int16)[:n].view(shape)
    return lanes >= round(p * 2**16) - 2**15  # four uniform int16 lanes per word


class _KeepScale(torch.autograd.Function):
    """y = x * keep * scale; dy/dx = keep * scale. Saves only the 1-byte mask."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep.view(torch.uint8)).mul_(scale)  # a bool mask would be copied to float

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return grad.mul(keep.view(torch.uint8)).mul_(ctx.scale), None, None


def _check(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """F.dropout(x, p, training), with the cheap keep-mask on CPU."""
    _check(p)
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p == 1.0:
        return F.dropout(x, p, True)
    return _KeepScale.apply(x, keep_mask(x.shape, p, x.device), 1.0 / (1.0 - p))


class _ReluKeepScale(torch.autograd.Function):
    """y = relu(x) * keep * scale; dy/dx = (y > 0) * scale. Saves only y, which the next
    layer keeps for its own backward pass anyway."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        y = x.mul(keep.view(torch.uint8)).relu_().mul_(scale)
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (y,) = ctx.saved_tensors
        # ReLU's own backward kernel (grad where y > 0), 4x faster than a masked multiply in bf16
        grad_x = torch.ops.aten.threshold_backward(grad, y, 0)
        return grad_x.mul_(ctx.scale), None, None


def relu_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """dropout(relu(x)) in one masked multiply, whose backward pass needs only the output."""
    _check(p)
    if not training or p == 0.0 or x.device.type != "cpu" or p == 1.0:
        return F.dropout(F.relu(x), p, training)
    return _ReluKeepScale.apply(x, keep_mask(x.shape, p, x.device), 1.0 / (1.0 - p))


class EncoderLayer(nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer with the same parameters and state_dict, whose training-time
    dropouts (attention weights, feed-forward, both residual branches) use `dropout` on CPU.
    Other cases (eval, other devices, an attention mask, a non-ReLU activation, unbatched
    input) run torch's own code."""

    def _cheap(self, x: Tensor) -> bool:
        return self.training and x.device.type == "cpu" and x.dim() == 3

    def _sa_block(
        self,
        x: Tensor,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool = False,
    ) -> Tensor:
        a = self.self_attn
        if not self._cheap(x) or attn_mask is not None or is_causal or not a.batch_first:
            return super()._sa_block(x, attn_mask, key_padding_mask, is_causal)
        b, t, d = x.shape
        h = a.num_heads
        qkv = F.linear(x, a.in_proj_weight, a.in_proj_bias).view(b, t, 3, h, d // h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, d/h)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (d // h) ** -0.5
        if key_padding_mask is not None:  # (B, T): True = padding, or an additive float mask
            pad = key_padding_mask[:, None, None, :]
            if pad.dtype == torch.bool:
                scores = scores.masked_fill(pad, float("-inf"))
            else:
                scores = scores + pad
        weights = dropout(scores.softmax(-1), a.dropout)
        y = torch.matmul(weights.to(v.dtype), v).transpose(1, 2).reshape(b, t, d)
        return dropout(a.out_proj(y), self.dropout1.p)

    def _ff_block(self, x: Tensor) -> Tensor:
        if not self._cheap(x) or self.activation is not F.relu:
            return super()._ff_block(x)
        hidden = relu_dropout(self.linear1(x), self.dropout.p)
        return dropout(self.linear2(hidden), self.dropout2.p)
