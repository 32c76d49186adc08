"""NLVR2: is a sentence true of a PAIR of images? The encoder is deepened so its layers alternate images.

The ViT runs once over both images (stacked along the batch). The shared encoder is deepened as the
reference does: pretrained layers below `d = nlvr.duplicate_from` keep their place and every later layer n
is duplicated into layers 2(n - d) + d and 2(n - d) + d + 1 (the paper: 12 -> 18 layers, 6 -> 6, 7 ... 11 ->
16, 17). Layer l cross-attends to image l mod 2, and each duplicated pair shares ONE cross-attention key and
value projection (the same parameters, not two copies kept equal), so both images are read through the same
keys and values.

Two stages: text assignment (`SimlaForNLVRTextAssignment`, on image-caption pairs: does the caption belong to
the left image, the right image, or neither?) and fine-tuning (`SimlaForNLVR`, a 2-way head on the
multimodal [CLS], with momentum distillation).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import SimlaConfig
from .bert import SharedEncoder
from .classification import SimlaClassifier
from .outputs import ClassificationOutput
from .simla import SimlaBackbone

_LAYER_KEY = re.compile(r"^(text_encoder(?:_m)?\.(?:bert\.)?encoder\.layer\.)(\d+)\.(.+)$")
_TIED = ("crossattention.self.key.", "crossattention.self.value.")


def deepened_index(layer: int, duplicate_from: int) -> tuple[int, ...]:
    """Where pretrained layer `layer` goes in the deepened encoder."""
    if layer < duplicate_from:
        return (layer,)
    first = 2 * (layer - duplicate_from) + duplicate_from
    return first, first + 1


def tied_pairs(config: SimlaConfig) -> list[tuple[int, int]]:
    """(layer, twin) pairs of the deepened encoder that share cross-attention keys and values."""
    d = config.nlvr_duplicate_from
    return [(d + 2 * i, d + 2 * i + 1) for i in range(config.text.num_layers - d)]


def deepen_encoder_state(state: Mapping[str, Tensor], config: SimlaConfig) -> dict[str, Tensor]:
    """A pretraining state dict with its encoder layers copied to their deepened places (our names or the
    reference's). A state whose encoder is already deep (a text-assignment or NLVR2 checkpoint) is
    returned unchanged."""
    layers = {int(m.group(2)) for key in state if (m := _LAYER_KEY.match(key))}
    if not layers or max(layers) + 1 != config.text.num_layers:
        return dict(state)
    out = {}
    for key, tensor in state.items():
        m = _LAYER_KEY.match(key)
        if m is None:
            out[key] = tensor
            continue
        for index in deepened_index(int(m.group(2)), config.nlvr_duplicate_from):
            out[f"{m.group(1)}{index}.{m.group(3)}"] = tensor
    return out


def fill_tied_keys(state: Mapping[str, Tensor], config: SimlaConfig) -> dict[str, Tensor]:
    """Add a tied twin's key/value tensors where a file lists them once (safetensors refuses aliases)."""
    out = dict(state)
    for key, tensor in state.items():
        m = _LAYER_KEY.match(key)
        if m is None or not m.group(3).startswith(_TIED):
            continue
        for first, twin in tied_pairs(config):
            if int(m.group(2)) == first:
                out.setdefault(f"{m.group(1)}{twin}.{m.group(3)}", tensor)
    return out


def tie_cross_attention(encoder: SharedEncoder, pairs: list[tuple[int, int]]) -> None:
    """Make each twin layer use its partner's cross-attention key and value projections (one module)."""
    for first, twin in pairs:
        source, target = encoder.layers[first].crossattention.self, encoder.layers[twin].crossattention.self
        target.key, target.value = source.key, source.value


class _DeepEncoderMixin:
    """The deepened, tied encoder and the checkpoint hooks both NLVR2 stages share."""

    config: SimlaConfig
    text_encoder: SharedEncoder

    def _tie(self) -> None:
        tie_cross_attention(self.text_encoder, tied_pairs(self.config))

    def prepare_source_state(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return fill_tied_keys(deepen_encoder_state(state, self.config), self.config)

    def read_pair(self, encoder: SharedEncoder, ids: Tensor, mask: Tensor, left: Tensor, right: Tensor) -> Tensor:
        """[CLS] state of the text over two images: layer l cross-attends to image l mod 2."""
        return encoder(ids, mask, mode="multimodal", encoder_hidden_states=[left, right])[:, 0]


class SimlaForNLVR(_DeepEncoderMixin, SimlaClassifier):
    """NLVR2 fine-tuning: a 2-way head (False 0, True 1) on the [CLS] of a sentence over two images.

    Batch: image0, image1 (B, 3, R, R); text_ids, text_mask (B, L); label (B,) 1 = "True".
    """

    TASK = "nlvr"
    CLASSES = ("False", "True")
    BATCH_KEYS = ("image0", "image1", "text_ids", "text_mask", "label")
    IGNORED_SOURCE_PREFIXES = SimlaClassifier.IGNORED_SOURCE_PREFIXES + ("ta_head",)

    def __init__(self, config: SimlaConfig) -> None:
        super().__init__(config, text_layers=config.nlvr_layers)

    def _prepare_encoder(self) -> None:
        self._tie()  # before the momentum copy is made: a deep copy keeps the ties

    def fused_cls(self, batch: Mapping[str, Tensor], momentum: bool = False) -> Tensor:
        vision = self.visual_encoder_m if momentum else self.visual_encoder
        encoder = self.text_encoder_m if momentum else self.text_encoder
        images = vision(torch.cat([batch["image0"], batch["image1"]]))  # one ViT pass over both images
        left, right = images.chunk(2)
        return self.read_pair(encoder, batch["text_ids"], batch["text_mask"], left, right)


def sample_text_assignment(weights: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(left, right, label) image indices for each caption b, drawn in one vectorised call.

    weights (B, B): how likely image j is drawn as a negative for caption b (diagonal zero). With
    probability 1/3 each: (b, j) label 0 (the caption belongs to the left image), (j, b) label 1 (the right
    image), (j, k) label 2 (neither), with j != k drawn without replacement.
    """
    batch = weights.shape[0]
    if batch < 3:
        raise ValueError(f"text assignment needs at least 3 images per batch (two negatives per caption), got {batch}")
    device = weights.device
    negatives = torch.multinomial(weights, 2, replacement=False, generator=generator)
    labels = torch.randint(0, 3, (batch,), device=device, generator=generator)
    own = torch.arange(batch, device=device)
    left = torch.where(labels == 0, own, negatives[:, 0])
    right = torch.where(labels == 0, negatives[:, 0], torch.where(labels == 1, own, negatives[:, 1]))
    return left, right, labels


def _without_same_captions(weights: Tensor, text_ids: Tensor) -> Tensor:
    """Zero the weight of every image whose caption is identical to the row's own: shown as a negative, it
    would make the label wrong (the caption is as true of it). Rows left with fewer than two other images
    keep their weights."""
    same = (text_ids[:, None, :] == text_ids[None, :, :]).all(-1)
    kept = weights.masked_fill(same, 0)
    enough = (kept > 0).sum(1, keepdim=True) >= 2
    return torch.where(enough, kept, weights)


class SimlaForNLVRTextAssignment(_DeepEncoderMixin, SimlaBackbone):
    """The text-assignment stage: does a caption belong to the left image, the right image, or neither?

    Batch: image (B, 3, R, R), text_ids, text_mask (B, L), caption b belonging to image b. Negatives are drawn
    by image similarity (the frozen ITC image projection, temperature `nlvr.ta_temperature`); with
    `objectives.duplicate_captions: positives` an image whose caption is the same text is never drawn as a
    negative. `ta_head` reads the text [CLS] after the multimodal pass over the two images.
    """

    TASK = "nlvr-ta"
    IGNORED_SOURCE_PREFIXES = SimlaBackbone.IGNORED_SOURCE_PREFIXES + (
        "text_proj", "itm_head", "temp", "mlm_head_m", "cls_head",
    )
    NEW_HEAD_PREFIXES = ("ta_head",)

    def __init__(self, config: SimlaConfig) -> None:
        super().__init__(config, text_layers=config.nlvr_layers)
        self._tie()
        self.vision_proj = nn.Linear(self.config.vision.width, self.config.objectives.embed_dim)
        self.vision_proj.requires_grad_(False)  # only ranks negatives (under no_grad), as the reference
        self.ta_head = nn.Linear(self.config.text.hidden_size, 3)

    def forward(self, batch: Mapping[str, Tensor], alpha: float | None = None) -> ClassificationOutput:
        image_embeds = self.visual_encoder(batch["image"])
        with torch.no_grad():
            features = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
            weights = F.softmax(features @ features.t() / self.config.nlvr.ta_temperature, dim=1)
            weights.fill_diagonal_(0)
            if self.config.objectives.duplicate_captions == "positives":
                weights = _without_same_captions(weights, batch["text_ids"])
            left, right, labels = sample_text_assignment(weights)
        cls = self.read_pair(self.text_encoder, batch["text_ids"], batch["text_mask"], image_embeds[left],
                             image_embeds[right])
        logits = self.ta_head(cls)
        return ClassificationOutput({"ta": F.cross_entropy(logits, labels)}, labels=labels, logits=logits.detach())
