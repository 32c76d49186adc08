"""Training recipes: typed dataclasses loaded from YAML plus `key=value` overrides.

`TrainingRecipe` holds the fields every training command shares; `PretrainRecipe` extends it here and
each task's fine-tuning recipe extends `simla.train.task_recipe.FinetuneRecipe` (itself a TrainingRecipe).

Everything is validated before any work starts: malformed YAML names the file and line, an unknown or
ill-typed key names the file (or the override) and the field, and the model overrides are checked
against the model config.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import yaml

from ..config import SimlaConfig, apply_overrides, check_type, get_config
from ..data.folders import FolderCaptions
from ..errors import ConfigError


#: The `cpu_allocator` field's help, shared by every recipe (simla.train.cpu_allocator has the details).
CPU_ALLOCATOR_HELP = (
    "CPU malloc: on glibc 'keep' recycles freed activations (faster), 'release' unmaps them (lower peak memory); "
    "'tcmalloc', 'jemalloc', 'mimalloc': the simla command restarts under that library (with grad_checkpointing, "
    "tcmalloc keeps release's memory with far fewer page faults); 'system' leaves malloc alone; auto = a "
    "preloaded malloc if any, else release with grad_checkpointing, else keep")


def field_(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainingRecipe:
    """The fields every training recipe shares (data loading, optimisation, run), declared once.

    `PretrainRecipe` and every task's fine-tuning recipe extend it; a subclass re-declares a field only to
    give it another default or a more specific help text.
    """

    # ---- model and data
    model_config: dict = field_({}, "overrides of the model config, e.g. model_config.queue_size=4096")
    tokenizer: str | None = field_(None, "text tokenizer (dir or hub name); default: the model's own vocabulary")
    trust_pickle: bool = field_(False, "allow unpickling trusted files (reference .pth checkpoints, a DALL-E encoder.pkl)")
    train_file: str | list[str] = field_("", "training annotation file(s)")
    image_root: str | None = field_(None, "directory that relative image paths are joined to")
    num_workers: int = field_(4, "dataloader worker processes")
    randaugment: bool = field_(True, "RandAugment on the training view (reference configuration)")
    crop_scale_min: float = field_(0.2, "smallest crop area fraction of RandomResizedCrop (reference 0.2)")
    max_bad_fraction: float = field_(0.5, "stop when more than this fraction of all samples read so far were bad")
    freeze_vision_encoder: bool = field_(False, "keep the ViT's loaded weights fixed (about half the step time on a "
                                                "small model; the paper trains everything)")
    # ---- optimisation
    batch_size: int = field_(64, "images per process per optimizer micro-step")
    grad_accum_steps: int = field_(1, "micro-batches accumulated per optimizer step")
    epochs: int = field_(30, "epochs (the schedule's length when max_steps is null)")
    max_steps: int | None = field_(None, "stop after this many optimizer steps (also the schedule's length)")
    lr: float = field_(1e-4, "peak learning rate")
    warmup_lr: float = field_(1e-5, "learning rate at step 0")
    min_lr: float = field_(1e-5, "learning rate at the end of the cosine")
    warmup_steps: int = field_(2000, "linear warm-up length in optimizer steps (reference: 20 'epochs' of 100 iterations)")
    lr_schedule: Literal["cosine", "reference"] = field_("cosine", "'cosine': per-step warmup+cosine; 'reference': the authors' staircase")
    weight_decay: float = field_(0.02, "AdamW weight decay (not on biases, norms, position embeddings, tokens, temperature)")
    grad_clip: float | None = field_(None, "clip the gradient norm to this value (null: no clipping, as the reference)")
    alpha_warmup: bool = field_(True, "ramp distillation alpha from 0 over the first epoch")
    precision: Literal["fp32", "bf16"] = field_("fp32", "fp32, or bf16 autocast")
    grad_checkpointing: bool = field_(False, "recompute activations in the backward pass to save memory")
    compile: bool = field_(False, "torch.compile every ViT block and encoder layer (the first steps compile; "
                                  "measured no faster on a 2-core CPU, where matrix products dominate)")
    cpu_allocator: Literal["auto", "keep", "release", "tcmalloc", "jemalloc", "mimalloc", "system"] = field_(
        "auto", CPU_ALLOCATOR_HELP)
    # ---- run
    output_dir: str = field_("runs/pretrain", "run folder: config, log.jsonl, checkpoints/, tensorboard/")
    save_every: int = field_(1000, "write checkpoints/last.pt every N optimizer steps (and at the end)")
    log_every: int = field_(50, "append a line to log.jsonl every N optimizer steps")
    seed: int = field_(42, "random seed (each rank adds its rank)")
    resume: str | None = field_(None, "'auto' = continue from output_dir/checkpoints/last.pt if present, or a checkpoint path")
    tensorboard: bool = field_(False, "also write TensorBoard events")
    device: str = field_("auto", "'auto' (cuda if available), 'cpu' or 'cuda'")
    progress: bool = field_(True, "show a progress bar")

    #: The task this recipe trains (its progress-bar label, the command named in errors).
    TASK: ClassVar[str] = ""
    #: The stream of the data order's random draws (`derive_seed(seed, SEED_STREAM)`): each task has its own,
    #: and tasks that share a recipe base (grounding and retrieval; NLVR2 and SNLI-VE) share it.
    SEED_STREAM: ClassVar[int] = 0
    #: Integer fields that must be >= 1; each subclass lists only its own (they add up along the classes).
    POSITIVE_FIELDS: ClassVar[tuple[str, ...]] = ("batch_size", "grad_accum_steps", "epochs", "save_every", "log_every")

    @classmethod
    def command(cls) -> str:
        """The `simla` command that runs this recipe."""
        return "simla pretrain" if cls.TASK == "pretrain" else f"simla finetune {cls.TASK}"

    def validate(self) -> None:
        if not self.train_file:
            raise ValueError("train_file: required (an annotation file, a list of them, or a shard pattern)")
        positive = [name for cls in reversed(type(self).__mro__) for name in vars(cls).get("POSITIVE_FIELDS", ())]
        for name in dict.fromkeys(positive):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError("num_workers: must be >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps: must be >= 1 or null")
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError("crop_scale_min: must lie in (0, 1]")
        if not 0 < self.max_bad_fraction <= 1:
            raise ValueError("max_bad_fraction: must lie in (0, 1]")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device: expected auto, cpu or cuda, got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PretrainRecipe(TrainingRecipe):
    # ---- model
    model: str = field_("simla_base", "model preset (simla list_models)")
    text_encoder: str | None = field_("bert-base-uncased", "Hugging Face BERT (dir or hub name) initialising the shared encoder; null = random")
    vision_encoder: str | None = field_("deit_base_patch16_224", "DeiT/timm weights for the ViT (file, timm name or URL); null = random")
    tokenizer: str | None = field_(None, "text tokenizer (dir or hub name); default: the text_encoder's vocabulary")
    visual_tokenizer: str = field_("kmeans", "MIM targets: 'kmeans' (fit a built-in codebook on training images), 'kmeans:PATH' or 'dalle:PATH'")
    kmeans_fit_images: int = field_(2000, "training images sampled to fit the built-in k-means visual tokenizer")
    trust_pickle: bool = field_(False, "allow unpickling a DALL-E encoder.pkl (trusted files only)")
    # ---- data
    train_file: str | list[str] = field_("", "JSON/JSONL/CSV/TSV annotation file(s), image folder(s) (docs/data.md), or a "
                                             "WebDataset shard pattern (data/{00000..00099}.tar)")
    caption_line: int | None = field_(0, "image folders: which non-empty line of an image's sidecar .txt is its caption "
                                         "(0 = first; null = every line is one caption of the image)")
    caption_language: str | None = field_(None, "image folders: take the sidecar's '<lang>.utf8=' line (Tux Paint), e.g. "
                                                "fr; images without one fall back to caption_line")
    caption_from_path: str | None = field_(None, "image folders: caption images without a sidecar from their file 'name' "
                                                 "or their 'path' (folders + name); null = leave them out")
    metadata_column: str = field_("text", "image folders: the caption column of an imagefolder metadata.jsonl/.csv")
    csv_image_key: str = field_("filepath", "CSV/TSV column holding the image path")
    csv_caption_key: str = field_("title", "CSV/TSV column holding the caption")
    samples_per_epoch: int | None = field_(None, "WebDataset only: samples per epoch (counted from the shards when null)")
    shuffle_buffer: int = field_(1000, "WebDataset only: shuffle buffer size per worker")
    shared_geometry: bool = field_(True, "MIM views share one crop/flip; false = reference's independent views")

    TASK: ClassVar[str] = "pretrain"
    SEED_STREAM: ClassVar[int] = 7
    POSITIVE_FIELDS: ClassVar[tuple[str, ...]] = ("shuffle_buffer",)

    def validate(self) -> None:
        super().validate()
        self.folder_captions()
        vt = self.visual_tokenizer
        if vt != "kmeans" and not vt.startswith(("kmeans:", "dalle:")):
            raise ValueError(f"visual_tokenizer: expected 'kmeans', 'kmeans:PATH' or 'dalle:PATH', got {vt!r}")
        try:
            config = get_config(self.model, **self.model_config)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"model / model_config: {err}") from err
        if "itm" in config.objectives.losses and self.batch_size < 2:
            raise ValueError(f"batch_size: must be >= 2 with ITM (it draws each pair's negatives from the other "
                             f"pairs of the batch), got {self.batch_size}")


    def folder_captions(self) -> FolderCaptions:
        """How captions are found in image folders given as train_file (checked by validate)."""
        if self.caption_from_path not in (None, "name", "path"):
            raise ValueError(f"caption_from_path: expected null, 'name' or 'path', got {self.caption_from_path!r}")
        if self.caption_line is not None and self.caption_line < 0:
            raise ValueError(f"caption_line: must be >= 0 or null, got {self.caption_line}")
        try:
            return FolderCaptions(line=self.caption_line, language=self.caption_language,
                                  from_path=self.caption_from_path, metadata_column=self.metadata_column)
        except ValueError as err:
            raise ValueError(f"caption_language / metadata_column: {err}") from err


def check_model_overrides(overrides: dict[str, Any]) -> None:
    """Fail now, naming the field, when `model_config` overrides name no config field or have the wrong type
    (a fine-tuning recipe's model comes from its checkpoint, so only names and types can be checked early)."""
    try:
        apply_overrides(SimlaConfig(), overrides)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"model_config: {err.args[0] if isinstance(err, KeyError) else err}") from err


def _set(recipe: Any, key: str, value: Any, where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(recipe)}
    name, _, sub = key.partition(".")
    if name not in fields:
        close = [n for n in fields if n.split("_")[0] == name.split("_")[0]]
        hint = f" (did you mean {close}?)" if close else ""
        raise ValueError(f"{where}: unknown key {key!r}{hint}; see `{type(recipe).command()} --help` for the fields")
    if sub:
        if name != "model_config":
            raise ValueError(f"{where}: {name!r} has no sub-keys (got {key!r})")
        recipe.model_config[sub] = value
        return
    try:
        setattr(recipe, name, check_type(name, fields[name].type, value))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from err


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with the value parsed as YAML (so numbers, booleans, null and lists work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"override {text!r}: expected key=value")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ValueError(f"override {text!r}: value is not valid YAML ({err})") from err


def load_recipe(path: str | os.PathLike | None, overrides: Sequence[str] = (), cls: type = PretrainRecipe) -> Any:
    """Read the YAML recipe (if any), apply `key=value` overrides, validate. Nothing else happens.

    Raises ConfigError (a ValueError) naming the file or override and the field, or FileNotFoundError.
    """
    try:
        return _load_recipe(path, overrides, cls)
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(err.args[0] if isinstance(err, KeyError) and err.args else str(err)) from err


def _load_recipe(path: str | os.PathLike | None, overrides: Sequence[str], cls: type) -> Any:
    recipe = cls()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such recipe: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ValueError(f"{path}: malformed YAML{where}: {getattr(err, 'problem', err)}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the recipe must be a mapping of field names to values")
        for key, value in data.items():
            if key == "model_config" and isinstance(value, dict):
                for sub, sub_value in value.items():
                    _set(recipe, f"model_config.{sub}", sub_value, f"{path}: model_config")
            elif key == "trust_pickle" and value is not False:
                raise ConfigError(
                    f"{path}: field 'trust_pickle' is {value!r}; a recipe file may not trust pickled code (a shared or "
                    "downloaded recipe would run its payload unasked). Expected false or no such field: pass "
                    "--trust-pickle on the command line (or set SIMLA_TRUST_PICKLE=1) to trust the files it names")
            else:
                _set(recipe, str(key), value, str(path))
    for text in overrides:
        key, value = parse_override(text)
        _set(recipe, key, value, f"override {text!r}")
    recipe.validate()
    return recipe


def recipe_help(cls: type = PretrainRecipe) -> str:
    """One line per field with its default, for `simla pretrain --help`."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"  {f.name} = {default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
