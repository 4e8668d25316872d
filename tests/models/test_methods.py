import pytest
import torch

from commlab.augment import build_augmenter
from commlab.config import ConfigError, validate_config
from commlab.data.base import Batch, DataBundle
from commlab.models import METHODS, build_method
from commlab.train.loop import PretrainRun
from tests.conftest import toy_config, toy_sequence_dataset


def _setup(method):
    cfg = toy_config(method)
    ds = toy_sequence_dataset()
    model = build_method(cfg, [tuple(m.values.shape[1:]) for m in ds.modalities])
    aug = build_augmenter(cfg.augment, ["sequence", "sequence"])
    batch = ds.batch(torch.arange(16))
    g = torch.Generator().manual_seed(0)
    return cfg, model, aug, batch, g


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_trains_and_embeds(method):
    cfg, model, aug, batch, g = _setup(method)
    va, vb = aug(batch, g), aug(batch, g)
    out = model(va, vb)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert "ssl_acc" in out.acc
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(gr is not None for gr in grads), "every parameter takes part in the loss"
    model.eval()
    feats = model.features(aug.prepare(batch))
    width = cfg.model.embed_dim if method == "comm" else sum(model.stack.out_dims)
    assert feats.shape == (16, width)


def test_method_registry_lists_names():
    assert set(METHODS.names()) >= {"comm", "cross", "cross_self", "cmc"}
    with pytest.raises(
        ConfigError, match="unknown method 'nope'; valid: cmc, comm, cross, cross_self"
    ):
        toy_config("nope")


def _n_modalities(method: str, n_mod: int) -> tuple[object, Batch]:
    """A method on `n_mod` GRU-encoded sequence modalities and one random batch of 8."""
    mods = [{"encoder": {"name": "gru", "params": {"hidden": 16}}} for _ in range(n_mod)]
    raw = toy_config(method).model_dump(mode="json")
    raw["model"]["modalities"] = mods
    raw["augment"]["modalities"] = [{"kind": "none"}] * n_mod
    g = torch.Generator().manual_seed(n_mod)
    xs = [torch.randn(8, 5, 3 + m, generator=g) for m in range(n_mod)]
    model = build_method(validate_config(raw), [tuple(x.shape[1:]) for x in xs])
    return model, Batch(xs=xs, pad=[None] * n_mod)


@pytest.mark.parametrize("n_mod", [2, 3])
@pytest.mark.parametrize("method", METHODS.names())
def test_loss_returns_the_keys_its_method_declares(method, n_mod):
    """What the loop logs (`train/<name>` per term and accuracy) is what sweeps check against;
    a two-modality method refuses a third modality when it is built."""
    try:
        model, batch = _n_modalities(method, n_mod)
    except ValueError as err:
        assert n_mod != 2 and "needs exactly 2 modalities" in str(err)
        return
    out = model(batch, batch)
    declared = type(model).loss_keys(n_mod)
    assert len(set(declared)) == len(declared) and not set(out.terms) & set(out.acc)
    assert sorted([*out.terms, *out.acc]) == sorted(declared)


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_trains_an_epoch_and_logs_its_declared_metrics(method):
    cfg = toy_config(
        method,
        ("train.epochs=1", "train.max_steps_per_epoch=2", "train.fusion=sequential"),
    )
    ds = toy_sequence_dataset()
    history = []
    PretrainRun(cfg, data=DataBundle(pretrain=ds, probe=ds, description="toy")).fit(
        lambda epoch, metrics, run: history.append(metrics)
    )
    logged = {k for k in history[-1] if k.startswith("train/")}
    declared = METHODS.get(method).loss_keys(2)
    assert logged == {"train/loss", "train/lr", *(f"train/{k}" for k in declared)}
    assert all(torch.isfinite(torch.tensor(history[-1][k])) for k in logged)
    assert history[-1]["probe/cls/balanced_acc"] >= 0.0


def test_each_method_checks_its_own_loss_options():
    assert toy_config("cross_self", ("loss.ssl_scale=0.5",)).loss.ssl_scale == 0.5
    assert toy_config("cross", ("loss.logit_scale_init=10",)).loss.logit_scale_init == 10.0
    with pytest.raises(ConfigError, match=r"'loss.ssl_scale' is not an option of method 'comm'"):
        toy_config("comm", ("loss.ssl_scale=0.5",))
    with pytest.raises(
        ConfigError,
        match=r"'loss.temperature' is not an option of method 'cross'; its options: gather, logit_scale_init",
    ):
        toy_config("cross", ("loss.temperature=0.2",))
    model = build_method(toy_config("cmc", ("loss.temperature=0.3",)), [(8, 6), (8, 5)])
    assert model.options.temperature == 0.3 and isinstance(model.options, type(model).Options)


def test_comm_loss_has_nmod_plus_one_terms():
    _, model, aug, batch, g = _setup("comm")
    out = model(aug(batch, g), aug(batch, g))
    assert sorted(out.terms) == ["ssl_loss_0", "ssl_loss_1", "ssl_loss_2"]


@pytest.mark.parametrize("method", ["comm", "cross_self"])
def test_padding_is_masked_in_training_and_evaluation(method):
    """Garbage in padded positions changes neither the training loss nor the features."""
    _, model, aug, batch, g = _setup(method)
    model.eval()  # fixed BN statistics so the two passes are comparable
    va = aug.prepare(batch)
    noisy = aug.prepare(batch)
    for x, pad in zip(noisy.xs, noisy.pad, strict=True):
        assert pad is not None and pad.any()
        x[pad] = 1e4
    torch.testing.assert_close(model.features(va), model.features(noisy), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model(va, va).loss, model(noisy, noisy).loss, atol=1e-4, rtol=1e-4)


def test_encoder_config_errors_name_the_modality():
    cfg = toy_config("comm", ("model.modalities.1.encoder.params.hidden=12",))
    with pytest.raises(ValueError, match="model.modalities.1"):
        build_method(cfg, [(8, 6), (8, 5)])
    cfg = toy_config("comm", ("model.modalities.0.encoder.name=convv",))
    with pytest.raises(ValueError, match="unknown encoder 'convv'"):
        build_method(cfg, [(8, 6), (8, 5)])
    with pytest.raises(ValueError, match="has 2 entries but the dataset has 1"):
        build_method(toy_config("cross"), [(8, 6)])


def test_comm_fusion_paths_give_the_same_loss_and_gradients():
    cfg, model, aug, batch, g = _setup("comm")
    va, vb = aug(batch, g), aug(batch, g)
    model.eval()  # no dropout: both paths see the same network
    results = {}
    for path in ("packed", "sequential", "grouped"):
        model.fusion_path = path
        model.zero_grad(set_to_none=True)
        out = model(va, vb)
        out.loss.backward()
        results[path] = (out.loss.detach(), model.fusion.blocks[0].in_proj.weight.grad.clone())
    torch.testing.assert_close(results["packed"][0], results["sequential"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results["packed"][1], results["sequential"][1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        results["grouped"][0], results["sequential"][0], atol=1e-6, rtol=1e-6
    )
    torch.testing.assert_close(
        results["grouped"][1], results["sequential"][1], atol=1e-6, rtol=1e-5
    )
    model.fusion_path = "nope"
    with pytest.raises(ValueError, match="'packed', 'sequential', 'grouped', got 'nope'"):
        model(va, vb)


def test_fusion_options_time_every_path_without_touching_batchnorm():
    cfg, model, aug, batch, g = _setup("comm")
    va, vb = aug(batch, g), aug(batch, g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = model.fusion_options(va, vb)
    assert set(options) == {"packed", "sequential", "grouped"}
    a, b, c = options["packed"](), options["sequential"](), options["grouped"]()
    assert a.ndim == 0 and b.ndim == 0 and c.ndim == 0
    torch.testing.assert_close(c, b)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and "width=16" in model.fusion_signature()


@pytest.mark.parametrize(("method", "n_heads"), [("comm", 1), ("cross_self", 2), ("cmc", 0)])
def test_projection_heads(method, n_heads):
    _, model, *_ = _setup(method)
    assert len(model.projection_heads()) == n_heads


def test_compile_heads_says_what_it_compiles_per_method():
    """`train.compile: heads` compiles what follows the encoders: CoMM's fusion and head, a
    baseline's projection heads, and says so when a method has none."""
    shapes = [(8, 6), (8, 5)]
    comm = build_method(toy_config("comm"), shapes)
    assert comm.compile_step("heads") == "fusion and projection head" and comm.compiled_heads
    cross_self = build_method(toy_config("cross_self"), shapes)
    assert cross_self.compile_step("heads") == "2 projection head(s)"
    assert all(h._compiled_call_impl is not None for h in cross_self.projection_heads())
    cross = build_method(toy_config("cross"), shapes)
    assert cross.compile_step("heads") == "nothing: no projection head"
    with pytest.raises(ValueError, match="compile scope"):
        cross.compile_step("encoders")
