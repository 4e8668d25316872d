"""The baselines: they align pooled unimodal embeddings (no fusion) and are probed on their
concatenation, so they cannot capture synergy."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import cast

from torch import Tensor, nn

from commlab.config import ExperimentConfig, LossOptions, NonNegFloat, PosFloat
from commlab.data.base import Batch
from commlab.models.heads import ProjectionHead
from commlab.models.methods.base import Method, cat_views, register_method
from commlab.objectives import (
    LogitScale,
    LossOutput,
    SigmoidScaleBias,
    clip_loss,
    cmc_loss,
    cross_self_loss,
    siglip_loss,
)


class CrossModal(Method):
    """Two modalities, each pooled unimodal embedding projected linearly (CLIP's projections),
    aligned on one augmented view; probed on the concatenated unimodal features."""

    def __init__(self, cfg: ExperimentConfig, shapes: list[tuple[int, ...]]) -> None:
        super().__init__(cfg, shapes)
        if self.n_mod != 2:
            raise ValueError(
                f"method '{cfg.model.method}' needs exactly 2 modalities, got {self.n_mod}"
            )
        out = cfg.model.head.out_dim
        self.proj = nn.ModuleList(nn.Linear(d, out, bias=False) for d in self.stack.out_dims)
        for p, d in zip(cast(Iterable[nn.Linear], self.proj), self.stack.out_dims, strict=True):
            nn.init.normal_(p.weight, std=d**-0.5)

    def project(self, view: Batch) -> tuple[Tensor, Tensor]:
        h = self.unimodal(view)
        return self.proj[0](h[0]), self.proj[1](h[1])


@register_method("cross")
class Cross(CrossModal):
    """Cross-modal alignment (CLIP): symmetric CE between the two modalities' projections with
    a learnable logit scale."""

    class Options(LossOptions):
        logit_scale_init: PosFloat = 1 / 0.07  # CLIP's initial logit scale

    options: Options

    def __init__(self, cfg: ExperimentConfig, shapes: list[tuple[int, ...]]) -> None:
        super().__init__(cfg, shapes)
        self.logit_scale = LogitScale(self.options.logit_scale_init)

    @classmethod
    def loss_keys(cls, n_mod: int) -> list[str]:
        return ["clip_loss", "ssl_acc"]

    def loss(self, view_a: Batch, view_b: Batch, gather: bool = False) -> LossOutput:
        return clip_loss(*self.project(view_a), self.logit_scale(), gather=gather)


@register_method("siglip")
class SigLIP(CrossModal):
    """SigLIP (Zhai et al., ICCV 2023): pairwise sigmoid loss between the two modalities'
    projections with a learnable temperature and bias."""

    class Options(LossOptions):
        logit_scale_init: PosFloat = 10.0  # t; learned as log t
        logit_bias_init: float = -10.0  # b

    options: Options

    def __init__(self, cfg: ExperimentConfig, shapes: list[tuple[int, ...]]) -> None:
        super().__init__(cfg, shapes)
        opts = self.options
        self.scale_bias = SigmoidScaleBias(opts.logit_scale_init, opts.logit_bias_init)

    @classmethod
    def loss_keys(cls, n_mod: int) -> list[str]:
        return ["siglip_loss", "ssl_acc"]

    def loss(self, view_a: Batch, view_b: Batch, gather: bool = False) -> LossOutput:
        scale, bias = self.scale_bias()
        return siglip_loss(*self.project(view_a), scale, bias, gather=gather)


@register_method("cross_self")
class CrossSelf(Method):
    """Cross+Self: NT-Xent across modalities plus SimCLR within each modality, one MLP head per
    modality shared by its cross and self terms."""

    class Options(LossOptions):
        temperature: PosFloat = 0.1  # τ of every NT-Xent
        ssl_scale: NonNegFloat = 1.0  # weight of the self terms

    options: Options

    def __init__(self, cfg: ExperimentConfig, shapes: list[tuple[int, ...]]) -> None:
        super().__init__(cfg, shapes)
        if self.n_mod != 2:
            raise ValueError(f"method 'cross_self' needs exactly 2 modalities, got {self.n_mod}")
        m = cfg.model
        self.heads = nn.ModuleList(
            ProjectionHead(d, m.head.hidden_dim, m.head.out_dim) for d in self.stack.out_dims
        )

    @classmethod
    def loss_keys(cls, n_mod: int) -> list[str]:
        return [
            "cross_loss",
            "self_loss_1",
            "self_loss_2",
            "cross_acc",
            "self_acc_1",
            "self_acc_2",
            "ssl_acc",
        ]

    def loss(self, view_a: Batch, view_b: Batch, gather: bool = False) -> LossOutput:
        b = view_a.size
        h = self.unimodal(cat_views(view_a, view_b))
        z1, z2 = self.heads[0](h[0]), self.heads[1](h[1])
        return cross_self_loss(
            z1[:b],
            z2[:b],
            z1[b:],
            z2[b:],
            self.options.temperature,
            self.options.ssl_scale,
            gather=gather,
        )


@register_method("cmc")
class CMC(Method):
    """CMC: mean NT-Xent over all modality pairs of linearly projected unimodal embeddings."""

    class Options(LossOptions):
        temperature: PosFloat = 0.1  # τ of every NT-Xent

    options: Options

    def __init__(self, cfg: ExperimentConfig, shapes: list[tuple[int, ...]]) -> None:
        super().__init__(cfg, shapes)
        out = cfg.model.head.out_dim
        self.proj = nn.ModuleList(nn.Linear(d, out) for d in self.stack.out_dims)

    @classmethod
    def loss_keys(cls, n_mod: int) -> list[str]:
        pairs = list(itertools.combinations(range(n_mod), 2))
        return [
            *(f"cmc_loss_{i}_{j}" for i, j in pairs),
            *(f"cmc_acc_{i}_{j}" for i, j in pairs),
            "ssl_acc",
        ]

    def loss(self, view_a: Batch, view_b: Batch, gather: bool = False) -> LossOutput:
        h = self.unimodal(view_a)
        zs = [p(x) for p, x in zip(self.proj, h, strict=True)]
        return cmc_loss(zs, self.options.temperature, gather=gather)
