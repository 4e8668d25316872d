import subprocess
import sys

import pytest
import yaml

import commlab.models  # noqa: F401  (each method registers its `loss:` options)
from commlab.config import (
    METHOD_OPTIONS,
    ConfigError,
    apply_overrides,
    flatten,
    load_config,
    validate_config,
)


def test_defaults_and_overrides_types():
    cfg = load_config(
        overrides=[
            "loss.temperature=0.2",
            "train.epochs=3",
            "optim.scheduler=cosine",
            "model.head.out_dim=64",
            "loss.gather=false",
        ]
    )
    assert cfg.loss.temperature == 0.2 and isinstance(cfg.loss.temperature, float)
    assert cfg.train.epochs == 3 and cfg.optim.scheduler == "cosine"
    assert cfg.model.head.out_dim == 64 and cfg.loss.gather is False


def test_yaml_load_and_list_index_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "modalities": [{"encoder": {"name": "conv"}}, {"encoder": {"name": "mlp"}}]
                },
                "augment": {"modalities": [{"kind": "image"}, {"kind": "tabular"}]},
            }
        )
    )
    cfg = load_config(
        path, ["augment.modalities.0.blur_p=0.25", "model.modalities.1.encoder.params.out_dim=7"]
    )
    assert cfg.augment.modalities[0].blur_p == 0.25
    assert cfg.model.modalities[1].encoder.params == {"out_dim": 7}


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("loss.temprature=0.3", "loss.temprature", "temperature"),
        ("optim.weight_decy=0.1", "optim.weight_decy", "weight_decay"),
        ("trian.epochs=3", "trian.epochs", "train"),
    ],
)
def test_typo_override_names_key_and_closest(override, key, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert key in str(err.value) and f"did you mean '{suggestion}'" in str(err.value)


def test_typo_in_yaml_names_key_and_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.1\n  wieght_decay: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "optim.wieght_decay" in msg and "weight_decay" in msg and str(path) in msg


def test_typo_in_augment_union_suggests_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("augment:\n  modalities:\n    - {kind: image, blur_prob: 0.3}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "augment.modalities.0.blur_prob" in str(err.value) and "blur_p" in str(err.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("loss.temperature=0", "loss.temperature"),
        ("loss.temperature=-1", "loss.temperature"),
        ("model.embed_dim=100", "embed_dim"),
        ("optim.lr=0", "optim.lr"),
        ("data.batch_size=1", "data.batch_size"),
        ("train.epochs=0", "train.epochs"),
        ("model.dropout=1.5", "model.dropout"),
    ],
)
def test_out_of_range_names_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert key in str(err.value)


def test_probability_outside_unit_interval(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "augment:\n  modalities:\n    - {kind: image, jitter_p: 1.2}\n    - {kind: sequence, noise_p: -0.1}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "augment.modalities.0.jitter_p" in str(err.value)
    assert "augment.modalities.1.noise_p" in str(err.value)


def test_crossed_ranges_and_inconsistent_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "augment:\n  modalities:\n    - {kind: image, crop_scale_min: 0.9, crop_scale_max: 0.5}\n"
    )
    with pytest.raises(ConfigError, match="crop_scale_min"):
        load_config(path)
    path.write_text(
        "model:\n  modalities:\n    - {encoder: {name: conv}}\n    - {encoder: {name: conv}}\n"
        "loss: {weights: [1, 1]}\n"
    )
    with pytest.raises(ConfigError, match="loss.weights"):
        load_config(path)


def test_bad_override_syntax_and_index():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["loss.temperature"])
    with pytest.raises(ConfigError, match="valid index"):
        apply_overrides(
            {"augment": {"modalities": [{"kind": "image"}]}}, ["augment.modalities.3.blur_p=0.1"]
        )


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/x.yaml")


def test_flatten_roundtrip_through_overrides():
    cfg = load_config(overrides=["loss.temperature=0.3", "optim.betas=[0.8, 0.99]"])
    flat = flatten(cfg)
    assert flat["loss.temperature"] == 0.3
    assert flat["optim.betas"] == [0.8, 0.99]
    assert set(k for k in flat if "." not in k) == {"name", "seed"}
    rebuilt = load_config(
        overrides=[f"{k}={v}" for k, v in flat.items() if v is not None and v != {} and v != []]
    )
    assert rebuilt == cfg


def test_loss_section_holds_the_methods_own_options():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["loss.ssl_scale=0.5"])
    assert (
        "'loss.ssl_scale' is not an option of method 'comm'; its options: gather, temperature, "
        "weights"
    ) in str(err.value)
    with pytest.raises(ConfigError, match="'loss.temperature' is not an option of method 'cross'"):
        load_config(overrides=["model.method=cross", "loss.temperature=0.1"])
    cross = load_config(overrides=["model.method=cross", "loss.logit_scale_init=20"])
    assert cross.loss.logit_scale_init == 20.0
    assert {k for k in flatten(cross) if k.startswith("loss.")} == {
        "loss.gather",
        "loss.logit_scale_init",
    }
    assert set(METHOD_OPTIONS.names()) >= {"comm", "cross", "cross_self", "cmc"}
    with pytest.raises(
        ConfigError, match="model.method: .*unknown method 'clip'; valid: cmc, comm"
    ):
        load_config(overrides=["model.method=clip"])


def test_a_flat_loss_section_from_before_per_method_options_still_loads():
    """Resolved configs (checkpoints, logged configs) once carried every method's loss keys."""
    raw = validate_config({"model": {"method": "cross_self"}}).model_dump(mode="json")
    raw["loss"] = {
        "temperature": 0.2,
        "weights": None,
        "ssl_scale": 0.5,
        "logit_scale_init": 1 / 0.07,
        "gather": False,
    }
    cfg = validate_config(raw)
    assert cfg.loss.model_dump() == {"gather": False, "temperature": 0.2, "ssl_scale": 0.5}
    assert validate_config(cfg.model_dump(mode="json")) == cfg


def test_config_alone_stays_light_and_the_method_checks_its_options_when_built():
    """Without the methods loaded the `loss:` section is kept as given; building checks it."""
    code = (
        "import sys\n"
        "from commlab.config import load_config\n"
        "cfg = load_config(overrides=['loss.ssl_scale=0.5'])\n"
        "assert 'torch' not in sys.modules, 'commlab.config imported torch'\n"
        "from commlab.models import build_method\n"
        "try:\n"
        "    build_method(cfg, [(4,), (4,)])\n"
        "except ValueError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert "'loss.ssl_scale' is not an option of method 'comm'" in out


@pytest.mark.parametrize(
    ("value", "scope"),
    [("true", "heads"), ("false", "off"), ("off", "off"), ("heads", "heads"), ("all", "all")],
)
def test_compile_scope_and_its_yaml_booleans(value, scope):
    assert load_config(overrides=[f"train.compile={value}"]).train.compile == scope


def test_compile_scope_unknown_is_rejected():
    with pytest.raises(ValueError, match=r"train\.compile"):
        load_config(overrides=["train.compile=encoders"])
