"""Image–text retrieval fine-tuning: ITC + ITM aware of image ids.

Captions of the same image are positives for each other: the ITC hard targets are multi-positive over
the batch AND the queue (the image ids are enqueued with the features, which the reference forgot to
do), and ITM never draws a negative that shares the image id.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import objectives
from ..config import SimlaConfig
from ..distributed import all_gather_no_grad
from .momentum import write_to_queue
from .outputs import RetrievalOutput
from .simla import SimlaModel

RETRIEVAL_BATCH_KEYS = ("image", "text_ids", "text_mask", "image_id")


class SimlaForRetrieval(SimlaModel):
    """SimlaModel + momentum encoders and ITC queues (image, text and image-id) for fine-tuning."""

    TASK = "retrieval"  # the name create_model/load_checkpoint use for this class
    # Pretraining-only tensors a retrieval model deliberately lacks (reported as ignored on load).
    IGNORED_SOURCE_PREFIXES = ("mlm_head", "mim_head", "concept_head", "mim_adapter", "visual_encoder.mask_token",
                               "visual_encoder_m.mask_token", "caption_queue")
    MOMENTUM_MODULES = ("visual_encoder", "vision_proj", "text_encoder", "text_proj")

    def __init__(self, config: SimlaConfig) -> None:
        super().__init__(config)
        o = self.config.objectives
        self.build_momentum_teachers()
        self.register_buffer("image_queue", F.normalize(torch.randn(o.embed_dim, o.queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(o.embed_dim, o.queue_size), dim=0))
        self.register_buffer("idx_queue", torch.full((1, o.queue_size), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def prepare_source_state(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Queues of another size (a pretraining run's) are left out: this model's queues start fresh."""
        size = self.config.objectives.queue_size
        return {k: v for k, v in state.items()
                if not (k in ("image_queue", "text_queue") and v.shape[1] != size)}

    @torch.no_grad()
    def _enqueue(self, image_feat_m: Tensor, text_feat_m: Tensor, image_id: Tensor) -> None:
        images, texts = all_gather_no_grad(image_feat_m), all_gather_no_grad(text_feat_m)
        ids = all_gather_no_grad(image_id)
        start = self.queue_ptr.clone()
        write_to_queue(self.image_queue, images, start.clone())
        write_to_queue(self.text_queue, texts, start.clone())
        write_to_queue(self.idx_queue, ids[:, None], self.queue_ptr)  # advances the shared pointer

    def forward(self, batch: Mapping[str, Tensor], alpha: float | None = None) -> RetrievalOutput:
        missing = [k for k in RETRIEVAL_BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"retrieval batch lacks {missing}; expected keys {list(RETRIEVAL_BATCH_KEYS)}")
        o = self.config.objectives
        alpha = o.alpha if alpha is None else float(alpha)
        image, ids, mask, image_id = batch["image"], batch["text_ids"], batch["text_mask"], batch["image_id"].long()
        batch_size = image.shape[0]
        with torch.no_grad():
            self.temp.clamp_(o.temp_min, o.temp_max)

        image_embeds = self.visual_encoder(image)
        image_feat = self.image_features(image_embeds)
        text_feat = self.text_features(self.text_encoder(ids, mask, mode="text"))
        # Multi-positive targets: same image id in the batch or in the queue.
        all_ids = torch.cat([image_id, self.idx_queue[0]])
        positives = image_id[:, None] == all_ids[None, :]
        with torch.no_grad():
            if self.training and self.update_momentum:
                self.update_momentum_teachers(o.momentum)
            image_feat_m = F.normalize(self.vision_proj_m(self.visual_encoder_m(image)[:, 0]), dim=-1)
            text_feat_m = F.normalize(self.text_proj_m(self.text_encoder_m(ids, mask, mode="text")[:, 0]), dim=-1)
        itc = objectives.itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, self.image_queue,
                                  self.text_queue, self.temp, alpha, positive_mask=positives)

        same_image = positives[:, :batch_size]
        neg_image, neg_text = objectives.sample_hard_negatives(
            itc.sim_i2t[:, :batch_size], itc.sim_t2i[:, :batch_size], same_pair=same_image,
            uniform=o.itm_negatives == "random")
        rows = torch.arange(batch_size, device=ids.device)
        texts, masks = torch.cat([ids, ids, ids[neg_text]]), torch.cat([mask, mask, mask[neg_text]])
        if o.execution == "simla":  # each image's cross-attention keys/values projected once, not per caption
            itm_logits = self.itm_logits(image_embeds, texts, masks, image_index=torch.cat([rows, neg_image, rows]))
        else:
            itm_logits = self.itm_logits(torch.cat([image_embeds, image_embeds[neg_image], image_embeds]), texts, masks)
        labels = torch.cat([torch.ones(batch_size, dtype=torch.long, device=ids.device),
                            torch.zeros(2 * batch_size, dtype=torch.long, device=ids.device)])
        itm = F.cross_entropy(itm_logits, labels)
        if self.training:
            self._enqueue(image_feat_m, text_feat_m, image_id)
        return RetrievalOutput({"itc": itc.loss, "itm": itm}, itm_negative_images=neg_image,
                               itm_negative_texts=neg_text)
