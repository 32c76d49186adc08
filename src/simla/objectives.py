"""Loss functions and target builders for SIMLA pretraining and retrieval fine-tuning.

Everything here is a pure function on tensors: no modules, no parameters, no I/O. The pretraining
and retrieval modules own the networks, the queues and the temperature; they hand the tensors to
these functions. Where simla differs from the reference code, the docstring says so (see also
docs/reference-behaviour.md).

Host synchronisation: none of the functions reads a tensor value on the host, with one documented
exception (:func:`sample_hard_negatives` checks once per call that every row has a candidate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ItcOutput",
    "distilled_cross_entropy",
    "itc_loss",
    "mask_text_tokens",
    "psl_loss",
    "psl_targets",
    "sample_hard_negatives",
    "select_psl_keywords",
]

# Added to the sampling weight of every eligible hard-negative candidate. It is far below any
# probability a finite softmax row can give its best entry (>= 1/B), so it does not change the
# distribution measurably, but it guarantees that a row with an eligible candidate never has an
# all-zero weight vector (which torch.multinomial rejects).
_ELIGIBLE_WEIGHT_FLOOR = 1e-20


# ---------------------------------------------------------------------------------------------
# ITC
# ---------------------------------------------------------------------------------------------


@dataclass
class ItcOutput:
    """Result of :func:`itc_loss`.

    Attributes:
        loss: scalar contrastive loss (float32).
        sim_i2t: (B, B+Q) student image-to-text logits, already divided by the temperature. The
            first B columns are the in-batch texts; callers feed them to hard-negative sampling.
        sim_t2i: (B, B+Q) student text-to-image logits, likewise.
    """

    loss: Tensor
    sim_i2t: Tensor
    sim_t2i: Tensor


def _soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """mean_rows(-sum_cols targets * log_softmax(logits)) over the last axis, in float32.

    float32 because under bf16 autocast the sims arrive in bf16, whose log-softmax over tens of
    thousands of queue columns is too coarse for a loss value.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(targets.float() * log_probs).sum(dim=-1).mean()


def _at_least_fp32(x: Tensor) -> Tensor:
    """fp16/bf16 tensors promoted to fp32; fp32 and fp64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def itc_loss(
    image_feat: Tensor,
    text_feat: Tensor,
    image_feat_m: Tensor,
    text_feat_m: Tensor,
    image_queue: Tensor,
    text_queue: Tensor,
    temp: Tensor,
    alpha: float,
    positive_mask: Tensor | None = None,
) -> ItcOutput:
    """Image-text contrastive loss with a feature queue and momentum distillation.

    Args:
        image_feat: (B, E) L2-normalised online image features (carry gradient).
        text_feat: (B, E) L2-normalised online text features (carry gradient).
        image_feat_m: (B, E) momentum image features (treated as constants).
        text_feat_m: (B, E) momentum text features (treated as constants).
        image_queue: (E, Q) past momentum image features, one per column.
        text_queue: (E, Q) past momentum text features, one per column.
        temp: 0-d temperature tensor (learnable; the caller clamps it). Gradient flows into it
            through the student logits only.
        alpha: weight of the momentum soft targets; 0 disables distillation (and skips the
            momentum similarity computation entirely).
        positive_mask: optional (B, B+Q) bool. When given (retrieval fine-tuning), column j is a
            positive of row b iff the mask is True, and the hard targets are the row-normalised
            mask. Column b of row b is always treated as positive (it is in any valid mask:
            a pair shares its own image id), which also keeps every row's normaliser non-zero
            without a host-side check. When None, the hard targets are the identity on the first
            B columns.

    Returns:
        :class:`ItcOutput` with the loss and the student logits.
    """
    _check_itc_inputs(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp)
    batch = image_feat.shape[0]
    width = batch + image_queue.shape[1]

    # The momentum features and queues are targets, never trained: detach so that a caller who
    # forgot no_grad cannot leak gradient into the momentum encoders.
    image_all = torch.cat([image_feat_m.detach().t(), image_queue.detach()], dim=1)  # (E, B+Q)
    text_all = torch.cat([text_feat_m.detach().t(), text_queue.detach()], dim=1)  # (E, B+Q)

    # Similarities and their division by the temperature run in fp32 even under bf16 autocast: logits near
    # 1/0.07 = 14 would move in steps of 0.0625 in bf16, and the temperature's gradient passes through them.
    with torch.autocast(device_type=image_feat.device.type, enabled=False):
        temp = _at_least_fp32(temp)
        image_all, text_all = _at_least_fp32(image_all), _at_least_fp32(text_all)
        sim_i2t = _at_least_fp32(image_feat) @ text_all / temp
        sim_t2i = _at_least_fp32(text_feat) @ image_all / temp

    hard = _itc_hard_targets(batch, width, positive_mask, sim_i2t.device)
    if alpha == 0:
        targets_i2t = hard
        targets_t2i = hard
    else:
        with torch.no_grad(), torch.autocast(device_type=image_feat.device.type, enabled=False):
            sim_i2t_m = _at_least_fp32(image_feat_m) @ text_all / temp
            sim_t2i_m = _at_least_fp32(text_feat_m) @ image_all / temp
            targets_i2t = alpha * F.softmax(sim_i2t_m.float(), dim=1) + (1 - alpha) * hard
            targets_t2i = alpha * F.softmax(sim_t2i_m.float(), dim=1) + (1 - alpha) * hard

    loss = 0.5 * (_soft_cross_entropy(sim_i2t, targets_i2t) + _soft_cross_entropy(sim_t2i, targets_t2i))
    return ItcOutput(loss=loss, sim_i2t=sim_i2t, sim_t2i=sim_t2i)


def _check_itc_inputs(image_feat: Tensor, text_feat: Tensor, image_feat_m: Tensor, text_feat_m: Tensor,
                      image_queue: Tensor, text_queue: Tensor, temp: Tensor) -> None:
    """Raise on features, queues or a temperature whose shapes do not fit :func:`itc_loss`."""
    if image_feat.dim() != 2 or image_feat.shape != text_feat.shape:
        raise ValueError(
            f"image_feat and text_feat must both be (B, E); got {tuple(image_feat.shape)} "
            f"and {tuple(text_feat.shape)}"
        )
    if image_feat_m.shape != image_feat.shape or text_feat_m.shape != text_feat.shape:
        raise ValueError(
            "momentum features must have the same (B, E) shape as the online features; got "
            f"{tuple(image_feat_m.shape)} and {tuple(text_feat_m.shape)}"
        )
    embed = image_feat.shape[1]
    if image_queue.dim() != 2 or image_queue.shape[0] != embed or image_queue.shape != text_queue.shape:
        raise ValueError(
            f"queues must both be (E={embed}, Q); got {tuple(image_queue.shape)} and "
            f"{tuple(text_queue.shape)}"
        )
    if temp.dim() != 0:
        raise ValueError(f"temp must be a 0-d tensor; got shape {tuple(temp.shape)}")


def _itc_hard_targets(batch: int, width: int, positive_mask: Tensor | None, device: torch.device) -> Tensor:
    """(B, B+Q) float32 hard ITC targets: the identity on the first B columns, or the row-normalised
    `positive_mask` with each pair's own column always set (see :func:`itc_loss`)."""
    if positive_mask is None:
        # eye(B, B+Q) puts the ones at (b, b): each pair's own momentum feature.
        return torch.eye(batch, width, device=device, dtype=torch.float32)
    if positive_mask.dtype != torch.bool:
        raise TypeError(f"positive_mask must be a bool tensor; got {positive_mask.dtype}")
    if positive_mask.shape != (batch, width):
        raise ValueError(
            f"positive_mask must be (B, B+Q) = {(batch, width)}; got {tuple(positive_mask.shape)}"
        )
    own = torch.eye(batch, width, device=positive_mask.device, dtype=torch.bool)
    pos = (positive_mask | own).to(device=device, dtype=torch.float32)
    return pos / pos.sum(dim=1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# ITM hard negatives
# ---------------------------------------------------------------------------------------------


def sample_hard_negatives(
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    same_pair: Tensor | None = None,
    generator: torch.Generator | None = None,
    uniform: bool = False,
) -> tuple[Tensor, Tensor]:
    """Draw one hard negative per batch element for ITM, vectorised.

    Row b of ``sim_t2i`` scores text b against every in-batch image, so a negative image for
    text b is drawn with probability proportional to exp(sim_t2i[b, j]) over the eligible j;
    symmetrically a negative text for image b is drawn from ``sim_i2t[b]``. A column is eligible
    unless it is the diagonal (the positive itself) or ``same_pair[b, j]`` is True.

    The reference takes softmax over the whole row, zeroes the excluded entries and lets
    multinomial renormalise; taking the softmax over the eligible entries only is the same
    distribution, but cannot underflow to an all-zero row when an excluded entry (typically the
    diagonal) dominates. A tiny floor on eligible entries covers the remaining degenerate case
    (all eligible logits -inf).

    Args:
        sim_i2t: (B, B) in-batch image-to-text logits (the first B columns of the ITC sims).
            Detached here; sampling needs no gradient.
        sim_t2i: (B, B) in-batch text-to-image logits.
        same_pair: optional (B, B) bool; True where (i, j) must not be sampled (retrieval: the
            two items share an image id). Applied to both directions.
        generator: optional torch.Generator on the logits' device, for reproducible draws.
        uniform: draw uniformly among the eligible items instead (`objectives.itm_negatives: random`).

    Returns:
        (neg_image_index, neg_text_index), both (B,) long on the logits' device:
        neg_image_index[b] is the negative image for text b, neg_text_index[b] the negative
        text for image b.

    Raises:
        ValueError: if some row has no eligible candidate (B == 1, or every other item in the
            batch shares the row's image).
    """
    if sim_i2t.dim() != 2 or sim_i2t.shape[0] != sim_i2t.shape[1] or sim_t2i.shape != sim_i2t.shape:
        raise ValueError(
            f"sim_i2t and sim_t2i must both be square (B, B); got {tuple(sim_i2t.shape)} and "
            f"{tuple(sim_t2i.shape)}"
        )
    batch = sim_i2t.shape[0]
    device = sim_i2t.device
    eligible = ~torch.eye(batch, device=device, dtype=torch.bool)
    if same_pair is not None:
        if same_pair.dtype != torch.bool:
            raise TypeError(f"same_pair must be a bool tensor; got {same_pair.dtype}")
        if same_pair.shape != (batch, batch):
            raise ValueError(f"same_pair must be (B, B) = {(batch, batch)}; got {tuple(same_pair.shape)}")
        eligible = eligible & ~same_pair.to(device)

    # The one host sync of this function, once per call: torch.multinomial would fail with an
    # opaque message on an all-zero row, and a batch in which some item has no possible negative
    # is a data problem the caller must hear about.
    if not bool(eligible.any(dim=1).all()):
        raise ValueError(
            "sample_hard_negatives: some batch element has no eligible negative (batch size "
            f"{batch}; every other item is excluded by the diagonal or same_pair). ITM needs at "
            "least two distinct images in every batch."
        )

    def weights(sim: Tensor) -> Tensor:
        if uniform:
            return eligible.float()
        logits = sim.detach().float().masked_fill(~eligible, float("-inf"))
        probs = F.softmax(logits, dim=1).nan_to_num(nan=0.0)
        return torch.where(eligible, probs + _ELIGIBLE_WEIGHT_FLOOR, torch.zeros_like(probs))

    neg_image_index = torch.multinomial(weights(sim_t2i), 1, generator=generator).squeeze(1)
    neg_text_index = torch.multinomial(weights(sim_i2t), 1, generator=generator).squeeze(1)
    return neg_image_index, neg_text_index


# ---------------------------------------------------------------------------------------------
# MLM masking
# ---------------------------------------------------------------------------------------------


def mask_text_tokens(
    input_ids: Tensor,
    *,
    vocab_size: int,
    mask_token_id: int,
    protected_ids: Sequence[int],
    mlm_probability: float = 0.15,
    mask_ratio: float = 0.8,
    random_ratio: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT-style masking of a batch of token ids.

    Each position is selected with probability ``mlm_probability``; positions holding a
    protected id (the caller passes [PAD] and [CLS], as the reference does; [SEP] is not
    protected there) are never selected. Of the selected positions a fraction ``mask_ratio``
    becomes ``mask_token_id``; of the others a fraction ``random_ratio`` becomes a token drawn
    uniformly from [0, vocab_size) (the reference's range, special tokens included); the rest keep
    their id. With the defaults that is the classic 80/10/10 split.

    All random draws happen on the input's device (the reference draws on CPU and indexes CUDA
    tensors, which syncs); ``generator`` must therefore live on that device.

    Args:
        input_ids: (B, L) integer token ids. Not modified.
        vocab_size: size of the vocabulary for random replacements.
        mask_token_id: id of [MASK].
        protected_ids: ids that are never selected.
        mlm_probability: selection probability per position.
        mask_ratio: probability that a selected position becomes [MASK].
        random_ratio: probability that a selected, non-[MASK] position becomes a random token.
        generator: optional torch.Generator on the input's device.

    Returns:
        (masked_ids, labels), both (B, L) long on the input's device. labels holds the original
        id at selected positions and -100 elsewhere (the cross-entropy ignore index).
    """
    for name, value in (
        ("mlm_probability", mlm_probability),
        ("mask_ratio", mask_ratio),
        ("random_ratio", random_ratio),
    ):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1]; got {value}")
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive; got {vocab_size}")

    ids = input_ids.long()
    device = ids.device
    shape = ids.shape

    def bernoulli(p: float) -> Tensor:
        # rand is in [0, 1), so P(rand < p) == p exactly, including p == 0 and p == 1.
        return torch.rand(shape, device=device, generator=generator) < p

    protected = torch.isin(ids, torch.as_tensor(list(protected_ids), dtype=torch.long, device=device))
    selected = bernoulli(mlm_probability) & ~protected
    labels = ids.masked_fill(~selected, -100)

    to_mask = selected & bernoulli(mask_ratio)
    to_random = selected & ~to_mask & bernoulli(random_ratio)
    # Drawing a full (B, L) matrix of random ids and keeping only the chosen ones avoids a
    # data-dependent count (which would need a host sync); B x L is tiny next to a forward pass.
    random_ids = torch.randint(vocab_size, shape, device=device, generator=generator, dtype=torch.long)

    masked_ids = ids.masked_fill(to_mask, mask_token_id)
    masked_ids = torch.where(to_random, random_ids, masked_ids)
    return masked_ids, labels


# ---------------------------------------------------------------------------------------------
# MLM / MIM cross-entropy with momentum distillation
# ---------------------------------------------------------------------------------------------


def distilled_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor | None,
    alpha: float,
) -> Tensor:
    """(1 - alpha) * CE(logits, labels) + alpha * soft CE against the teacher's softmax.

    Used for MLM (rows = masked tokens, classes = vocabulary) and MIM (rows = masked patches,
    classes = visual codes). Both softmaxes are over the last (class) axis: simla fixes the
    reference MLM, which normalised over the sequence axis.

    Args:
        logits: (M, C) student logits for the M selected rows.
        labels: (M,) class ids; every row counts (select the rows before calling).
        teacher_logits: (M, C) momentum-teacher logits, or None.
        alpha: distillation weight.

    Returns:
        Scalar float32 loss. With M == 0 it is ``logits.sum() * 0.0``: an exact zero still
        attached to the graph, so backward and DDP's gradient bookkeeping work (the reference
        returns NaN). With no teacher or alpha == 0 it is the plain mean cross-entropy.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (M, C); got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must be (M,) = {tuple(logits.shape[:1])}; got {tuple(labels.shape)}")
    if teacher_logits is not None and teacher_logits.shape != logits.shape:
        raise ValueError(
            f"teacher_logits must match logits {tuple(logits.shape)}; got {tuple(teacher_logits.shape)}"
        )
    if logits.shape[0] == 0:
        # Shape is known on the host: no sync. mean() over zero rows would be NaN.
        return logits.sum() * 0.0

    # float32: under bf16 autocast the logits may be bf16, too coarse for a vocabulary softmax.
    log_probs = F.log_softmax(logits.float(), dim=-1)
    ce = F.nll_loss(log_probs, labels.long())
    if teacher_logits is None or alpha == 0:
        return ce
    soft = F.softmax(teacher_logits.detach().float(), dim=-1)
    distill = -(soft * log_probs).sum(dim=-1).mean()
    return (1 - alpha) * ce + alpha * distill


# ---------------------------------------------------------------------------------------------
# PSL keyword pseudo-labels
# ---------------------------------------------------------------------------------------------


def _pad_slots(ids: Tensor, num_keywords: int) -> Tensor:
    """Right-pad (B, k) ids with -1 to (B, num_keywords)."""
    missing = num_keywords - ids.shape[1]
    if missing <= 0:
        return ids
    return F.pad(ids, (0, missing), value=-1)


def select_psl_keywords(
    cls_attention: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    num_keywords: int = 5,
    votes_per_head: int = 4,
    excluded_ids: Sequence[int] = (0, 100, 101, 102, 103),
    reference: bool = False,
) -> Tensor:
    """Pick keyword token ids from the teacher's [CLS] self-attention by head voting.

    Every head votes for the ``votes_per_head`` key positions its [CLS] query attends to most;
    the ``num_keywords`` positions with the most votes give the keywords.

    ``reference=True`` reproduces the reference exactly: all L positions (including [CLS],
    [SEP] and padding) can be voted for and chosen, and ties / zero-vote positions are resolved
    however ``torch.topk`` resolves them. The only deviation: where the reference crashes because
    L < votes_per_head or L < num_keywords, this uses min(k, L) and fills the remaining slots
    with -1. ``attention_mask`` and ``excluded_ids`` are ignored in this mode.

    ``reference=False`` (default): padded positions (attention_mask 0) and
    positions holding an ``excluded_ids`` token get no votes; zero-vote positions are never
    chosen (their slot is -1); ranking is deterministic, with ties in attention (per head) and
    in vote counts broken by the earlier position; any L works.

    Duplicate ids may appear (the same word at two positions); they merge in
    :func:`psl_targets`.

    Args:
        cls_attention: (B, H, L) attention probabilities of the [CLS] query row, per head, of
            one layer of the teacher's self-attention.
        input_ids: (B, L) token ids the attention was computed on.
        attention_mask: (B, L) 1 for real tokens, 0 for padding.
        num_keywords: keyword slots per sample.
        votes_per_head: positions each head votes for.
        excluded_ids: token ids that can never be keywords (default: [PAD], [UNK], [CLS],
            [SEP], [MASK] of bert-base-uncased).
        reference: reproduce the reference selection (for parity tests).

    Returns:
        (B, num_keywords) long token ids, -1 in empty slots.
    """
    _check_psl_inputs(cls_attention, input_ids, attention_mask, num_keywords, votes_per_head)
    length = cls_attention.shape[2]
    ids = input_ids.long()
    per_head = min(votes_per_head, length)
    kept = min(num_keywords, length)
    if reference:
        keywords = _reference_keywords(cls_attention, ids, per_head, kept)
    else:
        keywords = _voted_keywords(cls_attention, ids, attention_mask, excluded_ids, per_head, kept)
    return _pad_slots(keywords, num_keywords)


def _check_psl_inputs(cls_attention: Tensor, input_ids: Tensor, attention_mask: Tensor, num_keywords: int,
                      votes_per_head: int) -> None:
    """Raise on inputs whose shapes or counts do not fit :func:`select_psl_keywords`."""
    if cls_attention.dim() != 3:
        raise ValueError(f"cls_attention must be (B, H, L); got {tuple(cls_attention.shape)}")
    batch, _, length = cls_attention.shape
    if input_ids.shape != (batch, length) or attention_mask.shape != (batch, length):
        raise ValueError(
            f"input_ids and attention_mask must be (B, L) = {(batch, length)}; got "
            f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    if num_keywords < 1 or votes_per_head < 1:
        raise ValueError(
            f"num_keywords and votes_per_head must be >= 1; got {num_keywords} and {votes_per_head}"
        )


def _reference_keywords(cls_attention: Tensor, ids: Tensor, per_head: int, kept: int) -> Tensor:
    """The reference's selection: (B, kept) ids, every position eligible, ties as torch.topk breaks them."""
    batch, heads, length = cls_attention.shape
    picks = cls_attention.topk(per_head, dim=-1).indices.reshape(batch, heads * per_head)
    votes = torch.zeros(batch, length, dtype=torch.long, device=ids.device)
    votes.scatter_add_(1, picks, torch.ones_like(picks))
    positions = votes.topk(kept, dim=1).indices
    return ids.gather(1, positions)


def _voted_keywords(cls_attention: Tensor, ids: Tensor, attention_mask: Tensor, excluded_ids: Sequence[int],
                    per_head: int, kept: int) -> Tensor:
    """simla's selection: (B, kept) ids, -1 where no eligible position got a vote; ties to the earlier position."""
    batch, heads, length = cls_attention.shape
    excluded = torch.as_tensor(list(excluded_ids), dtype=torch.long, device=ids.device)
    eligible = attention_mask.bool() & ~torch.isin(ids, excluded)  # (B, L)
    scores = cls_attention.float().masked_fill(~eligible[:, None, :], float("-inf"))
    # A stable descending sort instead of topk: identical picks except that equal attention
    # values resolve to the earlier position on every device. L is a caption length, so the
    # sort is cheap.
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    picks = order[..., :per_head].reshape(batch, heads * per_head)
    # When a row has fewer eligible positions than votes_per_head, the tail of the sort lands
    # on -inf (ineligible) positions; those picks carry no vote.
    weight = torch.isfinite(sorted_scores[..., :per_head]).reshape(batch, heads * per_head).long()
    votes = torch.zeros(batch, length, dtype=torch.long, device=ids.device)
    votes.scatter_add_(1, picks, weight)

    # Most votes first, earlier position first among equals.
    ranked_votes, positions = torch.sort(votes, dim=1, descending=True, stable=True)
    positions = positions[:, :kept]
    return ids.gather(1, positions).masked_fill(ranked_votes[:, :kept] == 0, -1)


def psl_targets(keyword_ids: Tensor, vocab_size: int, zero_ids: Sequence[int] = ()) -> Tensor:
    """Multi-hot PSL hard targets from keyword ids.

    Args:
        keyword_ids: (B, K) ids in [0, vocab_size), with -1 (any negative) for empty slots.
        vocab_size: V.
        zero_ids: vocabulary columns forced to 0 afterwards (the reference zeroes the [CLS]
            column, 101).

    Returns:
        (B, V) float32 tensor with 1 at every keyword id (duplicates merge).
    """
    if keyword_ids.dim() != 2:
        raise ValueError(f"keyword_ids must be (B, K); got {tuple(keyword_ids.shape)}")
    batch = keyword_ids.shape[0]
    ids = keyword_ids.long()
    # Route empty slots to an extra dump column that is cut off afterwards: a scatter with no
    # data-dependent indexing, so no host sync.
    index = torch.where(ids < 0, torch.full_like(ids, vocab_size), ids)
    targets = torch.zeros(batch, vocab_size + 1, dtype=torch.float32, device=ids.device)
    targets.scatter_(1, index, 1.0)
    targets = targets[:, :vocab_size]
    if len(zero_ids) > 0:
        targets[:, list(zero_ids)] = 0.0
    return targets


def psl_loss(logits: Tensor, hard_targets: Tensor, soft_targets: Tensor | None, alpha: float) -> Tensor:
    """PSL loss: (1 - alpha) * BCE(logits, hard) + alpha * BCE(logits, soft).

    Both BCE terms are means over all B x V elements, as in the reference (which makes the term
    numerically small; kept for faithfulness).

    Args:
        logits: (B, V) concept-head logits of the online model.
        hard_targets: (B, V) multi-hot keyword targets (:func:`psl_targets`).
        soft_targets: (B, V) probabilities (sigmoid of the momentum concept head), or None.
        alpha: distillation weight.

    Returns:
        Scalar float32 loss. With no soft targets or alpha == 0 it is the hard BCE alone.
    """
    if hard_targets.shape != logits.shape:
        raise ValueError(f"hard_targets must match logits {tuple(logits.shape)}; got {tuple(hard_targets.shape)}")
    if soft_targets is not None and soft_targets.shape != logits.shape:
        raise ValueError(f"soft_targets must match logits {tuple(logits.shape)}; got {tuple(soft_targets.shape)}")
    x = logits.float()
    hard = F.binary_cross_entropy_with_logits(x, hard_targets.float())
    if soft_targets is None or alpha == 0:
        return hard
    soft = F.binary_cross_entropy_with_logits(x, soft_targets.detach().float())
    return (1 - alpha) * hard + alpha * soft
