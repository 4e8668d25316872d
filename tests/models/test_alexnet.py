"""The AlexNet feature stack (the paper's Trifeatures encoder) and the paper protocol configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from commlab.config import load_config
from commlab.models import ENCODERS, build_method
from commlab.models.adapters import PatchAdapter
from commlab.models.encoders import AlexNetEncoder

PAPER = Path(__file__).resolve().parents[2] / "configs" / "trifeatures"
METHODS = ("comm", "cross", "cross_self")
# torchvision's alexnet().features: conv weights + biases of its five convolutions.
ALEXNET_FEATURE_PARAMS = (
    (64 * 3 * 11 * 11 + 64)
    + (192 * 64 * 5 * 5 + 192)
    + (384 * 192 * 3 * 3 + 384)
    + (256 * 384 * 3 * 3 + 256)
    + (256 * 256 * 3 * 3 + 256)
)
# The paper's run, shrunk to seconds: 64 px, 800 + 200 images, 32 pairs, 2 steps of 16.
DRY_RUN = [
    "data.params.size=64",
    "data.params.per_combination=1",
    "data.params.pairs=32",
    "data.params.test_pairs=32",
    "data.batch_size=16",
    "data.probe_max_train=32",
    "train.epochs=1",
    "train.max_steps_per_epoch=2",
    "train.device=cpu",
]


def test_alexnet_shape_at_224() -> None:
    enc = ENCODERS.build("alexnet")
    h, pad = enc(torch.randn(2, 3, 224, 224))
    assert h.shape == (2, 256, 6, 6) and pad is None
    assert enc.out_dim == 256


def test_alexnet_layers_match_torchvision_features() -> None:
    enc = AlexNetEncoder()
    assert sum(p.numel() for p in enc.parameters()) == ALEXNET_FEATURE_PARAMS
    convs = [m for m in enc.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == [
        (64, 11, 4, 2),
        (192, 5, 1, 2),
        (384, 3, 1, 1),
        (256, 3, 1, 1),
        (256, 3, 1, 1),
    ]
    pools = [m for m in enc.features if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == 3 and all(p.kernel_size == 3 and p.stride == 2 for p in pools)


def test_alexnet_feeds_36_patch_tokens() -> None:
    enc = AlexNetEncoder()
    tokens, _ = PatchAdapter(enc.out_dim, 512)(enc(torch.randn(2, 3, 224, 224))[0])
    assert tokens.shape == (2, 36, 512)


def test_alexnet_rejects_too_small_inputs() -> None:
    with pytest.raises(ValueError, match="63"):
        AlexNetEncoder()(torch.randn(1, 3, 48, 48))
    assert AlexNetEncoder()(torch.randn(1, 3, 63, 63))[0].shape == (1, 256, 6, 6)


@pytest.mark.parametrize("method", METHODS)
def test_paper_configs_hold_the_paper_protocol(method: str) -> None:
    cfg = load_config(PAPER / f"{method}-paper.yaml")
    assert cfg.model.method == method
    assert cfg.data.params["size"] == 224 and cfg.data.batch_size == 64
    assert cfg.data.probe_max_train >= cfg.data.params["pairs"] == 10000
    assert (cfg.model.embed_dim, cfg.model.head.hidden_dim, cfg.model.head.out_dim) == (
        512,
        512,
        256,
    )
    assert all(
        m.encoder.name == "alexnet" and m.adapter.name == "patch" for m in cfg.model.modalities
    )
    assert (cfg.train.epochs, cfg.optim.lr, cfg.optim.weight_decay) == (100, 3e-4, 1e-4)
    # the objective's options are its defaults (CoMM, Cross+Self: temperature 0.1)
    assert cfg.optim.scheduler == "none" and cfg.loss == type(cfg.loss)()
    for aug in cfg.augment.modalities:  # the full SimCLR recipe
        assert (aug.crop_scale_min, aug.jitter_p, aug.grayscale_p, aug.blur_sigma_max) == (
            0.08,
            0.8,
            0.2,
            2.0,
        )
    model = build_method(cfg, [(3, 224, 224)] * 2)
    n = sum(p.numel() for p in model.stack.encoders.parameters())
    assert n == 2 * ALEXNET_FEATURE_PARAMS


@pytest.fixture(scope="module")
def dry_run_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One rendered tiny Trifeatures for the three methods (the builder reuses it)."""
    return tmp_path_factory.mktemp("trifeatures")


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_paper_protocol_dry_run(method: str, dry_run_data: Path, tmp_path: Path) -> None:
    """One epoch of the real pretrain path on a tiny subset: finite loss and R/U/S probes."""
    from commlab.train.local import pretrain_local

    cfg = load_config(
        PAPER / f"{method}-paper.yaml",
        [*DRY_RUN, f"data.path={dry_run_data}", f"train.out_dir={tmp_path / 'runs'}"],
    )
    result = pretrain_local(cfg, tmp_path / "run", tracking=False)
    m = result.metrics
    assert math.isfinite(m["train/loss"]) and m["train/loss"] > 0
    for task in ("share", "unique1", "unique2", "synergy"):
        assert 0.0 <= m[f"probe/{task}/balanced_acc"] <= 1.0
    assert result.rus is not None and set(result.rus) == {"redundancy", "uniqueness", "synergy"}
    assert (result.run_dir / "rus.json").is_file()
