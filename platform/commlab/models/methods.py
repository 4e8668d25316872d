"""Methods: a model plus its objective, behind one interface the training loop uses.

`Method.loss(view_a, view_b, gather)` returns a `LossOutput`; `Method.features(batch)` returns
the frozen features a linear probe sees. CoMM uses one fused encoder; the baselines (Cross = CLIP,
Cross+Self, CMC) align pooled unimodal embeddings instead and are probed on their concatenation.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn

from commlab.config import ExperimentConfig, ModalityModelConfig
from commlab.data.base import Batch
from commlab.models.adapters import ADAPTERS
from commlab.models.encoders import ENCODERS
from commlab.models.fusion import FusionTransformer, comm_masks
from commlab.models.heads import ProjectionHead
from commlab.objectives import (
    LogitScale,
    LossOutput,
    clip_loss,
    cmc_loss,
    comm_loss,
    cross_self_loss,
)
from commlab.registry import Registry

METHODS: Registry[type[Method]] = Registry("method")


def _fill_input_dims(name: str, params: dict[str, Any], shape: tuple[int, ...]) -> dict[str, Any]:
    """Fill `in_channels` / `in_dim` from the data when the config leaves them out."""
    accepted = inspect.signature(ENCODERS.get(name)).parameters
    out = dict(params)
    if "in_channels" in accepted and "in_channels" not in out and len(shape) == 3:
        out["in_channels"] = shape[0]
    if "in_dim" in accepted and "in_dim" not in out:
        out["in_dim"] = shape[-1] if len(shape) == 2 else math.prod(shape)
    return out


class ModalityStack(nn.Module):
    """Per-modality encoder + adapter: a Batch -> per-modality tokens (B, L_m, E) and pads."""

    def __init__(
        self,
        mods: list[ModalityModelConfig],
        shapes: list[tuple[int, ...]],
        embed_dim: int,
        tokens: bool = True,
    ):
        super().__init__()
        if not mods:
            raise ValueError("model.modalities is empty: configure one encoder per modality")
        if len(mods) != len(shapes):
            raise ValueError(
                f"model.modalities has {len(mods)} entries but the dataset has {len(shapes)} modalities"
            )
        self.encoders = nn.ModuleList()
        self.adapters = nn.ModuleList()
        for i, (m, shape) in enumerate(zip(mods, shapes, strict=True)):
            try:
                enc = ENCODERS.build(
                    m.encoder.name, **_fill_input_dims(m.encoder.name, m.encoder.params, shape)
                )
                if tokens:
                    self.adapters.append(
                        ADAPTERS.build(m.adapter.name, enc.out_dim, embed_dim, **m.adapter.params)
                    )
            except ValueError as err:
                raise ValueError(f"model.modalities.{i}: {err}") from None
            self.encoders.append(enc)

    def forward(self, batch: Batch) -> tuple[list[Tensor], list[Tensor | None]]:
        tokens, pads = [], []
        for ada, (h, p) in zip(self.adapters, self.encode(batch), strict=True):
            t, p = ada(h, p)
            tokens.append(t)
            pads.append(p)
        return tokens, pads

    def encode(self, batch: Batch) -> list[tuple[Tensor, Tensor | None]]:
        """Encoder outputs (before the adapters) with their padding masks."""
        return [enc(x, pad) for enc, x, pad in zip(self.encoders, batch.xs, batch.pad, strict=True)]

    @property
    def out_dims(self) -> list[int]:
        return [int(cast(int, enc.out_dim)) for enc in self.encoders]


def _cat_views(a: Batch, b: Batch) -> Batch:
    """Stack two views along the batch axis so encoders run once on 2B samples."""
    # views of one batch pad the same modalities, so pb is a tensor wherever pa is
    pads: list[Tensor | None] = [
        None if pa is None else torch.cat([pa, cast(Tensor, pb)])
        for pa, pb in zip(a.pad, b.pad, strict=True)
    ]
    return Batch(xs=[torch.cat([xa, xb]) for xa, xb in zip(a.xs, b.xs, strict=True)], pad=pads)


def global_pool(h: Tensor, pad: Tensor | None) -> Tensor:
    """Encoder output -> one vector per sample: feature maps (B, C, H, W) are averaged over
    space, sequences (B, T, d) over the steps that are not padding, vectors pass through."""
    if h.dim() == 4:
        return h.mean(dim=(2, 3))
    if h.dim() == 2:
        return h
    if pad is None:
        return h.mean(1)
    w = (~pad).to(h.dtype).unsqueeze(-1)
    return (h * w).sum(1) / w.sum(1).clamp_min(1.0)


class Method(nn.Module):
    uses_tokens = False  # True: adapters to fusion tokens are built (CoMM)
    fusion_path: str | None = None  # how masked fusion runs, for methods that have one

    def __init__(self, cfg: ExperimentConfig, shapes: list[tuple[int, ...]]) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_mod = len(shapes)
        self.stack = ModalityStack(
            cfg.model.modalities, shapes, cfg.model.embed_dim, tokens=self.uses_tokens
        )

    def forward(self, view_a: Batch, view_b: Batch, gather: bool = False) -> LossOutput:
        """The training loss; `forward` so that DistributedDataParallel hooks see it."""
        return self.loss(view_a, view_b, gather)

    def loss(self, view_a: Batch, view_b: Batch, gather: bool = False) -> LossOutput:
        raise NotImplementedError

    def features(self, batch: Batch) -> Tensor:
        raise NotImplementedError

    def fusion_options(self, view_a: Batch, view_b: Batch) -> dict[str, Callable[[], Tensor]]:
        """Interchangeable ways to run this method's masked fusion on these views (name ->
        a call returning a scalar to backpropagate), for timing; empty without fusion."""
        return {}

    def fusion_signature(self) -> str:
        """What fusion speed depends on besides the input shapes (for caching timings)."""
        return ""

    def projection_heads(self) -> list[nn.Module]:
        """The training-only projection heads (`train.batchnorm_sync: head` syncs their
        BatchNorm statistics only)."""
        return [m for m in self.modules() if isinstance(m, ProjectionHead)]

    def unimodal(self, batch: Batch) -> list[Tensor]:
        """Globally pooled encoder outputs, one (B, d_m) per modality (the baselines' unimodal
        embeddings; adapters and fusion are CoMM's and take no part)."""
        return [global_pool(h, p) for h, p in self.stack.encode(batch)]


@METHODS.register("comm")
class CoMM(Method):
    """CoMM: n_mod+1 fused embeddings per view (each modality alone, then all), one batched
    fusion forward per step, projection head, `comm_loss` (Dufumier et al., ICLR 2025)."""

    uses_tokens = True
    fusion_path = "packed"  # or "sequential": the same numbers, per-device speed differs

    def __init__(self, cfg: ExperimentConfig, shapes: list[tuple[int, ...]]) -> None:
        super().__init__(cfg, shapes)
        m = cfg.model
        self.fusion = FusionTransformer(m.embed_dim, m.n_heads, m.n_layers, m.pool, m.dropout)
        self.head = ProjectionHead(m.embed_dim, m.head.hidden_dim, m.head.out_dim)
        self.masks = comm_masks(self.n_mod)

    def fuse(self, tokens: list[Tensor], pads: list[Tensor | None]) -> list[Tensor]:
        """The n_mod+1 masked fusion passes along `fusion_path`."""
        if self.fusion_path == "sequential":
            return self.fusion.fuse_sequential(tokens, pads, self.masks)
        if self.fusion_path != "packed":
            raise ValueError(
                f"fusion_path must be 'packed' or 'sequential', got '{self.fusion_path}'"
            )
        return self.fusion.fuse_batched(tokens, pads, self.masks)

    def fusion_options(self, view_a: Batch, view_b: Batch) -> dict[str, Callable[[], Tensor]]:
        was_training = self.stack.training
        with torch.no_grad():  # eval: BatchNorm running statistics stay untouched
            tokens, pads = self.stack.eval()(_cat_views(view_a, view_b))
        self.stack.train(was_training)
        tokens = [t.detach().requires_grad_(True) for t in tokens]

        def run(fn: Callable[..., list[Tensor]]) -> Callable[[], Tensor]:
            return lambda: torch.stack(
                [o.float().sum() for o in fn(tokens, pads, self.masks)]
            ).sum()

        return {
            "packed": run(self.fusion.fuse_batched),
            "sequential": run(self.fusion.fuse_sequential),
        }

    def fusion_signature(self) -> str:
        blk = self.fusion.blocks
        width = self.fusion.ln_post.normalized_shape[0]
        return f"fusion(width={width},layers={len(blk)},heads={blk[0].n_heads if blk else 0},masks={len(self.masks)})"

    def embed_views(self, view_a: Batch, view_b: Batch) -> tuple[list[Tensor], list[Tensor]]:
        tokens, pads = self.stack(_cat_views(view_a, view_b))
        fused = self.fuse(tokens, pads)  # K x (2B, E)
        b, k = view_a.size, len(fused)
        # BatchNorm statistics per mask and view, as in the paper, in one head pass.
        z = self.head.forward_groups(torch.stack([f[:b] for f in fused] + [f[b:] for f in fused]))
        return list(z[:k]), list(z[k:])

    def loss(self, view_a: Batch, view_b: Batch, gather: bool = False) -> LossOutput:
        za, zb = self.embed_views(view_a, view_b)
        return comm_loss(za, zb, self.cfg.loss.temperature, self.cfg.loss.weights, gather=gather)

    def features(self, batch: Batch) -> Tensor:
        tokens, pads = self.stack(batch)
        out = self.fusion(tokens, pads)
        assert isinstance(out, Tensor)
        return out


@METHODS.register("cross")
class Cross(Method):
    """Cross-modal alignment (CLIP): symmetric CE between the two modalities' projections with
    a learnable logit scale. Uses one augmented view; probed on concatenated unimodal features."""

    def __init__(self, cfg: ExperimentConfig, shapes: list[tuple[int, ...]]) -> None:
        super().__init__(cfg, shapes)
        if self.n_mod != 2:
            raise ValueError(f"method 'cross' needs exactly 2 modalities, got {self.n_mod}")
        out = cfg.model.head.out_dim
        self.proj = nn.ModuleList(nn.Linear(d, out, bias=False) for d in self.stack.out_dims)
        for p, d in zip(cast(Iterable[nn.Linear], self.proj), self.stack.out_dims, strict=True):
            nn.init.normal_(p.weight, std=d**-0.5)
        self.logit_scale = LogitScale(cfg.loss.logit_scale_init)

    def loss(self, view_a: Batch, view_b: Batch, gather: bool = False) -> LossOutput:
        h = self.unimodal(view_a)
        return clip_loss(self.proj[0](h[0]), self.proj[1](h[1]), self.logit_scale(), gather=gather)

    def features(self, batch: Batch) -> Tensor:
        return torch.cat(self.unimodal(batch), dim=1)


@METHODS.register("cross_self")
class CrossSelf(Method):
    """Cross+Self: NT-Xent across modalities plus SimCLR within each modality, one MLP head per
    modality shared by its cross and self terms."""

    def __init__(self, cfg: ExperimentConfig, shapes: list[tuple[int, ...]]) -> None:
        super().__init__(cfg, shapes)
        if self.n_mod != 2:
            raise ValueError(f"method 'cross_self' needs exactly 2 modalities, got {self.n_mod}")
        m = cfg.model
        self.heads = nn.ModuleList(
            ProjectionHead(d, m.head.hidden_dim, m.head.out_dim) for d in self.stack.out_dims
        )

    def loss(self, view_a: Batch, view_b: Batch, gather: bool = False) -> LossOutput:
        b = view_a.size
        h = self.unimodal(_cat_views(view_a, view_b))
        z1, z2 = self.heads[0](h[0]), self.heads[1](h[1])
        return cross_self_loss(
            z1[:b],
            z2[:b],
            z1[b:],
            z2[b:],
            self.cfg.loss.temperature,
            self.cfg.loss.ssl_scale,
            gather=gather,
        )

    def features(self, batch: Batch) -> Tensor:
        return torch.cat(self.unimodal(batch), dim=1)


@METHODS.register("cmc")
class CMC(Method):
    """CMC: mean NT-Xent over all modality pairs of linearly projected unimodal embeddings."""

    def __init__(self, cfg: ExperimentConfig, shapes: list[tuple[int, ...]]) -> None:
        super().__init__(cfg, shapes)
        out = cfg.model.head.out_dim
        self.proj = nn.ModuleList(nn.Linear(d, out) for d in self.stack.out_dims)

    def loss(self, view_a: Batch, view_b: Batch, gather: bool = False) -> LossOutput:
        h = self.unimodal(view_a)
        zs = [p(x) for p, x in zip(self.proj, h, strict=True)]
        return cmc_loss(zs, self.cfg.loss.temperature, gather=gather)

    def features(self, batch: Batch) -> Tensor:
        return torch.cat(self.unimodal(batch), dim=1)


def build_method(cfg: ExperimentConfig, shapes: list[tuple[int, ...]]) -> Method:
    """Build the configured method for data whose per-sample modality shapes are `shapes`."""
    return METHODS.get(cfg.model.method)(cfg, shapes)
