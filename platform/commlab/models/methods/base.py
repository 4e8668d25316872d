"""The method interface, its registry and the pieces every method shares: per-modality encoders
(`ModalityStack`), pooling, stacking two views."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, cast

import torch
from torch import Tensor, nn

from commlab.config import (
    METHOD_OPTIONS,
    ExperimentConfig,
    LossOptions,
    ModalityModelConfig,
    validate_config,
)
from commlab.data.base import Batch
from commlab.models.adapters import ADAPTERS
from commlab.models.encoders import ENCODERS
from commlab.models.heads import ProjectionHead
from commlab.objectives import LossOutput
from commlab.registry import Registry

METHODS: Registry[type[Method]] = Registry("method")
M = TypeVar("M", bound="type[Method]")


def register_method(name: str) -> Callable[[M], M]:
    """Register a method under `name`, and its `Options` as the `loss:` model of that name."""

    def deco(cls: M) -> M:
        METHODS.register(name)(cls)
        METHOD_OPTIONS.register(name)(cls.Options)
        return cls

    return deco


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


def cat_views(a: Batch, b: Batch) -> Batch:
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
    """A model and its objective. A method declares its `Options` (its `loss:` section) and
    `loss_keys`, implements `loss` (and `features` unless the baselines' default fits) and
    registers with `register_method(name)`."""

    Options: ClassVar[type[LossOptions]] = LossOptions  # the `loss:` section; each method's own
    options: LossOptions  # cfg.loss, an instance of Options
    uses_tokens = False  # True: adapters to fusion tokens are built (CoMM)
    fusion_path: str | None = None  # how masked fusion runs, for methods that have one

    def __init__(self, cfg: ExperimentConfig, shapes: list[tuple[int, ...]]) -> None:
        super().__init__()
        if not isinstance(cfg.loss, self.Options):  # validated before the methods were loaded
            cfg = validate_config(cfg.model_dump(mode="json"))
            if not isinstance(cfg.loss, self.Options):
                raise ValueError(f"model.method '{cfg.model.method}' is not {type(self).__name__}")
        self.cfg, self.options = cfg, cfg.loss
        self.n_mod = len(shapes)
        self.stack = ModalityStack(
            cfg.model.modalities, shapes, cfg.model.embed_dim, tokens=self.uses_tokens
        )

    @classmethod
    def loss_keys(cls, n_mod: int) -> list[str]:
        """Names of the terms and accuracies `loss` returns for `n_mod` modalities; the loop logs
        each as `train/<name>` beside `train/loss`, and sweeps may select on them."""
        raise NotImplementedError

    def forward(self, view_a: Batch, view_b: Batch, gather: bool = False) -> LossOutput:
        """The training loss; `forward` so that DistributedDataParallel hooks see it."""
        return self.loss(view_a, view_b, gather)

    def loss(self, view_a: Batch, view_b: Batch, gather: bool = False) -> LossOutput:
        raise NotImplementedError

    def features(self, batch: Batch) -> Tensor:
        """What the linear probe sees; the baselines' default: the concatenated unimodal
        embeddings."""
        return torch.cat(self.unimodal(batch), dim=1)

    def fusion_options(self, view_a: Batch, view_b: Batch) -> dict[str, Callable[[], Tensor]]:
        """Interchangeable ways to run this method's masked fusion on these views (name ->
        a call returning a scalar to backpropagate), for timing; empty without fusion."""
        return {}

    def fusion_signature(self) -> str:
        """What fusion speed depends on besides the input shapes (for caching timings)."""
        return ""

    def compile_step(self, scope: str) -> str:
        """torch.compile part of the training forward (`train.compile`): `all` compiles the
        whole forward, `heads` what follows the encoders, by default the projection heads.
        Returns what was compiled, for the run's settings line."""
        if scope == "all":
            self.compile()
            return "the whole forward"
        if scope != "heads":
            raise ValueError(f"compile scope must be 'heads' or 'all', got '{scope}'")
        heads = self.projection_heads()
        for head in heads:
            head.compile()
        return f"{len(heads)} projection head(s)" if heads else "nothing: no projection head"

    def projection_heads(self) -> list[nn.Module]:
        """The training-only projection heads (`train.batchnorm_sync: head` syncs their
        BatchNorm statistics only)."""
        return [m for m in self.modules() if isinstance(m, ProjectionHead)]

    def unimodal(self, batch: Batch) -> list[Tensor]:
        """Globally pooled encoder outputs, one (B, d_m) per modality (the baselines' unimodal
        embeddings; adapters and fusion are CoMM's and take no part)."""
        return [global_pool(h, p) for h, p in self.stack.encode(batch)]


def build_method(cfg: ExperimentConfig, shapes: list[tuple[int, ...]]) -> Method:
    """Build the configured method for data whose per-sample modality shapes are `shapes`."""
    return METHODS.get(cfg.model.method)(cfg, shapes)
