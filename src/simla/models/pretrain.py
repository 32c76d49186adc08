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
attends to it; `objectives.execution = "reference"` keeps that layout (as the benchmark baseline). With
alpha = 0 simla's execution also skips the teacher work that only feeds distillation. The MLM/MIM vocabulary
heads run only on the masked positions instead of every position.
"""

from __future__ import annotations

from collections.abc import Mapping

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
                    requests: Mapping[str, tuple[Tensor, Tensor, Tensor]], shared: bool,
                    cls_attention_for: str | None = None):
        """Multimodal hidden states of each request (captions, mask, image rows) over rows of `image_tokens`;
        captions are token ids or word vectors.

        shared (simla's execution): ONE pass over all requests' captions in which every image's
        cross-attention keys/values are projected once and gathered per caption; otherwise a pass per request
        over gathered image tokens (the reference). Returns (states by request name, [CLS] self-attention probabilities of layer
        `objectives.psl_layer` for the request named `cls_attention_for`, or None).
        """
        layer = self.config.objectives.psl_layer
        states: dict[str, Tensor] = {}
        cls_attention = None
        if shared and requests:
            texts = torch.cat([r[0] for r in requests.values()])
            masks = torch.cat([r[1] for r in requests.values()])
            index = torch.cat([r[2] for r in requests.values()])
            kwargs = dict(mode="multimodal", encoder_hidden_states=image_tokens, context_index=index,
                          attention_mask=masks, **_caption_inputs(texts))
            if cls_attention_for is None:
                hidden, rows = encoder(**kwargs), None
            else:
                hidden, rows = encoder.forward_with_cls_attention(layer=layer, **kwargs)
            sizes = [r[0].shape[0] for r in requests.values()]
            states = dict(zip(requests, hidden.split(sizes)))
            if rows is not None:
                cls_attention = dict(zip(requests, rows.split(sizes)))[cls_attention_for]
        else:
            for name, (texts, masks, index) in requests.items():
                kwargs = dict(mode="multimodal", encoder_hidden_states=image_tokens[index], attention_mask=masks,
                              **_caption_inputs(texts))
                if name == cls_attention_for:
                    states[name], cls_attention = encoder.forward_with_cls_attention(layer=layer, **kwargs)
                else:
                    states[name] = encoder(**kwargs)
        return states, cls_attention

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
        needed = BATCH_KEYS if "mim" in self.losses else BATCH_KEYS[:3]
        missing = [k for k in needed if k not in batch]
        if missing:
            raise KeyError(f"pretraining batch lacks {missing}; expected keys {list(needed)}")
        o, t = self.config.objectives, self.config.text
        on = set(self.losses)
        alpha = o.alpha if alpha is None else float(alpha)
        image, ids, mask = batch["image"], batch["text_ids"], batch["text_mask"]
        batch_size = image.shape[0]
        if batch_size < 2 and "itm" in on:
            raise ValueError("pretraining needs at least 2 pairs per batch (ITM draws in-batch negatives)")

        with torch.no_grad():
            self.temp.clamp_(o.temp_min, o.temp_max)
        losses: dict[str, Tensor] = {}
        targets: dict[str, Tensor] = {"temp": self.temp.detach(), "alpha": torch.tensor(alpha)}

        shared = o.execution == "simla"
        # With alpha = 0 a teacher's distillation target is weighted by zero: simla's execution skips it.
        distill = alpha > 0 or not shared
        # ---- MLM masks are drawn first, so that one word-embedding lookup can serve every online pass
        if "mlm" in on:
            masked_ids, mlm_labels = objectives.mask_text_tokens(
                ids, vocab_size=t.vocab_size, mask_token_id=t.mask_token_id,
                protected_ids=(t.pad_token_id, t.cls_token_id), mlm_probability=o.mlm_probability,
                mask_ratio=o.mlm_mask_ratio, random_ratio=o.mlm_random_ratio,
            )
            selected = mlm_labels != -100  # the vocabulary heads run on these positions only
            targets.update(mlm_labels=mlm_labels, masked_ids=masked_ids)
        # The caption inputs of the online passes: ids, or (simla's execution) word vectors from ONE lookup. Every
        # lookup's backward writes a dense vocabulary-sized gradient (94 MB in the paper model), and the text,
        # ITM, MLM and MIM passes would otherwise each make one.
        words, masked_words = ids, masked_ids if "mlm" in on else None
        if shared:
            vectors = self.text_encoder.embeddings.word_embeddings(torch.cat([ids, masked_ids]) if "mlm" in on else ids)
            words, masked_words = (vectors[:batch_size], vectors[batch_size:]) if "mlm" in on else (vectors, None)

        # ---- online ViT and text-mode passes, the EMA update and the momentum passes
        image_embeds = self.visual_encoder(image) if on & {"itc", "itm", "mlm", "psl"} else None
        image_feat = self.image_features(image_embeds) if on & {"itc", "itm", "psl"} else None
        text_feat = None
        if on & {"itc", "itm"}:
            text_feat = self.text_features(self.text_encoder(attention_mask=mask, mode="text", **_caption_inputs(words)))
        image_embeds_m = image_feat_m = text_feat_m = None
        with torch.no_grad():
            if self.training and self.update_momentum:
                momentum_update(self.momentum_pairs(), o.momentum)
            if on & {"itc", "mlm", "psl"}:
                image_embeds_m = self.visual_encoder_m(image)
                image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0]), dim=-1)
            if "itc" in on:
                text_hidden_m = self.text_encoder_m(ids, mask, mode="text")
                text_feat_m = F.normalize(self.text_proj_m(text_hidden_m[:, 0]), dim=-1)

        # ---- ITC with queues and momentum distillation
        # Pairs with identical captions are positives of each other when asked (in the batch and the queue).
        captions = self.caption_fingerprint(ids, mask) if o.duplicate_captions == "positives" else None
        same_caption = captions[:, None] == captions[None, :] if captions is not None else None
        if "itc" in on:
            positives = None
            if captions is not None:
                positives = torch.cat([same_caption, captions[:, None] == self.caption_queue], dim=1)
            itc = objectives.itc_loss(image_feat, text_feat, image_feat_m, text_feat_m,
                                      self.image_queue, self.text_queue, self.temp, alpha, positive_mask=positives)
            losses["itc"] = itc.loss
            sim_i2t, sim_t2i = itc.sim_i2t[:, :batch_size], itc.sim_t2i[:, :batch_size]
        elif "itm" in on:
            # Hard negatives still follow the in-batch similarities, which need no queue and no gradient.
            with torch.no_grad():
                sim_i2t = image_feat @ text_feat.t() / self.temp
                sim_t2i = sim_i2t.t()

        # ---- ITM negatives, then the student's multimodal passes (ITM and MLM)
        rows = torch.arange(batch_size, device=ids.device)
        student_requests: dict[str, tuple[Tensor, Tensor, Tensor]] = {}  # name -> (captions, mask, image rows)
        if "itm" in on:
            excluded = self._itm_exclusions(same_caption) if same_caption is not None else None
            neg_image, neg_text = objectives.sample_hard_negatives(sim_i2t, sim_t2i, same_pair=excluded,
                                                                   uniform=o.itm_negatives == "random")
            student_requests["itm"] = (torch.cat([words, words, words[neg_text]]),
                                       torch.cat([mask, mask, mask[neg_text]]), torch.cat([rows, neg_image, rows]))
            targets.update(itm_negative_images=neg_image, itm_negative_texts=neg_text)
        if "mlm" in on:
            student_requests["mlm"] = (masked_words, mask, rows)
        student, _ = self._multimodal(self.text_encoder, image_embeds, student_requests, shared)

        # ---- ITM: in-batch hard negatives, scored from the multimodal [CLS]
        if "itm" in on:
            itm_logits = self.itm_head(student["itm"][:, 0])
            itm_labels = torch.cat([torch.ones(batch_size, dtype=torch.long, device=ids.device),
                                    torch.zeros(2 * batch_size, dtype=torch.long, device=ids.device)])
            losses["itm"] = F.cross_entropy(itm_logits, itm_labels)

        # ---- The teacher's multimodal passes: MLM targets and PSL's [CLS] attention votes
        psl_reference = o.psl_selection == "reference"
        teacher: dict[str, Tensor] = {}
        cls_attention = None
        with torch.no_grad():
            teacher_requests: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
            if "mlm" in on and distill:
                teacher_requests["mlm"] = (masked_ids, mask, rows)
            if "psl" in on and not psl_reference:
                # simla votes with the momentum image tokens, so the vote can share the MLM teacher's pass.
                teacher_requests["psl"] = (ids, mask, rows)
            if teacher_requests:
                teacher, cls_attention = self._multimodal(self.text_encoder_m, image_embeds_m, teacher_requests, shared,
                                                          cls_attention_for="psl" if "psl" in teacher_requests else None)
            if "psl" in on and psl_reference:
                # The reference feeds the ONLINE image tokens to the teacher for the vote.
                _, cls_attention = self.text_encoder_m.forward_with_cls_attention(
                    ids, mask, layer=o.psl_layer, mode="multimodal", encoder_hidden_states=image_embeds.detach())

        # ---- MLM: masked words predicted from the image, distilled from the teacher
        if "mlm" in on:
            mlm_logits = self.mlm_head(student["mlm"][selected], self.text_encoder.embeddings.word_embeddings.weight)
            mlm_teacher = None
            if "mlm" in teacher:
                with torch.no_grad():
                    mlm_teacher = self.mlm_head_m(teacher["mlm"][selected],
                                                  self.text_encoder_m.embeddings.word_embeddings.weight)
            losses["mlm"] = objectives.distilled_cross_entropy(mlm_logits, mlm_labels[selected], mlm_teacher, alpha)

        # ---- MIM: masked patches predicted as visual tokens from the text
        if "mim" in on:
            patch_mask, visual_tokens = batch["patch_mask"].bool(), batch["visual_tokens"]
            if patch_mask.dim() == 3:
                patch_mask = patch_mask.flatten(1)
            if visual_tokens.dim() == 3:
                visual_tokens = visual_tokens.flatten(1)
            masked = _MaskedPatches(patch_mask, last_layer_only=shared)
            masked_image = self.visual_encoder(image, patch_mask=patch_mask)
            patch_states = self._mim_pass(self.text_encoder, self.mim_adapter, masked_image,
                                          self.text_encoder.embeddings(**_caption_inputs(words)), mask, masked)
            mim_logits = self.mim_head(patch_states)
            mim_teacher = None
            if distill:
                with torch.no_grad():
                    masked_image_m = self.visual_encoder_m(image, patch_mask=patch_mask)
                    # the teacher's keys/values are the MOMENTUM text embeddings (reference: online ones).
                    patch_states_m = self._mim_pass(self.text_encoder_m, self.mim_adapter_m, masked_image_m,
                                                    self.text_encoder_m.embeddings(input_ids=ids), mask, masked)
                    mim_teacher = self.mim_head_m(patch_states_m)
            losses["mim"] = objectives.distilled_cross_entropy(mim_logits, visual_tokens[patch_mask], mim_teacher,
                                                               alpha)

        # ---- PSL: keywords chosen by the teacher's multimodal [CLS] attention, predicted from the image
        if "psl" in on:
            with torch.no_grad():
                keywords = objectives.select_psl_keywords(
                    cls_attention, ids, mask, num_keywords=o.psl_num_keywords, votes_per_head=o.psl_votes_per_head,
                    excluded_ids=self.config.special_token_ids, reference=psl_reference)
                hard = objectives.psl_targets(keywords, t.vocab_size, zero_ids=(t.cls_token_id,) if psl_reference else ())
                soft = torch.sigmoid(self.concept_head_m(image_feat_m)) if distill else None
            losses["psl"] = objectives.psl_loss(self.concept_head(image_feat), hard, soft, alpha)
            targets["psl_keywords"] = keywords

        if self.training and "itc" in on:
            self._enqueue(image_feat_m, text_feat_m, captions)
        return PretrainOutput(losses, targets)


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
