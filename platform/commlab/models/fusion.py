"""Fusion transformer over concatenated modality tokens, with modality masking.

Masking a modality means leaving its tokens out. The n_mod+1 masked passes CoMM needs per view
run packed, as ONE forward (`fuse_batched`: each mask's tokens and its own CLS form a segment,
segments share rows, a block-diagonal attention mask keeps them apart); one forward per mask on
only the selected tokens (`fuse_sequential`); or one forward per distinct token count, the
masks of equal length stacked along the batch (`fuse_grouped`). All give the same numbers;
which is fastest depends on the device and the model (`train.fusion`). Padding masks are
honoured in every path, and mean pooling averages only the tokens that are present and not
padding. Without padding no attention mask is built at all, so SDPA takes its fastest kernel (on
CPU under bf16, `attention` skips masking) and compiled graphs have no data-dependent branch.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from commlab.models.dropout import dropout as cheap_dropout


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


Queries = slice | Tensor | None  # positions along the token axis whose outputs are wanted


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float) -> Tensor:
    """Scaled dot-product attention. `mask`: bool, True = the key takes part.

    On CPU under bf16 autocast it runs as mixed precision by hand: both matmuls in bf16, the
    softmax in fp32. torch's CPU SDPA kernels are slow at the small head sizes of fusion
    transformers: at head size 16 (forward + backward, 2 threads) bf16 SDPA took 102-108 ms
    against 15-21 ms in fp32 on an AMX Xeon (264 x 4 heads x 66 tokens), and on an AVX-512 BF16
    EPYC 58 / 37 ms in bf16, 12.9 / 7.3 ms in fp32 and 4.1 / 4.2 ms this way (256 x 4 x 17 and
    128 x 4 x 33 tokens, the 64 px Trifeatures model's two fusion passes). Elsewhere: SDPA.
    """
    if q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float16):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1)).float()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(-1)
    if mask is not None:  # a query with no key left gets zeros, as SDPA gives (not NaN)
        weights = weights.masked_fill(~mask, 0.0)
    weights = cheap_dropout(weights, dropout)
    return torch.matmul(weights.to(v.dtype), v)


class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln(x)); x + mlp(ln(x)), MLP width 4x with QuickGELU."""

    def __init__(self, width: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln_1 = nn.LayerNorm(width)
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.c_fc = nn.Linear(width, 4 * width)
        self.act = QuickGELU()
        self.c_proj = nn.Linear(4 * width, width)
        self.dropout = dropout

    def attention(self, x: Tensor, keep: Tensor | None, queries: Queries = None) -> Tensor:
        b, n, w = x.shape
        q, k, v = self.in_proj(x).view(b, n, 3, self.n_heads, w // self.n_heads).unbind(2)
        if queries is not None:
            q = q[:, queries]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        mask = None
        if keep is not None:  # (N, L) key mask, or (N, L, L) query x key mask
            if keep.dim() == 2:
                mask = keep[:, None, None, :]
            else:
                mask = (keep if queries is None else keep[:, queries])[:, None]
        drop = self.dropout if self.training else 0.0
        y = attention(q, k, v, mask, drop)
        return self.out_proj(y.transpose(1, 2).reshape(b, q.shape[2], w))

    def forward(self, x: Tensor, keep: Tensor | None = None, queries: Queries = None) -> Tensor:
        """x (N, L, E) -> (N, L, E); with `queries` (positions along L), the outputs at those
        positions only, (N, Q, E): every token is still a key and value, but only the queried
        ones get the attention output, the MLP and the residuals."""
        x = (x if queries is None else x[:, queries]) + self.attention(self.ln_1(x), keep, queries)
        h = self.c_proj(self.act(self.c_fc(self.ln_2(x))))
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout)
        return x + h


class FusionTransformer(nn.Module):
    """Concatenate modality tokens, prepend a CLS token (pool='cls'), run pre-LN blocks, pool.

    tokens[m]: (B, L_m, E); pads[m]: (B, L_m) bool with True = padding, or None.
    `masks`: list of K boolean lists (one flag per modality); returns K tensors (B, E).
    Without masks, all modalities are fused once and a single (B, E) tensor is returned.
    """

    def __init__(
        self,
        embed_dim: int,
        n_heads: int = 8,
        n_layers: int = 1,
        pool: str = "cls",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if pool not in {"cls", "mean"}:
            raise ValueError(f"fusion pool must be 'cls' or 'mean', got '{pool}'")
        if embed_dim % n_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by n_heads={n_heads}")
        self.pool = pool
        self.cls = nn.Parameter(torch.randn(1, 1, embed_dim)) if pool == "cls" else None
        self.blocks = nn.ModuleList(Block(embed_dim, n_heads, dropout) for _ in range(n_layers))
        self.ln_post = nn.LayerNorm(embed_dim)
        self._clip_init(embed_dim, n_layers)
        # pool='cls': the last block computes only the CLS outputs, the only ones pooled (the
        # same numbers); False runs it on every token, as the paper's code does
        self.cls_only_last = True

    def _blocks(self, x: Tensor, keep: Tensor | None, cls_at: Queries) -> Tensor:
        """The blocks on (N, L, E); with `cls_at` (the CLS positions) only the outputs there,
        (N, Q, E), which the last block then computes alone (`cls_only_last`)."""
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            queries = cls_at if i == last and self.cls_only_last else None
            x = blk(x, keep, queries)
        if cls_at is not None and not (self.cls_only_last and self.blocks):
            x = x[:, cls_at]
        return x

    def _clip_init(self, width: int, layers: int) -> None:
        attn_std = width**-0.5
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        for blk in cast(Iterable[Block], self.blocks):
            nn.init.normal_(blk.in_proj.weight, std=attn_std)
            nn.init.zeros_(blk.in_proj.bias)
            nn.init.normal_(blk.out_proj.weight, std=proj_std)
            nn.init.zeros_(blk.out_proj.bias)
            nn.init.normal_(blk.c_fc.weight, std=fc_std)
            nn.init.normal_(blk.c_proj.weight, std=proj_std)

    # ---------------------------------------------------------------- core
    def _run(self, x: Tensor, present: Tensor | None) -> Tensor:
        """x: (N, L, E) tokens; present: (N, L) True = token takes part, or None when every
        token does (no mask: SDPA's fastest kernel, and no data-dependent check that would
        break a compiled graph). Returns (N, E)."""
        keep = present
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
            if present is not None:
                keep = torch.cat([present.new_ones(x.shape[0], 1), present], dim=1)
            x = self._blocks(x, keep, slice(0, 1))
            return self.ln_post(x[:, 0])  # LayerNorm is per token: the CLS one only
        x = self.ln_post(self._blocks(x, keep, None))
        if present is None:
            return x.mean(1)
        w = present.to(x.dtype).unsqueeze(-1)
        return (x * w).sum(1) / w.sum(1).clamp_min(1.0)

    @staticmethod
    def _present(tokens: list[Tensor], pads: list[Tensor | None]) -> Tensor | None:
        """(B, L) True = token present, or None when no modality has padding."""
        if all(p is None for p in pads):
            return None
        return FusionTransformer._present_mask(tokens, pads)

    @staticmethod
    def _present_mask(tokens: list[Tensor], pads: list[Tensor | None]) -> Tensor:
        """(B, L) True = token present, also when no modality has padding."""
        parts = []
        for t, p in zip(tokens, pads, strict=True):
            parts.append(~p if p is not None else t.new_ones(t.shape[:2], dtype=torch.bool))
        return torch.cat(parts, dim=1)

    @staticmethod
    def _selected(
        tokens: list[Tensor], pads: list[Tensor | None], mask: list[bool]
    ) -> tuple[list[Tensor], list[Tensor | None]]:
        """The tokens and pads of the modalities `mask` keeps."""
        keep = [i for i, f in enumerate(mask) if f]
        return [tokens[i] for i in keep], [pads[i] for i in keep]

    def forward(
        self,
        tokens: list[Tensor],
        pads: list[Tensor | None],
        masks: list[list[bool]] | None = None,
    ) -> Tensor | list[Tensor]:
        if masks is None:
            return self._run(torch.cat(tokens, dim=1), self._present(tokens, pads))
        return self.fuse_batched(tokens, pads, masks)

    def fuse_batched(
        self, tokens: list[Tensor], pads: list[Tensor | None], masks: list[list[bool]]
    ) -> list[Tensor]:
        """All masked passes in one forward: each mask's tokens (+ its own CLS) form a segment,
        segments are packed into a few rows per sample, and a block-diagonal attention mask keeps
        segments apart. For CoMM this is 2 rows (all singles; all modalities) of L + n_mod
        positions, about the token count of the sequential passes, in one call."""
        self._check_masks(masks, len(tokens))
        b = tokens[0].shape[0]
        lengths = tuple(t.shape[1] for t in tokens)
        layout = _pack_layout(lengths, tuple(tuple(m) for m in masks), self.cls is not None)
        src, seg = (t.to(tokens[0].device) for t in layout[:2])
        rows, width = src.shape
        x = torch.cat(tokens, dim=1)
        filler = x.new_zeros(b, 1, x.shape[-1])
        cls = self.cls.expand(b, -1, -1).to(x.dtype) if self.cls is not None else filler
        table = torch.cat([filler, cls, x], dim=1)  # index 0 filler, 1 CLS, 2.. tokens
        present = self._present_mask(tokens, pads)
        valid = torch.cat([present.new_zeros(b, 1), present.new_ones(b, 1), present], dim=1)
        xr = (
            table[:, src.flatten()]
            .view(b, rows, width, -1)
            .transpose(0, 1)
            .reshape(rows * b, width, -1)
        )
        key_ok = (
            valid[:, src.flatten()].view(b, rows, width).transpose(0, 1).reshape(rows * b, width)
        )
        same = (seg[:, :, None] == seg[:, None, :]) & (seg >= 0)[:, None, :]  # (R, W, W)
        eye = torch.eye(width, dtype=torch.bool, device=x.device)
        allowed = (same.repeat_interleave(b, 0) & key_ok[:, None, :]) | eye
        if self.cls is not None:  # each segment's CLS: the same few positions in every row
            firsts = sorted({first for _, first in layout[2]})
            at = torch.tensor(firsts, device=x.device)
            xr = self.ln_post(self._blocks(xr, allowed, at)).view(rows, b, len(firsts), -1)
            return [xr[r, :, firsts.index(first)] for r, first in layout[2]]
        xr = self.ln_post(self._blocks(xr, allowed, None)).view(rows, b, width, -1)
        outs = []
        for k in range(len(masks)):
            r = layout[2][k][0]
            w = ((seg[r] == k)[None, :] & key_ok.view(rows, b, width)[r]).to(xr.dtype).unsqueeze(-1)
            outs.append((xr[r] * w).sum(1) / w.sum(1).clamp_min(1.0))
        return outs

    def fuse_sequential(
        self, tokens: list[Tensor], pads: list[Tensor | None], masks: list[list[bool]]
    ) -> list[Tensor]:
        """Reference path: one forward per mask on only the selected modalities' tokens."""
        self._check_masks(masks, len(tokens))
        outs = []
        for m in masks:
            ts, ps = self._selected(tokens, pads, m)
            outs.append(self._run(torch.cat(ts, dim=1), self._present(ts, ps)))
        return outs

    def fuse_grouped(
        self, tokens: list[Tensor], pads: list[Tensor | None], masks: list[list[bool]]
    ) -> list[Tensor]:
        """The sequential passes with every set of masks that select the same number of tokens
        stacked along the batch: one forward per distinct length (CoMM with modalities of equal
        token count: 2 instead of n_mod + 1), no attention mask beyond padding. Rows never
        interact, so the numbers are the sequential path's."""
        self._check_masks(masks, len(tokens))
        selected = [self._selected(tokens, pads, m) for m in masks]
        groups: dict[int, list[int]] = {}
        for k, (ts, _) in enumerate(selected):
            groups.setdefault(sum(t.shape[1] for t in ts), []).append(k)
        outs: dict[int, Tensor] = {}
        for ks in groups.values():
            x = torch.cat([torch.cat(selected[k][0], dim=1) for k in ks])
            padded = any(p is not None for k in ks for p in selected[k][1])
            present = torch.cat([self._present_mask(*selected[k]) for k in ks]) if padded else None
            for k, y in zip(ks, self._run(x, present).chunk(len(ks)), strict=True):
                outs[k] = y
        return [outs[k] for k in range(len(masks))]

    @staticmethod
    def _check_masks(masks: list[list[bool]], n_mod: int) -> None:
        for m in masks:
            if len(m) != n_mod:
                raise ValueError(f"mask {m} has {len(m)} flags for {n_mod} modalities")
            if not any(m):
                raise ValueError("a fusion mask must keep at least one modality")


def comm_masks(n_mod: int) -> list[list[bool]]:
    """n_mod single-modality masks followed by the all-modality mask (CoMM's order)."""
    singles = [[i == j for j in range(n_mod)] for i in range(n_mod)]
    return [*singles, [True] * n_mod]


@lru_cache(maxsize=64)
def _pack_layout(
    lengths: tuple[int, ...], masks: tuple[tuple[bool, ...], ...], with_cls: bool
) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
    """Pack one segment per mask ([CLS] + the selected modalities' tokens) into rows.

    Returns src (R, W): indices into [filler, CLS, tokens...]; seg (R, W): segment id per position
    (-1 = filler); and, per mask, (row, position of its first element). First-fit decreasing with
    a row capacity of the longest segment + one CLS per further modality, which puts CoMM's
    singles together in one row and the all-modality segment in another.
    """
    offsets = [2 + sum(lengths[:m]) for m in range(len(lengths))]
    segments = []
    for m in masks:
        idx = [1] if with_cls else []
        for flag, off, n in zip(m, offsets, lengths, strict=True):
            if flag:
                idx.extend(range(off, off + n))
        segments.append(idx)
    capacity = max(map(len, segments)) + (len(lengths) - 1) * int(with_cls)
    rows: list[list[int]] = []
    placed: dict[int, tuple[int, int]] = {}
    for k in sorted(range(len(segments)), key=lambda k: -len(segments[k])):
        for row in rows:
            if sum(len(segments[j]) for j in row) + len(segments[k]) <= capacity:
                row.append(k)
                break
        else:
            rows.append([k])
    width = max(sum(len(segments[j]) for j in row) for row in rows)
    src = torch.zeros(len(rows), width, dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        pos = 0
        for k in row:
            n = len(segments[k])
            src[r, pos : pos + n] = torch.tensor(segments[k])
            seg[r, pos : pos + n] = k
            placed[k] = (r, pos)
            pos += n
    return src, seg, [placed[k] for k in range(len(segments))]
