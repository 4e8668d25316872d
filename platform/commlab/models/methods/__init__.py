"""Methods: a model plus its objective and its options, behind one interface the loop uses.

`Method.loss(view_a, view_b, gather)` returns a `LossOutput`; `Method.features(batch)` returns
the frozen features a linear probe sees. CoMM (comm.py) uses one fused encoder; the baselines
(baselines.py: Cross = CLIP, Cross+Self, CMC, …) align pooled unimodal embeddings instead and are
probed on their concatenation.

Each method declares, beside its code, its `Options` (the config's `loss:` section, a
`LossOptions` model registered in `commlab.config.METHOD_OPTIONS`) and `loss_keys(n_mod)` (the
terms and accuracies its loss returns, logged as `train/<name>`), so adding a method touches
only its own code, its config and its tests.
"""

from commlab.models.methods import baselines, comm  # noqa: F401  (each registers its methods)
from commlab.models.methods.base import (
    METHODS,
    Method,
    ModalityStack,
    build_method,
    register_method,
)

__all__ = ["METHODS", "Method", "ModalityStack", "build_method", "register_method"]
