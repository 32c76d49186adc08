"""The SIMLA pretraining module: one forward returns the five named losses.

Order of work in one step, reusing every encoder pass that can be reused:
  MLM masks drawn, ONE word-embedding lookup for the captions and the masked captions
  -> online ViT (plain) -> text mode -> [EMA update] momentum ViT (plain) + momentum text mode -> ITC
  -> ITM hard negatives drawn -> ONE multimodal student pass over the ITM captions
  (positives and both kinds of negatives) and the masked captions, each image's cross-attention
  keys/values projected once -> ONE teacher pass over the masked captions (MLM targets) and the captions
  (PSL's [CLS] votes) -> MIM (masked ViT, image tokens as queries over the text embeddings)
  -> PSL (concept head on the image feature) -> enqueue the momentum features.
The reference runs 4 ViT and 9 encoder passes and projects an image's keys/values once per caption that
attends to it; `pretrain_reference.ReferencePretraining` keeps that layout (as the benchmark baseline; the
task registry builds it for a config with `objectives.execution = "reference"`). With alpha = 0 simla's execution also skips the
teacher work that only feeds distillation. The MLM/MIM vocabulary heads run only on the masked positions
instead of every position.

`forward` is that order as named steps over one `_Step` (the plan, built once, and the tensors the steps
hand on); the loss functions themselves are the pure functions of `simla.objectives`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import objectives
from ..config import LOSS_NAMES, SimlaConfig
from ..distributed import all_gather_no_grad
from .bert import MLMHead, SharedEncoder
from .momentum import momentum_update, teacher_name, write_to_queue
from .outputs import PretrainOutput
from .simla import SimlaModel

BATCH_KEYS = ("image", "text_ids", "text_mask", "patch_mask", "visual_tokens")


__all__ = ["BATCH_KEYS", "LOSS_NAMES", "PretrainOutput", "SimlaForPretraining"]


class SimlaForPretraining(SimlaModel):
    """SimlaModel + MLM/MIM/PSL heads, momentum teachers and ITC queues.

    Batch (a mapping):
      image          (B, 3, R, R) normalised encoder view
      text_ids       (B, L) caption ids in the reference form ([CLS] wordpieces, no [SEP], [PAD]=0)
      text_mask      (B, L) 1 on real tokens
      patch_mask     (B, G*G) bool block mask of the MIM patches (row-major)      [MIM only]
      visual_tokens  (B, G*G) long visual-tokenizer ids of the tokenizer view     [MIM only]

    `config.objectives.losses` selects the objectives. A left-out one is not computed at all: its head and
    teacher head are not built, and the passes only it needs do not run (MIM: no masked ViT passes and no
    mask token; ITC: no momentum text pass and no queue writes; MLM: no masked-caption passes; PSL: no
    keyword-voting pass).
    """

    TASK = "pretrain"  # the name create_model/load_checkpoint use for this class
    IGNORED_SOURCE_PREFIXES = ("idx_queue",)
    # The teachers, in the order they are built; those of the heads a config leaves out are not.
    MOMENTUM_MODULES = ("visual_encoder", "vision_proj", "text_encoder", "mlm_head", "text_proj", "mim_head",
                        "concept_head", "mim_adapter")
    _HEADS = {"mlm": ("mlm_head",), "mim": ("mim_head", "mim_adapter"), "psl": ("concept_head",)}

    def __init__(self, config: SimlaConfig) -> None:
        # The model's config copy has the ViT mask token exactly when MIM is on (see `config_for_task`): only
        # MIM uses it, and an unused parameter would also stall DistributedDataParallel.
        super().__init__(config)
        t, v, o = self.config.text, self.config.vision, self.config.objectives
        self.losses = tuple(name for name in LOSS_NAMES if name in o.losses)
        if "mlm" in self.losses:
            self.mlm_head = MLMHead(t)
        if "mim" in self.losses:
            self.mim_head = nn.Linear(t.hidden_size, o.visual_vocab_size)
            # The MIM pass feeds image tokens to the text stack and text embeddings to its cross-attention.
            # The reference needs no adapters because both widths are 768; other widths get linear maps.
            self.mim_adapter = MimAdapter(v.width, t.hidden_size) if v.width != t.hidden_size else None
        if "psl" in self.losses:
            # PSL predicts keywords from the L2-normalised ITC image feature alone.
            self.concept_head = nn.Linear(o.embed_dim, t.vocab_size)
        self.build_momentum_teachers()  # mim_adapter_m is None when there is no adapter

        self.register_buffer("image_queue", F.normalize(torch.randn(o.embed_dim, o.queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(o.embed_dim, o.queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        if o.duplicate_captions == "positives":
            # A fingerprint of each queued caption, so that queued copies of a pair's caption are positives too
            # (as retrieval fine-tuning queues image ids). -1 = an entry from before any write.
            self.register_buffer("caption_queue", torch.full((1, o.queue_size), -1, dtype=torch.long))

    # ------------------------------------------------------------------------------------ momentum
    def ignored_source_prefixes(self) -> tuple[str, ...]:
        """The class's prefixes plus the tensors of the heads (and teacher heads) left out, and the mask tokens
        without MIM: a full pretraining checkpoint loads into an ablation model."""
        left_out = tuple(name for objective, names in self._HEADS.items() if objective not in self.losses
                         for prefix in names for name in (prefix, teacher_name(prefix)))
        if "mim" not in self.losses:
            left_out += ("visual_encoder.mask_token", f"{teacher_name('visual_encoder')}.mask_token")
        return tuple(self.IGNORED_SOURCE_PREFIXES) + left_out

    @property
    def has_unused_parameters(self) -> bool:
        """True when some trained parameter gets no gradient in a step (ITC off: the temperature; ITM off:
        the ITM head), which DistributedDataParallel must be told about."""
        return "itc" not in self.losses or "itm" not in self.losses

    @torch.no_grad()
    def _enqueue(self, image_feat_m: Tensor, text_feat_m: Tensor, captions: Tensor | None) -> None:
        # Queues receive every rank's features; the write wraps around for any batch/world size.
        image_all, text_all = all_gather_no_grad(image_feat_m), all_gather_no_grad(text_feat_m)
        if captions is not None:
            write_to_queue(self.caption_queue, all_gather_no_grad(captions)[:, None], self.queue_ptr.clone())
        pointer = self.queue_ptr.clone()
        write_to_queue(self.image_queue, image_all, pointer)
        write_to_queue(self.text_queue, text_all, self.queue_ptr)

    # ------------------------------------------------------------------------------------- passes
    def _mim_pass(self, encoder: SharedEncoder, adapter: "MimAdapter | None", image_tokens: Tensor,
                  text_embeds: Tensor, text_mask: Tensor, masked: "_MaskedPatches") -> Tensor:
        """Image tokens as queries over the (non-contextualised) text embeddings; returns the states of the
        masked patches, (M, H) in row-major order."""
        if adapter is not None:
            image_tokens, text_embeds = adapter.image_in(image_tokens), adapter.text_kv(text_embeds)
        hidden = encoder(inputs_embeds=image_tokens, mode="multimodal", encoder_hidden_states=text_embeds,
                         encoder_attention_mask=text_mask, output_positions=masked.positions)
        if masked.positions is None:
            return hidden[:, 1:][masked.mask]  # drop the image [CLS] position
        return hidden[masked.valid]

    def _multimodal(self, encoder: SharedEncoder, image_tokens: Tensor | None,
                    requests: Mapping[str, tuple[Tensor, Tensor, Tensor]], cls_attention_for: str | None = None):
        """Multimodal hidden states of each request (captions, mask, image rows) over rows of `image_tokens`;
        captions are token ids or word vectors.

        ONE pass over all requests' captions in which every image's cross-attention keys/values are projected
        once and gathered per caption. Returns (states by request name, [CLS] self-attention probabilities of
        layer `objectives.psl_layer` for the request named `cls_attention_for`, or None).
        """
        if not requests:
            return {}, None
        texts = torch.cat([r[0] for r in requests.values()])
        masks = torch.cat([r[1] for r in requests.values()])
        index = torch.cat([r[2] for r in requests.values()])
        kwargs = dict(mode="multimodal", encoder_hidden_states=image_tokens, context_index=index,
                      attention_mask=masks, **_caption_inputs(texts))
        if cls_attention_for is None:
            hidden, rows = encoder(**kwargs), None
        else:
            hidden, rows = encoder.forward_with_cls_attention(layer=self.config.objectives.psl_layer, **kwargs)
        sizes = [r[0].shape[0] for r in requests.values()]
        states = dict(zip(requests, hidden.split(sizes)))
        cls_attention = dict(zip(requests, rows.split(sizes)))[cls_attention_for] if rows is not None else None
        return states, cls_attention

    def _caption_words(self, step: "_Step") -> tuple[Tensor, Tensor | None]:
        """The caption inputs of the online passes (captions, masked captions): word vectors from ONE lookup.
        Every lookup's backward writes a dense vocabulary-sized gradient (94 MB in the paper model), and the
        text, ITM, MLM and MIM passes would otherwise each make one."""
        if step.masked_ids is None:
            return self.text_encoder.embeddings.word_embeddings(step.ids), None
        vectors = self.text_encoder.embeddings.word_embeddings(torch.cat([step.ids, step.masked_ids]))
        return vectors[:step.batch_size], vectors[step.batch_size:]

    @staticmethod
    def _distills(alpha: float) -> bool:
        """Whether the teacher work that only feeds distillation runs: with alpha = 0 a teacher's distillation
        target is weighted by zero, so it is skipped."""
        return alpha > 0

    @staticmethod
    def _masked_patches(patch_mask: Tensor) -> "_MaskedPatches":
        """The patches MIM predicts; the MIM pass's last layer runs on them alone."""
        return _MaskedPatches(patch_mask, last_layer_only=True)

    @staticmethod
    def caption_fingerprint(ids: Tensor, mask: Tensor) -> Tensor:
        """(B,) int64 hash of each caption's real tokens (padding ignored, so any padded length agrees)."""
        fingerprint = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        for j in range(ids.shape[1]):  # L is ~25: a short loop of vector ops, no host sync
            fingerprint = torch.where(mask[:, j].bool(), fingerprint * 1_000_003 + ids[:, j], fingerprint)
        return fingerprint

    @staticmethod
    def _itm_exclusions(same: Tensor) -> Tensor:
        """ITM may not draw a pair with the same caption as a negative, unless no other caption is left in
        the row: then only the diagonal is excluded (the reference rule) rather than failing on the batch."""
        eye = torch.eye(same.shape[0], dtype=torch.bool, device=same.device)
        stuck = same.all(dim=1, keepdim=True)
        return same & ~stuck | eye & stuck

    # ------------------------------------------------------------------------------------- forward
    def forward(self, batch: Mapping[str, Tensor], alpha: float | None = None) -> PretrainOutput:
        """One step's losses, in the paper's order, over one plan of encoder passes (see the module doc)."""
        step = self._plan(batch, alpha)
        self._mask_captions(step)  # MLM masks first, so that ONE word lookup serves every online pass
        self._encode(step)  # online ViT and text mode
        self._encode_momentum(step)  # EMA update, momentum ViT and text mode
        self._itc(step)
        self._draw_itm_negatives(step)
        self._student_passes(step)  # ONE multimodal pass: ITM captions and masked captions
        self._teacher_passes(step)  # ONE teacher pass: MLM targets and PSL's [CLS] votes
        self._itm(step)
        self._mlm(step)
        self._mim(step)
        self._psl(step)
        if self.training and "itc" in step.on:
            self._enqueue(step.image_feat_m, step.text_feat_m, step.captions)
        return PretrainOutput(step.losses, step.targets)

    def _plan(self, batch: Mapping[str, Tensor], alpha: float | None) -> "_Step":
        """Check the batch, clamp the temperature and lay out the step: which objectives run, with which inputs."""
        needed = BATCH_KEYS if "mim" in self.losses else BATCH_KEYS[:3]
        missing = [k for k in needed if k not in batch]
        if missing:
            raise KeyError(f"pretraining batch lacks {missing}; expected keys {list(needed)}")
        o = self.config.objectives
        on = frozenset(self.losses)
        alpha = o.alpha if alpha is None else float(alpha)
        image, ids, mask = batch["image"], batch["text_ids"], batch["text_mask"]
        if image.shape[0] < 2 and "itm" in on:
            raise ValueError("pretraining needs at least 2 pairs per batch (ITM draws in-batch negatives)")
        with torch.no_grad():
            self.temp.clamp_(o.temp_min, o.temp_max)
        step = _Step(on=on, alpha=alpha, distill=self._distills(alpha), image=image, ids=ids, mask=mask,
                     rows=torch.arange(image.shape[0], device=ids.device))
        step.targets.update(temp=self.temp.detach(), alpha=torch.tensor(alpha))
        if o.duplicate_captions == "positives":
            # Pairs with identical captions are positives of each other (in the batch and the queue).
            step.captions = self.caption_fingerprint(ids, mask)
            step.same_caption = step.captions[:, None] == step.captions[None, :]
        if "mim" in on:
            step.patch_mask, step.visual_tokens = batch["patch_mask"].bool(), batch["visual_tokens"]
            if step.patch_mask.dim() == 3:
                step.patch_mask = step.patch_mask.flatten(1)
            if step.visual_tokens.dim() == 3:
                step.visual_tokens = step.visual_tokens.flatten(1)
        return step

    # ------------------------------------------------------------------------------------- steps
    def _mask_captions(self, step: "_Step") -> None:
        """MLM masks, then the caption inputs of the online passes."""
        if "mlm" in step.on:
            o, t = self.config.objectives, self.config.text
            step.masked_ids, step.mlm_labels = objectives.mask_text_tokens(
                step.ids, vocab_size=t.vocab_size, mask_token_id=t.mask_token_id,
                protected_ids=(t.pad_token_id, t.cls_token_id), mlm_probability=o.mlm_probability,
                mask_ratio=o.mlm_mask_ratio, random_ratio=o.mlm_random_ratio,
            )
            step.targets.update(mlm_labels=step.mlm_labels, masked_ids=step.masked_ids)
        step.words, step.masked_words = self._caption_words(step)

    def _encode(self, step: "_Step") -> None:
        """The online ViT and text-mode passes, and the ITC features."""
        on = step.on
        step.image_embeds = self.visual_encoder(step.image) if on & {"itc", "itm", "mlm", "psl"} else None
        step.image_feat = self.image_features(step.image_embeds) if on & {"itc", "itm", "psl"} else None
        if on & {"itc", "itm"}:
            text_hidden = self.text_encoder(attention_mask=step.mask, mode="text", **_caption_inputs(step.words))
            step.text_feat = self.text_features(text_hidden)

    @torch.no_grad()
    def _encode_momentum(self, step: "_Step") -> None:
        """The EMA update of the teachers, then the momentum ViT and text-mode passes."""
        o = self.config.objectives
        if self.training and self.update_momentum:
            momentum_update(self.momentum_pairs(), o.momentum)
        if step.on & {"itc", "mlm", "psl"}:
            step.image_embeds_m = self.visual_encoder_m(step.image)
            step.image_feat_m = F.normalize(self.vision_proj_m(step.image_embeds_m[:, 0]), dim=-1)
        if "itc" in step.on:
            text_hidden_m = self.text_encoder_m(step.ids, step.mask, mode="text")
            step.text_feat_m = F.normalize(self.text_proj_m(text_hidden_m[:, 0]), dim=-1)

    def _itc(self, step: "_Step") -> None:
        """ITC with queues and momentum distillation; its in-batch similarities guide the ITM negatives."""
        if "itc" not in step.on:
            return
        positives = None
        if step.captions is not None:
            positives = torch.cat([step.same_caption, step.captions[:, None] == self.caption_queue], dim=1)
        itc = objectives.itc_loss(step.image_feat, step.text_feat, step.image_feat_m, step.text_feat_m,
                                  self.image_queue, self.text_queue, self.temp, step.alpha, positive_mask=positives)
        step.losses["itc"] = itc.loss
        step.sim_i2t, step.sim_t2i = itc.sim_i2t[:, :step.batch_size], itc.sim_t2i[:, :step.batch_size]

    def _draw_itm_negatives(self, step: "_Step") -> None:
        """ITM's in-batch hard negatives: an image for each caption and a caption for each image."""
        if "itm" not in step.on:
            return
        if "itc" not in step.on:
            # Hard negatives still follow the in-batch similarities, which need no queue and no gradient.
            with torch.no_grad():
                step.sim_i2t = step.image_feat @ step.text_feat.t() / self.temp
                step.sim_t2i = step.sim_i2t.t()
        excluded = self._itm_exclusions(step.same_caption) if step.same_caption is not None else None
        step.neg_image, step.neg_text = objectives.sample_hard_negatives(
            step.sim_i2t, step.sim_t2i, same_pair=excluded, uniform=self.config.objectives.itm_negatives == "random")
        step.targets.update(itm_negative_images=step.neg_image, itm_negative_texts=step.neg_text)

    def _student_passes(self, step: "_Step") -> None:
        """The student's multimodal passes: the ITM captions (positives, then negative images, then negative
        captions) and the masked captions (MLM)."""
        requests: dict[str, tuple[Tensor, Tensor, Tensor]] = {}  # name -> (captions, mask, image rows)
        if "itm" in step.on:
            words, mask, neg_text = step.words, step.mask, step.neg_text
            requests["itm"] = (torch.cat([words, words, words[neg_text]]), torch.cat([mask, mask, mask[neg_text]]),
                               torch.cat([step.rows, step.neg_image, step.rows]))
        if "mlm" in step.on:
            requests["mlm"] = (step.masked_words, step.mask, step.rows)
        step.student, _ = self._multimodal(self.text_encoder, step.image_embeds, requests)

    @torch.no_grad()
    def _teacher_passes(self, step: "_Step") -> None:
        """The teacher's multimodal passes: MLM targets and PSL's [CLS] attention votes."""
        o = self.config.objectives
        requests: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        if "mlm" in step.on and step.distill:
            requests["mlm"] = (step.masked_ids, step.mask, step.rows)
        if "psl" in step.on and o.psl_selection != "reference":
            # simla votes with the momentum image tokens, so the vote can share the MLM teacher's pass.
            requests["psl"] = (step.ids, step.mask, step.rows)
        if requests:
            step.teacher, step.cls_attention = self._multimodal(
                self.text_encoder_m, step.image_embeds_m, requests,
                cls_attention_for="psl" if "psl" in requests else None)
        if "psl" in step.on and o.psl_selection == "reference":
            # The reference feeds the ONLINE image tokens to the teacher for the vote.
            _, step.cls_attention = self.text_encoder_m.forward_with_cls_attention(
                step.ids, step.mask, layer=o.psl_layer, mode="multimodal",
                encoder_hidden_states=step.image_embeds.detach())

    def _itm(self, step: "_Step") -> None:
        """ITM: in-batch hard negatives, scored from the multimodal [CLS]."""
        if "itm" not in step.on:
            return
        itm_logits = self.itm_head(step.student["itm"][:, 0])
        device, size = step.ids.device, step.batch_size
        itm_labels = torch.cat([torch.ones(size, dtype=torch.long, device=device),
                                torch.zeros(2 * size, dtype=torch.long, device=device)])
        step.losses["itm"] = F.cross_entropy(itm_logits, itm_labels)

    def _mlm(self, step: "_Step") -> None:
        """MLM: masked words predicted from the image, distilled from the teacher. The vocabulary heads run
        on the masked positions only."""
        if "mlm" not in step.on:
            return
        selected = step.mlm_labels != -100
        mlm_logits = self.mlm_head(step.student["mlm"][selected], self.text_encoder.embeddings.word_embeddings.weight)
        mlm_teacher = None
        if "mlm" in step.teacher:
            with torch.no_grad():
                mlm_teacher = self.mlm_head_m(step.teacher["mlm"][selected],
                                              self.text_encoder_m.embeddings.word_embeddings.weight)
        step.losses["mlm"] = objectives.distilled_cross_entropy(mlm_logits, step.mlm_labels[selected], mlm_teacher,
                                                                step.alpha)

    def _mim(self, step: "_Step") -> None:
        """MIM: masked patches predicted as visual tokens from the text, distilled from the teacher."""
        if "mim" not in step.on:
            return
        masked = self._masked_patches(step.patch_mask)
        masked_image = self.visual_encoder(step.image, patch_mask=step.patch_mask)
        text_embeds = self.text_encoder.embeddings(**_caption_inputs(step.words))
        patch_states = self._mim_pass(self.text_encoder, self.mim_adapter, masked_image, text_embeds, step.mask, masked)
        mim_logits = self.mim_head(patch_states)
        mim_teacher = None
        if step.distill:
            with torch.no_grad():
                masked_image_m = self.visual_encoder_m(step.image, patch_mask=step.patch_mask)
                # the teacher's keys/values are the MOMENTUM text embeddings (reference: online ones).
                patch_states_m = self._mim_pass(self.text_encoder_m, self.mim_adapter_m, masked_image_m,
                                                self.text_encoder_m.embeddings(input_ids=step.ids), step.mask, masked)
                mim_teacher = self.mim_head_m(patch_states_m)
        step.losses["mim"] = objectives.distilled_cross_entropy(
            mim_logits, step.visual_tokens[step.patch_mask], mim_teacher, step.alpha)

    def _psl(self, step: "_Step") -> None:
        """PSL: keywords chosen by the teacher's multimodal [CLS] attention, predicted from the image."""
        if "psl" not in step.on:
            return
        o, t = self.config.objectives, self.config.text
        psl_reference = o.psl_selection == "reference"
        with torch.no_grad():
            keywords = objectives.select_psl_keywords(
                step.cls_attention, step.ids, step.mask, num_keywords=o.psl_num_keywords,
                votes_per_head=o.psl_votes_per_head, excluded_ids=self.config.special_token_ids,
                reference=psl_reference)
            hard = objectives.psl_targets(keywords, t.vocab_size, zero_ids=(t.cls_token_id,) if psl_reference else ())
            soft = torch.sigmoid(self.concept_head_m(step.image_feat_m)) if step.distill else None
        step.losses["psl"] = objectives.psl_loss(self.concept_head(step.image_feat), hard, soft, step.alpha)
        step.targets["psl_keywords"] = keywords


@dataclass(eq=False)
class _Step:
    """One step's plan, built once by `SimlaForPretraining._plan`, and the tensors its steps hand on."""

    on: frozenset[str]  # the objectives computed
    alpha: float  # the distillation weight
    distill: bool  # whether the teacher work that only feeds distillation runs
    image: Tensor
    ids: Tensor
    mask: Tensor
    rows: Tensor  # arange(B): each caption's own image row
    losses: dict[str, Tensor] = field(default_factory=dict)
    targets: dict[str, Tensor] = field(default_factory=dict)
    # duplicate_captions="positives": caption fingerprints (B,) and which pairs share a caption (B, B)
    captions: Tensor | None = None
    same_caption: Tensor | None = None
    # MIM: the masked patches (B, G*G) and their visual tokens
    patch_mask: Tensor | None = None
    visual_tokens: Tensor | None = None
    # MLM: the masked captions and labels; the caption inputs of the online passes (ids or word vectors)
    masked_ids: Tensor | None = None
    mlm_labels: Tensor | None = None
    words: Tensor | None = None
    masked_words: Tensor | None = None
    # The encoders' outputs
    image_embeds: Tensor | None = None
    image_feat: Tensor | None = None
    text_feat: Tensor | None = None
    image_embeds_m: Tensor | None = None
    image_feat_m: Tensor | None = None
    text_feat_m: Tensor | None = None
    # ITM: in-batch similarities and the drawn negatives
    sim_i2t: Tensor | None = None
    sim_t2i: Tensor | None = None
    neg_image: Tensor | None = None
    neg_text: Tensor | None = None
    # The multimodal passes' states by request name, and the teacher's [CLS] attention for PSL
    student: dict[str, Tensor] = field(default_factory=dict)
    teacher: dict[str, Tensor] = field(default_factory=dict)
    cls_attention: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.image.shape[0]


class _MaskedPatches:
    """Which patches MIM predicts. With `last_layer_only`, the MIM pass's last layer runs on them alone:
    `positions` (B, K) are each image's masked patches in order (then filler positions up to the largest
    count K, computed and dropped), shifted by one for the image [CLS]; `valid` marks the real ones."""

    def __init__(self, mask: Tensor, last_layer_only: bool) -> None:
        self.mask, self.positions, self.valid = mask, None, None
        if not last_layer_only or mask.numel() == 0:
            return
        counts = mask.sum(dim=1)
        most = int(counts.max())  # one host read per step
        if most > 0:
            # A stable sort puts each row's masked patches first, in their original order.
            order = torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :most]
            self.positions = order + 1
            self.valid = torch.arange(most, device=mask.device)[None, :] < counts[:, None]


def _caption_inputs(captions: Tensor) -> dict[str, Tensor]:
    """The encoder keyword for captions given as token ids (integers) or as looked-up word vectors."""
    if captions.is_floating_point():
        return {"inputs_embeds": captions}
    return {"input_ids": captions}


class MimAdapter(nn.Module):
    """Width adapters for the MIM pass when the image and text widths differ (absent in the paper model)."""

    def __init__(self, vision_width: int, text_width: int) -> None:
        super().__init__()
        self.image_in = nn.Linear(vision_width, text_width)
        self.text_kv = nn.Linear(text_width, vision_width)
