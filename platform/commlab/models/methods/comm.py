"""CoMM: the method this platform is built around (Dufumier, Castillo-Navarro et al., "What to
align in multimodal contrastive learning?", ICLR 2025)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor

from commlab.config import ExperimentConfig, LossOptions, NonNegFloat, PosFloat
from commlab.data.base import Batch
from commlab.models.fusion import FusionTransformer, comm_masks
from commlab.models.heads import ProjectionHead
from commlab.models.methods.base import Method, cat_views, register_method
from commlab.objectives import LossOutput, comm_loss


@register_method("comm")
class CoMM(Method):
    """CoMM: n_mod+1 fused embeddings per view (each modality alone, then all), one batched
    fusion forward per step, projection head, `comm_loss` (Dufumier et al., ICLR 2025)."""

    class Options(LossOptions):
        temperature: PosFloat = 0.1  # τ of the NT-Xent
        weights: list[NonNegFloat] | None = None  # per-term weights, n_mod + 1 of them

        def check_modalities(self, n_mod: int) -> None:
            if self.weights is not None and len(self.weights) != n_mod + 1:
                raise ValueError(
                    f"loss.weights needs n_mod+1 = {n_mod + 1} entries, got {len(self.weights)}"
                )

    options: Options
    uses_tokens = True
    fusion_path = "packed"  # or "sequential", "grouped": the same numbers, speeds differ
    compiled_heads = False  # `project` under torch.compile (`compile_step("heads")`)

    def __init__(self, cfg: ExperimentConfig, shapes: list[tuple[int, ...]]) -> None:
        super().__init__(cfg, shapes)
        m = cfg.model
        self.fusion = FusionTransformer(m.embed_dim, m.n_heads, m.n_layers, m.pool, m.dropout)
        self.head = ProjectionHead(m.embed_dim, m.head.hidden_dim, m.head.out_dim)
        self.masks = comm_masks(self.n_mod)

    def fuse(self, tokens: list[Tensor], pads: list[Tensor | None]) -> list[Tensor]:
        """The n_mod+1 masked fusion passes along `fusion_path`."""
        paths = {
            "packed": self.fusion.fuse_batched,
            "sequential": self.fusion.fuse_sequential,
            "grouped": self.fusion.fuse_grouped,
        }
        if self.fusion_path not in paths:
            raise ValueError(
                f"fusion_path must be one of {', '.join(map(repr, paths))}, "
                f"got '{self.fusion_path}'"
            )
        return paths[self.fusion_path](tokens, pads, self.masks)

    def fusion_options(self, view_a: Batch, view_b: Batch) -> dict[str, Callable[[], Tensor]]:
        was_training = self.stack.training
        with torch.no_grad():  # eval: BatchNorm running statistics stay untouched
            tokens, pads = self.stack.eval()(cat_views(view_a, view_b))
        self.stack.train(was_training)
        tokens = [t.detach().requires_grad_(True) for t in tokens]

        def run(fn: Callable[..., list[Tensor]]) -> Callable[[], Tensor]:
            return lambda: torch.stack(
                [o.float().sum() for o in fn(tokens, pads, self.masks)]
            ).sum()

        return {
            "packed": run(self.fusion.fuse_batched),
            "sequential": run(self.fusion.fuse_sequential),
            "grouped": run(self.fusion.fuse_grouped),
        }

    def fusion_signature(self) -> str:
        blk = self.fusion.blocks
        width = self.fusion.ln_post.normalized_shape[0]
        return f"fusion(width={width},layers={len(blk)},heads={blk[0].n_heads if blk else 0},masks={len(self.masks)})"

    def compile_step(self, scope: str) -> str:
        """`heads`: compile the fusion passes and the projection head together, one graph
        from the tokens to the projections (the encoders stay eager)."""
        if scope != "heads":
            return super().compile_step(scope)
        self.compiled_heads = True
        return "fusion and projection head"

    def embed_views(self, view_a: Batch, view_b: Batch) -> tuple[list[Tensor], list[Tensor]]:
        tokens, pads = self.stack(cat_views(view_a, view_b))
        project = _compiled_project() if self.compiled_heads else CoMM.project
        z = project(self, tokens, pads, view_a.size)
        k = len(z) // 2
        return list(z[:k]), list(z[k:])

    def project(self, tokens: list[Tensor], pads: list[Tensor | None], b: int) -> Tensor:
        """Both views' tokens (2B rows) -> (2K, B, out): the K fused embeddings of view a, then
        those of view b, through the projection head."""
        fused = self.fuse(tokens, pads)  # K x (2B, E)
        # BatchNorm statistics per mask and view, as in the paper, in one head pass.
        return self.head.forward_groups(
            torch.stack([f[:b] for f in fused] + [f[b:] for f in fused])
        )

    @classmethod
    def loss_keys(cls, n_mod: int) -> list[str]:
        terms = range(n_mod + 1)
        return [*(f"ssl_loss_{i}" for i in terms), *(f"ssl_acc_{i}" for i in terms), "ssl_acc"]

    def loss(self, view_a: Batch, view_b: Batch, gather: bool = False) -> LossOutput:
        za, zb = self.embed_views(view_a, view_b)
        return comm_loss(za, zb, self.options.temperature, self.options.weights, gather=gather)

    def features(self, batch: Batch) -> Tensor:
        tokens, pads = self.stack(batch)
        out = self.fusion(tokens, pads)
        assert isinstance(out, Tensor)
        return out


@functools.cache
def _compiled_project() -> Callable[[CoMM, list[Tensor], list[Tensor | None], int], Tensor]:
    """`CoMM.project` compiled once per process: the module is an argument, so copies of a
    model each get their own guards, never another model's graph."""
    return cast(Any, torch.compile(CoMM.project))
