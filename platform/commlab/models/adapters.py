"""Input adapters: encoder output -> (B, L, embed_dim) tokens (+ padding mask).

Every adapter is built as `Adapter(in_dim, embed_dim, **params)` where `in_dim` is the encoder's
`out_dim`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from commlab.registry import Registry

ADAPTERS: Registry[type[nn.Module]] = Registry("adapter")


def sincos_2d(h: int, w: int, dim: int, temperature: float = 10_000.0) -> Tensor:
    """Fixed 2-D sin-cos positional embedding (MoCo-v3 recipe): (h*w, dim), dim % 4 == 0."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs embed_dim divisible by 4, got {dim}")
    gy, gx = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    ox = gx.flatten()[:, None] * omega[None]
    oy = gy.flatten()[:, None] * omega[None]
    return torch.cat([ox.sin(), ox.cos(), oy.sin(), oy.cos()], dim=1)


@ADAPTERS.register("patch")
class PatchAdapter(nn.Module):
    """Feature map (B, C, H, W) -> patch tokens (B, H/p * W/p, E) + fixed 2-D sin-cos position."""

    def __init__(self, in_dim: int, embed_dim: int, patch_size: int = 1) -> None:
        super().__init__()
        if embed_dim % 4:
            raise ValueError(f"patch adapter needs embed_dim divisible by 4, got {embed_dim}")
        self.proj = nn.Conv2d(in_dim, embed_dim, patch_size, patch_size)
        self.embed_dim = embed_dim
        self._pos_cache: dict[tuple[int, int, str], Tensor] = {}

    def _pos(self, h: int, w: int, ref: Tensor) -> Tensor:
        key = (h, w, str(ref.device))
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_2d(h, w, self.embed_dim).to(ref.device)
        return self._pos_cache[key].to(ref.dtype)

    def forward(self, x: Tensor, pad: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if x.dim() != 4:
            raise ValueError(f"patch adapter expects (B, C, H, W), got shape {tuple(x.shape)}")
        y = self.proj(x)
        h, w = y.shape[-2:]
        tokens = y.flatten(2).transpose(1, 2)
        return tokens + self._pos(h, w, tokens), None


@ADAPTERS.register("feature_tokenizer")
class FeatureTokenizer(nn.Module):
    """FT-Transformer tokenizer: (B, n) -> (B, n, E) with token_j = x_j * W_j + b_j."""

    def __init__(self, in_dim: int, embed_dim: int, n_features: int | None = None) -> None:
        super().__init__()
        n = n_features or in_dim
        self.weight = nn.Parameter(torch.randn(n, embed_dim) / math.sqrt(embed_dim))
        self.bias = nn.Parameter(torch.randn(n, embed_dim) / math.sqrt(embed_dim))

    def forward(self, x: Tensor, pad: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        x = x.flatten(1)
        if x.shape[1] != self.weight.shape[0]:
            raise ValueError(
                f"feature tokenizer built for {self.weight.shape[0]} features, got {x.shape[1]}"
            )
        return x.unsqueeze(-1) * self.weight + self.bias, None


@ADAPTERS.register("simple")
class SimpleToken(nn.Module):
    """(B, n) -> one token (B, 1, n); n must equal embed_dim. No parameters."""

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        if in_dim != embed_dim:
            raise ValueError(
                f"simple adapter needs encoder out_dim ({in_dim}) == embed_dim ({embed_dim})"
            )

    def forward(self, x: Tensor, pad: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        return x.flatten(1).unsqueeze(1), None


@ADAPTERS.register("linear")
class LinearTokens(nn.Module):
    """Per-token linear map (B, L, d) -> (B, L, E); a vector (B, d) becomes one token."""

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim)

    def forward(self, x: Tensor, pad: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.proj(x), pad


@ADAPTERS.register("identity")
class IdentityTokens(nn.Module):
    """Encoder output already is (B, L, E) (or (B, E), one token); checks the width."""

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        if in_dim != embed_dim:
            raise ValueError(
                f"identity adapter needs encoder out_dim ({in_dim}) == embed_dim ({embed_dim}); "
                "use the 'linear' adapter to project"
            )

    def forward(self, x: Tensor, pad: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        return (x.unsqueeze(1) if x.dim() == 2 else x), pad
