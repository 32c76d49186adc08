"""Our checkpoints, safetensors exports, and the import of reference SIMLA/ALBEF checkpoints.

Three forms load:
- our `.pt` file: {"format": "simla", "config": dict, "task": str, "model": state_dict}, read with
  `weights_only=True`;
- an exported directory: `model.safetensors` + `config.json`;
- a reference `.pth` ({"model": state_dict, "config": <pickled OmegaConf>, ...}). Its pickled config needs
  arbitrary unpickling, so it is refused unless the caller passes `trust_pickle=True`.
Nothing is dropped silently: every missing or unexpected key and every shape mismatch is reported, and a
strict load raises on any of them. Reading the files themselves (damage and trust checks) lives in
`simla.checkpoint_files`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

# Reading files, and the errors it raises, are re-exported: callers import them from here.
from .atomic_write import write_atomically
from .checkpoint_files import (  # noqa: F401
    FORMAT, CorruptCheckpointError, NotACheckpointError, UntrustedCheckpointError, read_checkpoint,
)
from .config import SimlaConfig, apply_overrides, config_for_task
from .errors import CheckpointError
from .load_report import LoadReport
from .models.momentum import is_teacher_key, online_name, teacher_name
from .models.registry import build_model, canonical_task
from .models.simla import SimlaBackbone
from .models.vision import resample_pos_embed

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------- reports
# Every weight import reports with the one `LoadReport`; `ImportReport` is its former name, kept for callers.
ImportReport = LoadReport


def is_reference_state(state: dict[str, Tensor]) -> bool:
    """Reference layouts keep the text encoder under `.bert.` or have no `mlm_head` of ours."""
    return any(k.startswith(("text_encoder.bert.", "text_encoder.cls.", "text_decoder.bert.")) for k in state) or (
        "text_encoder.embeddings.position_ids" in state
    )


# ---------------------------------------------------------------------------- reference key map
_TEXT_PREFIX = re.compile(r"^(text_(?:en|de)coder(?:_m)?)\.")
# The LM head of each reference text module, in our names: the encoder's MLM head, the VQA decoder's head.
_HEAD_OF = {"text_encoder": "mlm_head", "text_decoder": "answer_head"}


def map_reference_key(key: str) -> str | None:
    """Our name for a reference key, or None for keys with no counterpart by design.

    `text_encoder.bert.X` -> `text_encoder.X`; `text_encoder.cls.predictions.X` -> `mlm_head.X` (the VQA
    decoder likewise: `text_decoder.bert.X` -> `text_decoder.X`, `text_decoder.cls.predictions.X` -> `answer_head.X`);
    the tied decoder weight/bias (same tensors as the word embeddings / head bias) and the
    `position_ids` buffer have no counterpart. Everything else keeps its name.
    """
    match = _TEXT_PREFIX.match(key)
    if not match:
        return key
    owner, rest = match.group(1), key[match.end():]
    teacher = is_teacher_key(owner)
    rest = rest.removeprefix("bert.")
    if rest.startswith("cls.predictions."):
        rest = rest.removeprefix("cls.predictions.")
        if rest.startswith("decoder."):
            return None
        head = _HEAD_OF[online_name(owner)]
        return f"{teacher_name(head) if teacher else head}.{rest}"
    if rest == "embeddings.position_ids":
        return None
    return f"{owner}.{rest}"


def convert_reference_state(
    state: dict[str, Tensor], model: SimlaBackbone, source: str = "reference checkpoint"
) -> tuple[dict[str, Tensor], LoadReport]:
    """Rename reference keys to ours and adapt shapes; returns the new state dict and the report.

    - position embeddings of the ViTs are resampled (bicubic) to the model's grid;
    - the token-type table, absent from SIMLA checkpoints, is zero-filled so type 0 adds nothing;
    - the tied MLM decoder is checked to be the word embedding, as the reference ties them;
    - any other shape mismatch is listed in `report.mismatched` and left out of the returned state, so
      the caller decides: a strict load raises, a non-strict one keeps the model's fresh tensor.
    """
    report = LoadReport(source)
    ours = model.state_dict()
    converted: dict[str, Tensor] = {}
    mismatched: set[str] = set()
    for key, tensor in state.items():
        name = map_reference_key(key)
        if name is None:
            report.ignored.append(key)
            continue
        if name not in ours:
            report.unexpected.append(key)
            continue
        target = ours[name]
        if name.endswith("pos_embed") and tensor.shape != target.shape and tensor.dim() == 3:
            grid = int(round((target.shape[1] - 1) ** 0.5))
            tensor = resample_pos_embed(tensor, grid)
            report.resampled.append(key)
        if tensor.shape != target.shape:
            report.mismatched.append(f"{key} -> {name}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}")
            mismatched.add(name)
            continue
        converted[name] = tensor
    for name in ours:
        if name in converted or name in mismatched:  # a mismatched tensor is reported once, not also as missing
            continue
        if name.endswith("embeddings.token_type_embeddings.weight"):
            converted[name] = torch.zeros_like(ours[name])
            report.zero_filled.append(name)
        else:
            report.missing.append(name)
    return converted, report


# ------------------------------------------------------------------------------------ loading
def _deliberately_absent(model: SimlaBackbone, name: str) -> bool:
    return name.startswith(model.ignored_source_prefixes())


def load_state_into(
    model: SimlaBackbone, state: dict[str, Tensor], *, source: str, strict: bool = True
) -> LoadReport:
    """Load our-format or reference-format weights into `model`, raising on any mismatch when strict.

    strict=False loads every tensor that fits and keeps the model's own tensor for each missing key and
    each shape mismatch; all of them are listed in the returned report (and logged). Tensors of other
    task models that this model lacks by design (e.g. the MIM head when loading a pretraining checkpoint
    for retrieval) are reported as ignored. Training state the file lacks
    (queues, momentum teachers) is rebuilt: queues stay fresh, teachers copy the loaded weights.
    A task model may derive tensors from the source first (`prepare_source_state`: the VQA decoder is
    initialised from the pretrained encoder's top layers).
    """
    state = model.prepare_source_state(state)
    if is_reference_state(state):
        converted, report = convert_reference_state(state, model, source)
        unexpected = [(key, map_reference_key(key) or key) for key in report.unexpected]
    else:
        report = LoadReport(source)
        ours = model.state_dict()
        unexpected = [(k, k) for k in state if k not in ours]
        report.missing = [k for k in ours if k not in state]
        converted = {}
        for key, tensor in state.items():
            if key not in ours:
                continue
            if key.endswith("pos_embed") and tensor.shape != ours[key].shape and tensor.dim() == 3:
                tensor = resample_pos_embed(tensor, int(round((ours[key].shape[1] - 1) ** 0.5)))
                report.resampled.append(key)
            if tensor.shape != ours[key].shape:
                report.mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(ours[key].shape)}")
                continue
            converted[key] = tensor
    report.unexpected = [key for key, name in unexpected if not _deliberately_absent(model, name)]
    report.ignored += [key for key, name in unexpected if _deliberately_absent(model, name)]
    report.rebuilt = [k for k in report.missing if _is_training_state(k)]
    report.missing = [k for k in report.missing if not _is_training_state(k)]
    heads = model.NEW_HEAD_PREFIXES
    if heads and not any(k.startswith(heads) for k in converted):  # the file has no head of this task at all
        report.new_head = [k for k in report.missing if k.startswith(heads)]
        report.missing = [k for k in report.missing if not k.startswith(heads)]
    if strict and not report.ok:
        raise CheckpointError(f"strict load failed, nothing was loaded (pass strict=False to load the rest and keep "
                              f"fresh weights for what is listed)\n{report}")
    if report.mismatched:
        logger.warning("%s: %d tensor(s) of another shape keep the model's fresh weights:\n  %s", source,
                       len(report.mismatched), "\n  ".join(report.mismatched))
    model.load_state_dict(converted, strict=False)
    if any(is_teacher_key(k) for k in report.rebuilt):
        model.copy_params_to_momentum()  # teachers start from the loaded online weights, not fresh ones
    logger.info("%s", report)
    return report


def load_weights_into(model: SimlaBackbone, path: str | os.PathLike, *, trust_pickle: bool = False,
                      strict: bool = True) -> LoadReport:
    data = read_checkpoint(path, trust_pickle=trust_pickle)
    return load_state_into(model, data["model"], source=str(path), strict=strict)


#: Paper fractions of the 16x16 pretraining grid: 75 masked patches, blocks of at least 16.
_MIM_MASKED_FRACTION, _MIM_MIN_BLOCK_FRACTION = 75 / 256, 16 / 256


def infer_reference_config(state: dict[str, Tensor], head_dim: int = 64) -> SimlaConfig:
    """A config matching a reference state dict's shapes (not yet validated: the caller validates it as the
    task's model will use it, see `config_for_task`).

    The weights determine every width, depth and vocabulary size, the image resolution and patch size,
    the queue size, the presence of the mask token and the MIM codebook size. They cannot tell:
    - head counts (attention weights are (width, width) whatever the split): we assume `head_dim`-wide heads
      (64, as ViT-B/16 and BERT-base, so 12 heads at width 768);
    - the MIM mask budget: we keep the paper's fraction of the grid (75 of 256 patches, blocks of >= 16);
    - the PSL layer: the last layer, as the paper.
    These assumptions are logged; pass overrides to `load_checkpoint` (e.g. `**{"text.num_heads": 8}`) to
    change them.
    """
    def shape(key: str) -> tuple[int, ...]:
        return tuple(state[key].shape)

    config = SimlaConfig(name="reference")
    v, t, o = config.vision, config.text, config.objectives
    v.width = shape("visual_encoder.patch_embed.proj.weight")[0]
    v.patch_size = shape("visual_encoder.patch_embed.proj.weight")[-1]
    v.image_size = int(round((shape("visual_encoder.pos_embed")[1] - 1) ** 0.5)) * v.patch_size
    v.depth = len({k.split(".")[2] for k in state if k.startswith("visual_encoder.blocks.")})
    v.num_heads = max(1, v.width // head_dim)
    v.use_mask_token = "visual_encoder.mask_token" in state
    text_prefix = "text_encoder.bert." if "text_encoder.bert.embeddings.word_embeddings.weight" in state else "text_encoder."
    t.vocab_size, t.hidden_size = shape(text_prefix + "embeddings.word_embeddings.weight")
    t.max_position_embeddings = shape(text_prefix + "embeddings.position_embeddings.weight")[0]
    t.num_layers = len({k[len(text_prefix):].split(".")[2] for k in state if k.startswith(text_prefix + "encoder.layer.")})
    t.intermediate_size = shape(text_prefix + "encoder.layer.0.intermediate.dense.weight")[0]
    t.num_heads = max(1, t.hidden_size // head_dim)
    types = text_prefix + "embeddings.token_type_embeddings.weight"
    if types in state:
        t.type_vocab_size = shape(types)[0]  # ALBEF has a table; SIMLA files have none (imported as zeros)
    if "vision_proj.weight" in state:  # absent from NLVR2, SNLI-VE and VQA checkpoints
        o.embed_dim = shape("vision_proj.weight")[0]
    if "image_queue" in state:
        o.queue_size = shape("image_queue")[1]
    if "mim_head.weight" in state:
        o.visual_vocab_size = shape("mim_head.weight")[0]
    o.psl_layer = t.num_layers - 1
    decoder_layers = {k.split(".")[4] for k in state if k.startswith("text_decoder.bert.encoder.layer.")}
    if decoder_layers:
        config.vqa.decoder_layers = len(decoder_layers)  # a reference VQA checkpoint
    two_way = "cls_head.2.weight" in state and shape("cls_head.2.weight")[0] == 2
    if two_way or "ta_head.weight" in state:
        # A reference NLVR2 (or text-assignment) encoder is already deepened: 18 = 12 + 6 duplicated layers.
        deep = t.num_layers
        t.num_layers = round(deep * 2 / 3)
        config.nlvr.duplicate_from = 2 * t.num_layers - deep
        o.psl_layer = t.num_layers - 1
    patches = (v.image_size // v.patch_size) ** 2
    o.mim_num_masked = max(1, round(_MIM_MASKED_FRACTION * patches))
    o.mim_min_block = max(1, min(o.mim_num_masked, round(_MIM_MIN_BLOCK_FRACTION * patches)))
    logger.warning(
        "config inferred from the weights; assumed (not stored in the file): %d vision and %d text heads "
        "(%d-wide), MIM masks %d of %d patches in blocks of >= %d, PSL layer %d",
        v.num_heads, t.num_heads, head_dim, o.mim_num_masked, patches, o.mim_min_block, o.psl_layer)
    return config


def load_checkpoint(path: str | os.PathLike, *, task: str | None = None, trust_pickle: bool = False,
                    strict: bool = True, **overrides: Any) -> SimlaBackbone:
    """Build and load a model from any supported checkpoint form (ours, export dir, or reference .pth).

    `task` picks the model class ("pretrain", "retrieval", "vqa", "base"; default: the checkpoint's own);
    `overrides` change the config first, e.g. `image_size=384` (position embeddings are resampled).
    """
    data = read_checkpoint(path, trust_pickle=trust_pickle)
    return model_from_checkpoint(data, source=str(path), task=task, strict=strict, **overrides)


def model_from_checkpoint(data: dict[str, Any], *, source: str, task: str | None = None, strict: bool = True,
                          **overrides: Any) -> SimlaBackbone:
    """`load_checkpoint` for a file already read with `read_checkpoint` (whose other entries, e.g. the
    training recipe, the caller may want too)."""
    state = data["model"]
    if data.get("format") == FORMAT:
        config = SimlaConfig.from_dict(data["config"])
        task = task or data.get("task", "pretrain")
    else:
        config = infer_reference_config(state)
        has_pretrain_heads = any(k.startswith(("mim_head.", "concept_head.")) for k in state)
        task = task or ("pretrain" if has_pretrain_heads and config.vision.use_mask_token else "base")
    apply_overrides(config, overrides)
    # Validated as the task's model uses it: a downstream model has no mask token, so the MIM pass's limits
    # (e.g. 512 positions for the image tokens) do not bind it and a pretraining checkpoint loads at 384 px.
    config_for_task(config, canonical_task(task)).validate()
    model = build_model(config, task)
    load_state_into(model, state, source=source, strict=strict)
    return model


# ------------------------------------------------------------------------------------- saving
def _task_of(model: SimlaBackbone) -> str:
    return model.TASK


def save_checkpoint(model: SimlaBackbone, path: str | os.PathLike, **extra: Any) -> Path:
    """Write our checkpoint atomically (temporary file, then rename), loadable with weights_only=True.

    On failure the temporary file is removed and `path` keeps its previous version; a full disk raises
    DiskFullError (an OSError, errno ENOSPC) saying so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "task": _task_of(model),
               "config": model.config.to_dict(), "model": model.state_dict(), **extra}
    return write_atomically(path, lambda tmp: torch.save(payload, tmp))


def save_pretrained(model: SimlaBackbone, directory: str | os.PathLike, include_momentum: bool = False) -> Path:
    """Release form: `model.safetensors` + `config.json`. Momentum copies and queues are
    training state and are left out unless asked for."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if not include_momentum:
        state = {k: v for k, v in state.items() if not _is_training_state(k)}
    tensors = {k: v.contiguous() for k, v in _without_aliases(state).items()}
    write_atomically(directory / "model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "task": _task_of(model), "config": model.config.to_dict(),
            "includes_momentum": include_momentum}
    text = json.dumps(meta, indent=2)
    write_atomically(directory / "config.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return directory


def _without_aliases(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """One name per tensor: safetensors refuses aliases (NLVR2's tied cross-attention keys/values appear under
    two layers); the model re-ties the twin on load."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    kept = {}
    for key, tensor in state.items():
        identity = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and identity in seen:
            continue
        seen.add(identity)
        kept[key] = tensor
    return kept


def _is_training_state(key: str) -> bool:
    head = key.split(".", 1)[0]
    return is_teacher_key(head) or head in ("image_queue", "text_queue", "queue_ptr", "idx_queue", "caption_queue")
