"""commlab: CoMM multimodal contrastive learning on Ray, with sweeps, MLflow and promotion."""

__version__ = "0.1.0"
