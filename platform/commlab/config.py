"""Typed experiment configuration: the single source of truth for every run.

YAML is data; `load_config` validates it into `ExperimentConfig`. Overrides are dotted
`key=value` strings (`loss.temperature=0.2`, `augment.modalities.0.blur_p=0.3`) applied in one
place (`apply_overrides`) before validation. `flatten` turns a config into dotted keys for Tune's
param space and MLflow params. Every error names the offending key; an unknown key also names the
closest valid one.

The `loss:` section holds the configured method's own options: each method declares a
`LossOptions` model beside its code and registers it in `METHOD_OPTIONS` when `commlab.models`
is imported (this module stays free of torch and never imports the methods). Until then the
section is kept as given and the method checks it when it is built.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from commlab.registry import Registry

Prob = Annotated[float, Field(ge=0.0, le=1.0)]
PosFloat = Annotated[float, Field(gt=0.0)]
NonNegFloat = Annotated[float, Field(ge=0.0)]
PosInt = Annotated[int, Field(gt=0)]


class ConfigError(ValueError):
    """A configuration problem; the message always names the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_range(key: str, lo: float, hi: float) -> None:
    if lo > hi:
        raise ValueError(f"{key}: lower bound {lo} is greater than upper bound {hi}")


# ---------------------------------------------------------------- data
class DataConfig(_Strict):
    """Which dataset, where, and how it is batched.

    `name` selects a dataset builder from `commlab.data.DATASETS`; `params` go to that builder
    (each builder validates its own params and names bad keys).
    """

    name: str = "trifeatures"
    path: str = "data/trifeatures"
    params: dict[str, Any] = Field(default_factory=dict)
    batch_size: Annotated[int, Field(ge=2)] = 64
    probe_tasks: list[str] | None = None  # None: every task the dataset declares
    # Cap on probe train samples; None probes on every train sample, as the paper does (a cap of
    # ~3000 left Trifeatures' 10 %-positive synergy task ~290 positives).
    probe_max_train: PosInt | None = None


# ---------------------------------------------------------------- augmentations
class ImageAugmentConfig(_Strict):
    """SimCLR image recipe; every strength and probability is tunable."""

    kind: Literal["image"] = "image"
    crop_scale_min: Annotated[float, Field(gt=0.0, le=1.0)] = 0.08
    crop_scale_max: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    crop_p: Prob = 1.0
    jitter_brightness: NonNegFloat = 0.4
    jitter_contrast: NonNegFloat = 0.4
    jitter_saturation: NonNegFloat = 0.4
    jitter_hue: Annotated[float, Field(ge=0.0, le=0.5)] = 0.1
    jitter_p: Prob = 0.8
    grayscale_p: Prob = 0.2
    blur_sigma_min: PosFloat = 0.1
    blur_sigma_max: PosFloat = 2.0
    blur_p: Prob = 0.5
    flip_p: Prob = 0.5
    normalize: bool = True

    @model_validator(mode="after")
    def _ranges(self) -> ImageAugmentConfig:
        _check_range("crop_scale_min/crop_scale_max", self.crop_scale_min, self.crop_scale_max)
        _check_range("blur_sigma_min/blur_sigma_max", self.blur_sigma_min, self.blur_sigma_max)
        return self


class SequenceAugmentConfig(_Strict):
    """MultiBench time-series ops on (B, T, p) tensors, applied in this order."""

    kind: Literal["sequence"] = "sequence"
    noise_std: NonNegFloat = 0.1
    noise_p: Prob = 0.5
    drop_max: Prob = 0.8
    drop_p: Prob = 0.5
    drop_consecutive_max: Prob = 0.8
    drop_consecutive_p: Prob = 0.0
    crop_min: Annotated[float, Field(gt=0.0, le=1.0)] = 0.08
    crop_p: Prob = 0.0
    permute_p: Prob = 0.0
    mixup_alpha: PosFloat = 1.0
    mixup_p: Prob = 0.0


class TabularAugmentConfig(_Strict):
    """Ops on (B, n) feature vectors."""

    kind: Literal["tabular"] = "tabular"
    noise_std: NonNegFloat = 0.1
    noise_p: Prob = 0.5
    drop_max: Prob = 0.8
    drop_p: Prob = 0.5


class TextAugmentConfig(_Strict):
    """Token masking on (B, L) integer token ids; pad tokens are never masked."""

    kind: Literal["text"] = "text"
    mask_p: Prob = 0.15
    mask_token_id: Annotated[int, Field(ge=0)] = 1
    pad_token_id: Annotated[int, Field(ge=0)] = 0


class IdentityAugmentConfig(_Strict):
    kind: Literal["none"] = "none"


ModalityAugmentConfig = Annotated[
    ImageAugmentConfig
    | SequenceAugmentConfig
    | TabularAugmentConfig
    | TextAugmentConfig
    | IdentityAugmentConfig,
    Field(discriminator="kind"),
]


class AugmentConfig(_Strict):
    """One pipeline per modality, in the dataset's modality order."""

    modalities: list[ModalityAugmentConfig] = Field(default_factory=list)


# ---------------------------------------------------------------- model
class EncoderConfig(_Strict):
    """A per-modality encoder from `commlab.models.ENCODERS`; `params` are its keyword args."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class AdapterConfig(_Strict):
    """Maps encoder output to (B, L, embed_dim) tokens; from `commlab.models.ADAPTERS`."""

    name: str = "identity"
    params: dict[str, Any] = Field(default_factory=dict)


class ModalityModelConfig(_Strict):
    encoder: EncoderConfig
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)


class HeadConfig(_Strict):
    hidden_dim: PosInt = 512
    out_dim: PosInt = 256


class ModelConfig(_Strict):
    method: str = "comm"  # from commlab.models.METHODS
    embed_dim: PosInt = 128
    n_heads: PosInt = 8
    n_layers: PosInt = 1
    pool: Literal["cls", "mean"] = "cls"
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    head: HeadConfig = Field(default_factory=HeadConfig)
    modalities: list[ModalityModelConfig] = Field(default_factory=list)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if METHOD_OPTIONS.names():  # the methods are loaded: an unknown name lists them
            METHOD_OPTIONS.get(value)
        return value

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.embed_dim % self.n_heads:
            raise ValueError(
                f"embed_dim={self.embed_dim} is not divisible by n_heads={self.n_heads}"
            )
        return self


# ---------------------------------------------------------------- objective / optimiser / training
class LossOptions(_Strict):
    """The `loss:` section: options every method's objective takes. Each method declares its own
    options model, a subclass, beside its code (`commlab.models.methods`) and registers it in
    `METHOD_OPTIONS`; the section is validated with the configured method's model."""

    gather: bool = True  # negatives from every worker

    def check_modalities(self, n_mod: int) -> None:
        """Raise ValueError when these options do not fit `n_mod` modalities."""


# method name -> its options model; filled as `commlab.models` registers each method (this
# module sits below the methods and never imports them)
METHOD_OPTIONS: Registry[type[LossOptions]] = Registry("method")

# The single flat `loss:` model that predated per-method options dumped all of these into every
# resolved config (checkpoints, logged configs); only the method's own options are kept.
_FLAT_LOSS_KEYS = frozenset({"temperature", "weights", "ssl_scale", "logit_scale_init", "gather"})


class _UncheckedLoss(LossOptions):
    """A `loss:` section kept as given, in a process that has loaded no method to check it
    against (`import commlab.config` alone); a method checks it again when it is built."""

    model_config = ConfigDict(extra="allow")


def _method_loss(method: str, value: Any) -> Any:
    """`value` (the raw `loss:` section) validated with `method`'s options model."""
    value = {} if value is None else value
    if method not in METHOD_OPTIONS:  # no method loaded yet, or an unknown one (reported)
        return value if isinstance(value, LossOptions) else _UncheckedLoss.model_validate(value)
    options = METHOD_OPTIONS.get(method)
    if isinstance(value, options):
        return value
    if isinstance(value, LossOptions):
        value = value.model_dump()
    if isinstance(value, dict) and value.keys() >= _FLAT_LOSS_KEYS:
        value = {k: v for k, v in value.items() if k in options.model_fields}
    return options.model_validate(value)


class OptimConfig(_Strict):
    lr: PosFloat = 3e-4
    weight_decay: NonNegFloat = 1e-4
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (
        0.9,
        0.999,
    )
    scheduler: Literal["none", "cosine"] = "none"
    warmup_epochs: Annotated[int, Field(ge=0)] = 0
    warmup_start_lr: NonNegFloat = 1e-6
    min_lr: NonNegFloat = 1e-6
    grad_clip: NonNegFloat = 0.0  # 0 disables clipping


class TrainConfig(_Strict):
    """How a run executes. Speed settings (precision, compile, fusion, channels_last) change
    the numbers only within floating-point rounding, never the method."""

    epochs: PosInt = 10
    probe_every: Annotated[int, Field(ge=0)] = 5  # 0: only after the last epoch
    max_steps_per_epoch: PosInt | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bf16-mixed: autocast to bfloat16 (weights, optimiser and loss stay float32); auto: whichever
    # of the two a cached once-per-device measurement found faster (commlab.perf)
    precision: Literal["fp32", "bf16-mixed", "auto"] = "fp32"
    # torch.compile part of the training forward: `heads` = what follows the encoders (CoMM's
    # fusion transformer and projection head, a baseline's projection heads), where compiling
    # pays on CPU (inductor's conv + BatchNorm training code is slower than oneDNN's);
    # `all` = the whole forward. YAML true / false read as heads / off.
    compile: Literal["off", "heads", "all"] = "off"
    # CoMM's n_mod+1 masked fusion passes: one packed forward, one forward per mask, one per
    # distinct token count (equal-length masks stacked), or the fastest of these as measured
    # once per device and model shape (cached)
    fusion: Literal["auto", "packed", "sequential", "grouped"] = "auto"
    channels_last: bool = True  # NHWC conv weights: oneDNN/cuDNN then run the convs in NHWC
    # Which BatchNorm layers use global-batch statistics under data parallelism: every one,
    # only the projection head's (CoMM's contrastive statistics), or none (per-worker shards)
    batchnorm_sync: Literal["all", "head", "none"] = "all"
    # How data-parallel workers average gradients: `ddp` (DistributedDataParallel: bucketed
    # all-reduces overlapping the backward pass) or `deferred` (one all-reduce after the backward
    # pass, overlapping the next batch's augmentation, the non-finite-loss flag riding along).
    # The same averaged gradients either way; bench/ray_overhead.py measures both.
    grad_sync: Literal["ddp", "deferred"] = "ddp"
    threads: Annotated[int, Field(ge=0)] = 0  # torch intra-op threads; 0 = leave torch's default
    out_dir: str = "runs"
    deterministic: bool = False

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_alias(cls, value: Any) -> Any:
        return "bf16-mixed" if value == "bf16" else value  # the name before bf16-mixed

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_alias(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML's `off` is false too
            return "heads" if value else "off"
        return value


class ExperimentConfig(_Strict):
    name: str = "comm"
    seed: Annotated[int, Field(ge=0)] = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    # the configured method's options model (a LossOptions subclass), dumped with its own fields
    loss: SerializeAsAny[LossOptions] = Field(default_factory=dict, validate_default=True)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("loss", mode="before")
    @classmethod
    def _method_options(cls, value: Any, info: ValidationInfo) -> Any:
        model = info.data.get("model")  # absent when it failed validation (reported)
        return _method_loss(model.method if model else "", value)

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        n_model = len(self.model.modalities)
        n_aug = len(self.augment.modalities)
        if n_model and n_aug and n_model != n_aug:
            raise ValueError(
                f"augment.modalities has {n_aug} entries but model.modalities has {n_model}"
            )
        if n_model:
            self.loss.check_modalities(n_model)
        if self.optim.warmup_epochs >= self.train.epochs and self.optim.scheduler != "none":
            raise ValueError("optim.warmup_epochs must be smaller than train.epochs")
        return self


# ---------------------------------------------------------------- loading, overrides, flattening
def _valid_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names valid at `loc` inside `model` (best effort, for suggestions)."""
    cls: Any = model
    for part in loc:
        if isinstance(part, int) or cls is None:
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            # a tagged-union member name (e.g. 'image') appears in pydantic locs
            return []
        cls = _model_type(field.annotation)
    return list(getattr(cls, "model_fields", {}).keys())


def _model_type(annotation: Any) -> Any:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_type(arg)
        if found is not None:
            return found
    return None


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _format_error(err: ValidationError, source: str = "", method: str = "") -> ConfigError:
    lines = []
    for e in err.errors():
        loc = tuple(
            p for p in e["loc"] if p not in {"image", "sequence", "tabular", "text", "none"}
        )
        dotted = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden" and len(loc) == 2 and loc[0] == "loss":
            valid = sorted(METHOD_OPTIONS.get(method).model_fields)
            lines.append(
                f"'{dotted}' is not an option of method '{method}'{_suggest(str(loc[1]), valid)};"
                f" its options: {', '.join(valid)}"
            )
        elif e["type"] == "extra_forbidden":
            parent = tuple(loc[:-1])
            hint = _suggest(str(loc[-1]), _union_keys(parent))
            lines.append(f"unknown key '{dotted}'{hint}")
        else:
            lines.append(f"{dotted}: {e['msg']}")
    where = f" in {source}" if source else ""
    return ConfigError(f"invalid config{where}:\n  " + "\n  ".join(lines))


def _union_keys(parent: tuple[Any, ...]) -> list[str]:
    keys = set(_valid_keys(ExperimentConfig, parent))
    if parent and parent[0] == "augment":
        for cls in (
            ImageAugmentConfig,
            SequenceAugmentConfig,
            TabularAugmentConfig,
            TextAugmentConfig,
        ):
            keys.update(cls.model_fields)
    return sorted(keys)


def validate_config(raw: dict[str, Any], source: str = "") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        model = raw.get("model") if isinstance(raw, dict) else None
        method = model.get("method") if isinstance(model, dict) else getattr(model, "method", "")
        raise _format_error(err, source, str(method or ModelConfig().method)) from None


def parse_value(text: str) -> Any:
    """YAML scalar semantics for override values: 0.1 -> float, true -> bool, [1,2] -> list."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted `key=value` overrides to a raw config dict (a deep copy is returned).

    Numeric path parts index lists (`model.modalities.0.encoder.name=conv`). A key that does not
    exist in the schema is an error naming the closest valid key.
    """
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        set_dotted(out, key.strip(), parse_value(value))
    return out


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = raw
    schema_loc: list[Any] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"override '{key}': '{part}' is not a valid index (0..{len(node) - 1})"
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            schema_loc.append(int(part))
            continue
        # params go to a builder; `loss:` keys depend on the method (checked on validation)
        in_free_dict = bool(schema_loc) and (schema_loc[-1] == "params" or schema_loc == ["loss"])
        valid = _union_keys(tuple(schema_loc))
        if not in_free_dict and valid and part not in valid:
            raise ConfigError(f"unknown key '{key}'{_suggest(part, valid)}")
        if last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        schema_loc.append(part)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> ExperimentConfig:
    """Load a YAML config (or defaults when `path` is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    source = ""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(
                f"{path} is not valid YAML: {' '.join(str(err).split())}; fix the file "
                "(indentation, a missing ':' or an unclosed bracket or quote)"
            ) from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read it as a YAML text file ({err})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        raw = loaded or {}
    raw = apply_overrides(raw, overrides or [])
    return validate_config(raw, source)


def flatten(cfg: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted-key view: {'loss.temperature': 0.1, 'model.modalities.0.encoder.name': 'conv', ...}."""
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    out: dict[str, Any] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list) and node and any(isinstance(v, dict) for v in node):
            for i, v in enumerate(node):
                walk(v, f"{key}.{i}")
        else:
            out[key] = node

    walk(data, prefix)
    return out


def to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
