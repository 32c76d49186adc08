"""Typed model configuration and the named presets.

Every constant of the reference implementation that shapes the model or an objective is a field here
whose default is the paper's value, so a recipe can change any of them without editing code.
Overrides are validated field by field: an unknown name or an ill-typed value fails before any model is
built, with a message naming the field and what it accepts.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, get_args, get_origin

from .errors import ConfigError

#: The five pretraining objectives, in the order a step computes them.
LOSS_NAMES = ("itc", "itm", "mlm", "mim", "psl")


@dataclass
class VisionConfig:
    """The ViT image encoder."""

    image_size: int = 256
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ln_eps: float = 1e-6
    drop_path: float = 0.0
    # Pretraining needs the learnable mask token; downstream models are built without it.
    use_mask_token: bool = True
    # DeiT/timm weights to start from: a local file, a timm model name or a URL. None = random init.
    init: str | None = None
    # Std of the blocks' linear weights at random init; None keeps timm's init. Small models trained from
    # scratch need more than the usual 0.02, or every image starts with the same [CLS] feature and the
    # contrastive loss has no gradient to break the tie.
    layer_init_std: float | None = None


@dataclass
class TextConfig:
    """The single shared BERT-style encoder."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    # Special token ids of the uncased WordPiece vocabulary.
    pad_token_id: int = 0
    unk_token_id: int = 100
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103
    # Std of the layers' linear weights at random init (BERT's initializer_range, 0.02); see
    # VisionConfig.layer_init_std for why the from-scratch tiny preset uses more.
    layer_init_std: float = 0.02
    # Hugging Face BERT checkpoint to initialise from (local directory or hub name). None = random init.
    init: str | None = None
    # Text tokenizer (local directory or hub name) used by encode_text on raw strings.
    tokenizer: str | None = "bert-base-uncased"


@dataclass
class ObjectiveConfig:
    """Constants of the five pretraining objectives."""

    embed_dim: int = 256
    queue_size: int = 65536
    momentum: float = 0.995
    temp: float = 0.07
    temp_min: float = 0.001
    temp_max: float = 0.5
    alpha: float = 0.4
    # Text: reference max length and MLM masking.
    max_text_length: int = 25
    mlm_probability: float = 0.15
    mlm_mask_ratio: float = 0.8
    mlm_random_ratio: float = 0.5
    # MIM: codebook size of the visual tokenizer and the block-mask generator.
    visual_vocab_size: int = 8192
    mim_num_masked: int = 75
    mim_min_block: int = 16
    mim_min_aspect: float = 0.3
    # Side of the tokenizer view as a fraction of the encoder view (reference: R // 2).
    tokenizer_view_ratio: float = 0.5
    # PSL: layer whose [CLS] self-attention votes, votes per head, keywords per caption.
    psl_layer: int = 11
    psl_votes_per_head: int = 4
    psl_num_keywords: int = 5
    # "simla" = our selection (special tokens/pads excluded, teacher on momentum image embeddings);
    # "reference" = the authors' selection exactly (for parity tests and ablations).
    psl_selection: Literal["simla", "reference"] = "simla"
    # Momentum teachers run with dropout on, as in the reference; False puts them in eval mode.
    momentum_dropout: bool = True
    # Pairs whose captions are identical: "negatives" (the reference: each pair's own caption is its only
    # positive) or "positives" (they are positives of each other in ITC, in the batch and in the queue, and
    # are never drawn as ITM hard negatives, as retrieval fine-tuning treats the captions of one image). Data with many
    # repeated captions (the easy-VQA demo, "photo"-style web captions) otherwise teaches ITM that a
    # matching pair does not match.
    duplicate_captions: Literal["negatives", "positives"] = "negatives"
    # How ITM draws its in-batch negatives: "hard" (the reference: in proportion to the ITC similarity) or
    # "random" (uniformly). Where many images share what a caption says (templated captions, several
    # objects per image with short expressions), the most similar "negative" is usually a true match,
    # and hard negatives teach ITM to contradict itself; uniform draws keep most negatives true.
    itm_negatives: Literal["hard", "random"] = "hard"
    # How a training step is executed; both ways compute the same losses. "simla": the ITM pass and the MLM
    # student pass are one multimodal pass in which each image's cross-attention keys/values are projected
    # once (4B captions over B images), the teacher's MLM and PSL passes likewise, one word-embedding
    # lookup serves every online pass, with alpha = 0 the teacher work that only feeds distillation (the
    # masked momentum ViT, the teacher MIM and MLM passes, the teacher concept head) is skipped, and on CPU
    # dropout masks come from 16-bit halves of torch's integer draws (torch's CPU Bernoulli sampler is three
    # times slower) with the same keep probability. "reference": the authors' execution (separate passes,
    # keys/values projected per caption, teachers always run, torch's dropout), the baseline
    # benchmarks/pretrain_step.py measures against. For pretraining it is its own class,
    # simla.models.pretrain_reference.ReferencePretraining, which a config with "reference" builds; the
    # encoders' dropout sampler and the retrieval and VQA models read the field directly.
    execution: Literal["simla", "reference"] = "simla"
    # The objectives a pretraining step computes (the paper: all five). A left-out objective costs nothing:
    # its passes, heads and teacher work are not there, so the paper's ablation rows are one override each
    # (losses=[itc,itm]; [itc,itm,mlm]; [itc,itm,mlm,mim]; all five).
    losses: list[str] = field(default_factory=lambda: list(LOSS_NAMES))


@dataclass
class VQAConfig:
    """The VQA answer decoder and answer ranking (used only by the VQA model)."""

    # Layers of the causal answer decoder; None = the top half of the shared encoder (the paper: 6 of 12,
    # initialised from pretrained layers 6-11; the 2-layer tiny model: 1, from layer 1).
    decoder_layers: int | None = None
    # Candidates kept after the first-token step and re-scored with the whole answer (paper: 128).
    k_test: int = 128
    # "simla" scores a candidate by the log-probability of its tokens; "reference" counts the first
    # token's log-probability twice, as the authors' ranking does (for reproducing their numbers).
    answer_scoring: Literal["simla", "reference"] = "simla"


@dataclass
class NLVRConfig:
    """The NLVR2 encoder, deepened so that layers alternate between the two images."""

    # Pretrained layers below this one keep their place; each layer n >= it is duplicated into layers
    # 2(n - d) + d and 2(n - d) + d + 1, which share their cross-attention keys/values. None = half the
    # encoder (the paper: 6, so 12 layers become 18; the 2-layer tiny model: 1, giving 3).
    duplicate_from: int | None = None
    # Text assignment: image similarity temperature for drawing negative images (the reference's constant).
    ta_temperature: float = 0.07


@dataclass
class ExplainConfig:
    """Grad-CAM explanations (`simla explain`, weakly supervised grounding)."""

    # Layer of the shared encoder whose cross-attention is explained. None = two thirds of the depth, the
    # reference's block 8 of 12, but never the last layer: there only the [CLS] row reaches the ITM head, so
    # every word's map would be zero (the 2-layer tiny model: layer 0).
    gradcam_layer: int | None = None


@dataclass
class SimlaConfig:
    """A whole SIMLA model: the two encoders and the objectives."""

    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    vqa: VQAConfig = field(default_factory=VQAConfig)
    nlvr: NLVRConfig = field(default_factory=NLVRConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)

    def validate(self) -> None:
        """Check cross-field constraints; raise ValueError naming the offending field."""
        v, t, o = self.vision, self.text, self.objectives
        if v.image_size % v.patch_size:
            raise ConfigError(f"vision.image_size ({v.image_size}) must be a multiple of vision.patch_size ({v.patch_size})")
        if v.width % v.num_heads:
            raise ConfigError(f"vision.width ({v.width}) must be divisible by vision.num_heads ({v.num_heads})")
        if t.hidden_size % t.num_heads:
            raise ConfigError(f"text.hidden_size ({t.hidden_size}) must be divisible by text.num_heads ({t.num_heads})")
        grid = v.image_size // v.patch_size
        # MIM constraints bind only a model that pretrains with MIM (it has the mask token): downstream
        # models (no mask token) run at 384 px, whose 577 image tokens the MIM pass could not position.
        if v.use_mask_token and "mim" in o.losses:
            # The MIM pass feeds image tokens through the text embeddings, which add text positions.
            if 1 + grid * grid > t.max_position_embeddings:
                raise ConfigError(
                    f"vision.image_size {v.image_size} gives {1 + grid * grid} image tokens, more than "
                    f"text.max_position_embeddings ({t.max_position_embeddings}) that the MIM pass can position"
                )
            if o.mim_num_masked > grid * grid:
                raise ConfigError(f"objectives.mim_num_masked ({o.mim_num_masked}) exceeds the {grid * grid} patches")
        if o.mim_min_block > o.mim_num_masked:
            raise ConfigError("objectives.mim_min_block must not exceed objectives.mim_num_masked")
        if not 0 <= o.psl_layer < t.num_layers:
            raise ConfigError(f"objectives.psl_layer must lie in [0, {t.num_layers - 1}] (text.num_layers), got {o.psl_layer}")
        unknown = [name for name in o.losses if name not in LOSS_NAMES]
        if unknown or not o.losses or len(set(o.losses)) != len(o.losses):
            raise ConfigError(f"objectives.losses must be a non-empty list of distinct names from {list(LOSS_NAMES)}, "
                             f"got {o.losses}")
        if o.queue_size < 1 or o.embed_dim < 1:
            raise ConfigError("objectives.queue_size and objectives.embed_dim must be positive")
        if not 0.0 <= o.momentum <= 1.0:
            raise ConfigError(f"objectives.momentum must lie in [0, 1], got {o.momentum}")
        if not 0.0 < o.temp_min <= o.temp <= o.temp_max:
            raise ConfigError("objectives.temp must lie in [objectives.temp_min, objectives.temp_max]")
        for name in ("alpha", "mlm_probability", "mlm_mask_ratio", "mlm_random_ratio", "tokenizer_view_ratio"):
            value = getattr(o, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"objectives.{name} must lie in [0, 1], got {value}")
        layers = self.vqa.decoder_layers
        if layers is not None and not 1 <= layers <= t.num_layers:
            raise ConfigError(f"vqa.decoder_layers must lie in [1, {t.num_layers}] (text.num_layers: its layers are "
                              f"initialised from the encoder's top layers), got {layers}")
        if self.vqa.k_test < 1:
            raise ConfigError(f"vqa.k_test must be >= 1, got {self.vqa.k_test}")
        start = self.nlvr.duplicate_from
        if start is not None and not 0 <= start < t.num_layers:
            raise ConfigError(f"nlvr.duplicate_from must lie in [0, {t.num_layers - 1}] (text.num_layers), got {start}")
        layer = self.explain.gradcam_layer
        if layer is not None and not 0 <= layer < t.num_layers:
            raise ConfigError(f"explain.gradcam_layer must lie in [0, {t.num_layers - 1}] (text.num_layers), got {layer}")

    @property
    def nlvr_duplicate_from(self) -> int:
        """First pretrained layer that the NLVR2 encoder duplicates (nlvr.duplicate_from, default half)."""
        d = self.nlvr.duplicate_from
        return d if d is not None else self.text.num_layers // 2

    @property
    def nlvr_layers(self) -> int:
        """Depth of the NLVR2 encoder: the layers below `nlvr_duplicate_from`, then each later one twice."""
        return 2 * self.text.num_layers - self.nlvr_duplicate_from

    @property
    def decoder_layers(self) -> int:
        """Depth of the VQA answer decoder (vqa.decoder_layers, default the top half of the encoder)."""
        return self.vqa.decoder_layers or max(1, self.text.num_layers // 2)

    @property
    def gradcam_layer(self) -> int:
        """Shared-encoder layer that Grad-CAM explains (explain.gradcam_layer; default 2/3 of the depth, not the last)."""
        layer = self.explain.gradcam_layer
        return layer if layer is not None else max(0, min((2 * self.text.num_layers) // 3, self.text.num_layers - 2))

    @property
    def special_token_ids(self) -> tuple[int, ...]:
        t = self.text
        return (t.pad_token_id, t.unk_token_id, t.cls_token_id, t.sep_token_id, t.mask_token_id)

    @property
    def grid_size(self) -> int:
        return self.vision.image_size // self.vision.patch_size

    @property
    def tokenizer_image_size(self) -> int:
        return int(round(self.vision.image_size * self.objectives.tokenizer_view_ratio))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SimlaConfig":
        """Build from a (possibly partial) nested dict, validating every key and type."""
        config = cls()
        apply_overrides(config, dict(data))
        return config



def config_for_task(config: SimlaConfig, task: str) -> SimlaConfig:
    """A copy of `config` as the model of `task` uses it; `config` itself is never changed.

    Only pretraining with MIM has the ViT mask token (the MIM pass masks patches). Every other model has
    none, so the MIM pass's limits (the 512 text positions that would have to place 577 image tokens at
    384 px) do not bind it: the paper model is valid at 384 px for every task but pretraining.
    """
    adapted = copy.deepcopy(config)
    adapted.vision.use_mask_token = task == "pretrain" and "mim" in adapted.objectives.losses
    return adapted


_SECTIONS = ("vision", "text", "objectives", "vqa", "nlvr", "explain")


def check_type(path: str, annotation: Any, value: Any) -> Any:
    """Return `value` coerced to the annotated type, or raise TypeError naming the field."""
    if isinstance(annotation, str):  # postponed annotations
        annotation = eval(annotation, vars(typing) | {"Literal": Literal, "Any": Any})  # noqa: S307 - our own annotations
    origin = get_origin(annotation)
    if origin is Literal:
        allowed = get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not one of the allowed values {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return check_type(path, option, value)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise TypeError(f"{path}: {value!r} does not match {annotation}")
    if origin is list:
        (item,) = get_args(annotation) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{path}: expected a list, got {value!r}")
        return [value_ if item is Any else check_type(f"{path}[{i}]", item, value_) for i, value_ in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise TypeError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{path}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{path}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the number it plainly is.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise TypeError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{path}: unsupported annotation {annotation}")


def _section_fields(section: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(section)}


def _set_field(section: Any, path: str, name: str, value: Any) -> None:
    fields = _section_fields(section)
    if name not in fields:
        raise KeyError(f"unknown config field {path!r}; allowed fields: {sorted(fields)}")
    setattr(section, name, check_type(path, fields[name].type, value))


def _owner_of(config: SimlaConfig, name: str) -> str:
    owners = [s for s in _SECTIONS if name in _section_fields(getattr(config, s))]
    if not owners:
        allowed = sorted({n for s in _SECTIONS for n in _section_fields(getattr(config, s))} | set(_SECTIONS) | {"name"})
        raise KeyError(f"unknown config field {name!r}; allowed: {allowed}")
    if len(owners) > 1:
        raise KeyError(f"config field {name!r} is ambiguous; write it as one of {[f'{o}.{name}' for o in owners]}")
    return owners[0]


def apply_overrides(config: SimlaConfig, overrides: Mapping[str, Any]) -> SimlaConfig:
    """Apply overrides in place and return the config.

    Keys may be a section with a dict (`vision={"depth": 2}`), a dotted path (`"vision.depth": 2`), or a
    bare field name that belongs to exactly one section (`queue_size=1024`).
    """
    for key, value in overrides.items():
        if key == "name":
            config.name = check_type("name", str, value)
        elif key in _SECTIONS:
            if not isinstance(value, Mapping):
                raise TypeError(f"{key}: expected a mapping of field names to values, got {type(value).__name__}")
            for name, sub_value in value.items():
                _set_field(getattr(config, key), f"{key}.{name}", name, sub_value)
        elif "." in key:
            section, _, name = key.partition(".")
            if section not in _SECTIONS:
                raise KeyError(f"unknown config section {section!r} in {key!r}; allowed: {list(_SECTIONS)}")
            _set_field(getattr(config, section), key, name, value)
        else:
            section = _owner_of(config, key)
            _set_field(getattr(config, section), f"{section}.{key}", key, value)
    return config


def _base() -> SimlaConfig:
    return SimlaConfig(name="simla_base")


def _tiny() -> SimlaConfig:
    """A few million parameters: for tests, demos and CPU smoke runs (not a paper model)."""
    return SimlaConfig(
        name="simla_tiny",
        vision=VisionConfig(image_size=64, patch_size=8, width=128, depth=2, num_heads=2, layer_init_std=0.1),
        text=TextConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512, layer_init_std=0.1),
        objectives=ObjectiveConfig(
            embed_dim=64,
            queue_size=256,
            visual_vocab_size=512,
            mim_num_masked=19,  # ~29% of the 8x8 grid, as 75 of 256 in the paper
            mim_min_block=4,
            psl_layer=1,
        ),
    )


_PRESETS = {"simla_base": _base, "simla_tiny": _tiny}


def list_models() -> list[str]:
    """Names of the model presets accepted by `simla.create_model`."""
    return sorted(_PRESETS)


def get_config(name: str, **overrides: Any) -> SimlaConfig:
    """The preset `name` with `overrides` applied and validated."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown model {name!r}; available: {list_models()}")
    config = apply_overrides(_PRESETS[name](), overrides)
    config.validate()
    return copy.deepcopy(config)
