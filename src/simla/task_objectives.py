"""Losses of the downstream tasks, as pure functions of logits and targets (no model, no files).

NLVR2 and SNLI-VE: cross-entropy of a classifier on the multimodal [CLS], mixed with the momentum
classifier's soft targets when alpha > 0.

VQA: the answer decoder is trained by teacher forcing; an answer's loss is its negative log-likelihood
SUMMED over its tokens (the end-of-answer token included), optionally mixed with a distillation term
against the momentum decoder's token distributions; the batch loss weights each answer and divides by the
number of questions.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def answer_token_losses(next_logits: Tensor, answer_ids: Tensor, answer_mask: Tensor,
                        teacher_logits: Tensor | None = None, alpha: float = 0.0) -> Tensor:
    """Per-answer loss (N,) for answers (N, L) `[CLS] a ... [SEP]` from teacher-forced next-token logits.

    `next_logits` (N, L - 1, V): position t's prediction of token t + 1 (the decoder's outputs at every
    position but the last). Padded targets (mask 0) count nothing. With `teacher_logits` (same shape) and
    alpha > 0 the loss is (1 - alpha) * NLL + alpha * the cross-entropy against the teacher's softmax over
    the VOCABULARY (the reference normalises its distillation log-softmax over the sequence axis, and then
    never enables distillation for VQA at all).
    """
    targets = answer_ids[:, 1:]
    valid = answer_mask[:, 1:].float()
    # cross_entropy runs in fp32 under autocast, so bf16 logits lose nothing here.
    nll = F.cross_entropy(next_logits.transpose(1, 2), targets, reduction="none")
    loss = (nll.float() * valid).sum(1)
    if teacher_logits is not None and alpha > 0:
        soft = F.softmax(teacher_logits.float(), dim=-1)
        distill = -(F.log_softmax(next_logits.float(), dim=-1) * soft).sum(-1)
        loss = (1.0 - alpha) * loss + alpha * (distill * valid).sum(1)
    return loss


def weighted_answer_loss(per_answer: Tensor, weights: Tensor, num_questions: int) -> Tensor:
    """sum over answers of weight * loss, divided by the number of questions in the batch (the reference)."""
    return (weights.to(per_answer.dtype) * per_answer).sum() / num_questions


def distilled_cross_entropy(logits: Tensor, labels: Tensor, teacher_logits: Tensor | None = None,
                            alpha: float = 0.0) -> Tensor:
    """Classification loss of NLVR2 and SNLI-VE: (1 - alpha) * CE + alpha * soft CE against the teacher.

    The soft CE is -sum_c softmax(teacher)_c * log_softmax(logits)_c, averaged over the batch.
    """
    loss = F.cross_entropy(logits.float(), labels)
    if teacher_logits is not None and alpha > 0:
        soft = F.softmax(teacher_logits.float(), dim=-1)
        distill = -(F.log_softmax(logits.float(), dim=-1) * soft).sum(-1).mean()
        loss = (1.0 - alpha) * loss + alpha * distill
    return loss
