"""commlab: CoMM multimodal contrastive learning on Ray, with sweeps, MLflow and promotion."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from commlab.pretrained import load_encoder

__all__ = ["load_encoder"]


def __getattr__(name: str) -> Any:
    # Lazy: `import commlab` must not import torch (or mlflow) for the CLI and config tools.
    if name == "load_encoder":
        from commlab.pretrained import load_encoder

        return load_encoder
    raise AttributeError(f"module 'commlab' has no attribute {name!r}")
