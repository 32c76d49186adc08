"""Tests for simla.objectives: the pure loss / target functions.

Reference values are computed independently with plain Python floats (math.exp / math.log over
nested lists), not with the functions under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from simla.objectives import (
    ItcOutput,
    distilled_cross_entropy,
    itc_loss,
    mask_text_tokens,
    psl_loss,
    psl_targets,
    sample_hard_negatives,
    select_psl_keywords,
)

# ---------------------------------------------------------------------------------------------
# plain-Python helpers
# ---------------------------------------------------------------------------------------------


def _matmul(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    return [[sum(a[i][k] * b[k][j] for k in range(len(b))) for j in range(len(b[0]))] for i in range(len(a))]


def _transpose(a: list[list[float]]) -> list[list[float]]:
    return [list(col) for col in zip(*a)]


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(x - m) for x in row]
    s = sum(e)
    return [x / s for x in e]


def _log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def _soft_ce(logits: list[list[float]], targets: list[list[float]]) -> float:
    total = 0.0
    for row, trow in zip(logits, targets):
        lp = _log_softmax(row)
        total += -sum(t * v for t, v in zip(trow, lp))
    return total / len(logits)


# ---------------------------------------------------------------------------------------------
# ITC
# ---------------------------------------------------------------------------------------------

# B=2, E=2, Q=3. Features are unit vectors (3-4-5 triangles) so the numbers are easy to read.
IMG = [[1.0, 0.0], [0.6, 0.8]]
TXT = [[0.8, 0.6], [0.0, 1.0]]
IMG_M = [[0.8, -0.6], [0.6, 0.8]]
TXT_M = [[1.0, 0.0], [-0.6, 0.8]]
# queue columns are past momentum features: (E, Q)
IMG_Q = [[0.0, -1.0, 0.6], [1.0, 0.0, -0.8]]
TXT_Q = [[1.0, 0.8, 0.0], [0.0, 0.6, -1.0]]
TEMP = 0.5


def _itc_reference(alpha: float, positives: list[list[bool]] | None = None) -> float:
    text_all = [r_m + r_q for r_m, r_q in zip(_transpose(TXT_M), TXT_Q)]  # (E, B+Q)
    image_all = [r_m + r_q for r_m, r_q in zip(_transpose(IMG_M), IMG_Q)]
    s_i2t = [[v / TEMP for v in row] for row in _matmul(IMG, text_all)]
    s_t2i = [[v / TEMP for v in row] for row in _matmul(TXT, image_all)]
    sm_i2t = [[v / TEMP for v in row] for row in _matmul(IMG_M, text_all)]
    sm_t2i = [[v / TEMP for v in row] for row in _matmul(TXT_M, image_all)]
    width = len(s_i2t[0])
    if positives is None:
        hard = [[1.0 if j == i else 0.0 for j in range(width)] for i in range(2)]
    else:
        hard = [[float(p) / sum(row) for p in row] for row in positives]

    def targets(sim_m: list[list[float]]) -> list[list[float]]:
        return [
            [alpha * p + (1 - alpha) * h for p, h in zip(_softmax(srow), hrow)]
            for srow, hrow in zip(sim_m, hard)
        ]

    return 0.5 * (_soft_ce(s_i2t, targets(sm_i2t)) + _soft_ce(s_t2i, targets(sm_t2i)))


def _itc_inputs(requires_grad: bool = False) -> dict[str, torch.Tensor]:
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    image_feat = t(IMG).requires_grad_(requires_grad)
    text_feat = t(TXT).requires_grad_(requires_grad)
    temp = torch.tensor(TEMP, dtype=torch.float64, requires_grad=requires_grad)
    return dict(
        image_feat=image_feat,
        text_feat=text_feat,
        image_feat_m=t(IMG_M),
        text_feat_m=t(TXT_M),
        image_queue=t(IMG_Q),
        text_queue=t(TXT_Q),
        temp=temp,
    )


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_itc_loss_matches_hand_computation(alpha: float) -> None:
    out = itc_loss(**_itc_inputs(), alpha=alpha)
    assert isinstance(out, ItcOutput)
    assert out.loss.dim() == 0
    assert out.sim_i2t.shape == (2, 5) and out.sim_t2i.shape == (2, 5)
    assert out.loss.item() == pytest.approx(_itc_reference(alpha), rel=1e-6)


def test_itc_logits_are_divided_by_temperature() -> None:
    out = itc_loss(**_itc_inputs(), alpha=0.0)
    # image 0 = (1, 0) against text column 0 = text_feat_m[0] = (1, 0): cos 1 -> 1 / 0.5 = 2
    assert out.sim_i2t[0, 0].item() == pytest.approx(2.0)
    # image 1 = (0.6, 0.8) against text queue column 1 = (0.8, 0.6): 0.96 / 0.5
    assert out.sim_i2t[1, 3].item() == pytest.approx(1.92)
    # text 1 = (0, 1) against image queue column 2 = (0.6, -0.8): -0.8 / 0.5
    assert out.sim_t2i[1, 4].item() == pytest.approx(-1.6)


def test_itc_alpha_zero_value_written_out() -> None:
    # A fully hand-written check of the i2t/t2i hard-target loss for alpha = 0.
    # i2t rows (logits): image0: [2.0, -1.2, 2.0, 1.6, 0.0]; image1: [1.2, 0.56, 1.2, 1.92, -1.6]
    # t2i rows:          text0:  [0.56, 1.92, 1.2, -1.6, -0.0]; text1: [-1.2, 1.6, 2.0, 0.0, -1.6]
    i2t = [[2.0, -1.2, 2.0, 1.6, 0.0], [1.2, 0.56, 1.2, 1.92, -1.6]]
    t2i = [[0.56, 1.92, 1.2, -1.6, 0.0], [-1.2, 1.6, 2.0, 0.0, -1.6]]

    def nll(row: list[float], j: int) -> float:
        return math.log(sum(math.exp(v) for v in row)) - row[j]

    expected = 0.5 * ((nll(i2t[0], 0) + nll(i2t[1], 1)) / 2 + (nll(t2i[0], 0) + nll(t2i[1], 1)) / 2)
    out = itc_loss(**_itc_inputs(), alpha=0.0)
    torch.testing.assert_close(out.sim_i2t, torch.tensor(i2t, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.sim_t2i, torch.tensor(t2i, dtype=torch.float64), rtol=0, atol=1e-12)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_itc_multi_positive(alpha: float) -> None:
    # Row 0 shares its image with in-batch item 1 and queue entry 2 (column 2 + 2 = 4);
    # row 1 with item 0 and queue entry 0 (column 2).
    positives = [
        [True, True, False, False, True],
        [True, True, True, False, False],
    ]
    mask = torch.tensor(positives)
    out = itc_loss(**_itc_inputs(), alpha=alpha, positive_mask=mask)
    assert out.loss.item() == pytest.approx(_itc_reference(alpha, positives), rel=1e-6)
    # identity mask reproduces the default targets
    eye = torch.eye(2, 5, dtype=torch.bool)
    same = itc_loss(**_itc_inputs(), alpha=alpha, positive_mask=eye)
    default = itc_loss(**_itc_inputs(), alpha=alpha)
    assert same.loss.item() == pytest.approx(default.loss.item(), rel=1e-12)


def test_itc_positive_mask_always_counts_own_pair() -> None:
    # A mask that forgets the diagonal is treated as if it had it (no NaN from a 0 normaliser).
    empty = torch.zeros(2, 5, dtype=torch.bool)
    out = itc_loss(**_itc_inputs(), alpha=0.0, positive_mask=empty)
    assert out.loss.item() == pytest.approx(_itc_reference(0.0), rel=1e-6)


def test_itc_gradients_reach_online_features_and_temp_only() -> None:
    inputs = _itc_inputs(requires_grad=True)
    assert not inputs["image_feat_m"].requires_grad
    out = itc_loss(**inputs, alpha=0.4)
    assert out.sim_i2t.requires_grad
    out.loss.backward()
    for name in ("image_feat", "text_feat", "temp"):
        grad = inputs[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    for name in ("image_feat_m", "text_feat_m", "image_queue", "text_queue"):
        assert inputs[name].grad is None


def test_itc_momentum_inputs_requiring_grad_get_no_gradient() -> None:
    inputs = _itc_inputs(requires_grad=True)
    inputs["image_feat_m"].requires_grad_(True)
    out = itc_loss(**inputs, alpha=0.4)
    out.loss.backward()
    assert inputs["image_feat_m"].grad is None


def test_itc_temperature_gradient_ignores_targets() -> None:
    # The targets are constants: d loss / d temp must equal that of a loss with frozen targets.
    inputs = _itc_inputs(requires_grad=True)
    out = itc_loss(**inputs, alpha=0.4)
    (grad_temp,) = torch.autograd.grad(out.loss, inputs["temp"])

    temp = inputs["temp"]
    text_all = torch.cat([inputs["text_feat_m"].t(), inputs["text_queue"]], 1)
    image_all = torch.cat([inputs["image_feat_m"].t(), inputs["image_queue"]], 1)
    with torch.no_grad():
        hard = torch.eye(2, 5, dtype=torch.float64)
        t_i2t = 0.4 * (inputs["image_feat_m"] @ text_all / TEMP).softmax(1) + 0.6 * hard
        t_t2i = 0.4 * (inputs["text_feat_m"] @ image_all / TEMP).softmax(1) + 0.6 * hard
    s_i2t = inputs["image_feat"] @ text_all / temp
    s_t2i = inputs["text_feat"] @ image_all / temp
    manual = 0.5 * (
        -(t_i2t * s_i2t.log_softmax(1)).sum(1).mean() - (t_t2i * s_t2i.log_softmax(1)).sum(1).mean()
    )
    (grad_manual,) = torch.autograd.grad(manual, temp)
    torch.testing.assert_close(grad_temp.double(), grad_manual)


def test_itc_shape_errors() -> None:
    inputs = _itc_inputs()
    with pytest.raises(ValueError):
        itc_loss(**{**inputs, "image_queue": torch.zeros(3, 3, dtype=torch.float64)}, alpha=0.0)
    with pytest.raises(ValueError):
        itc_loss(**inputs, alpha=0.0, positive_mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError):
        itc_loss(**inputs, alpha=0.0, positive_mask=torch.ones(2, 5))


# ---------------------------------------------------------------------------------------------
# hard negatives
# ---------------------------------------------------------------------------------------------


def test_hard_negatives_never_diagonal_or_same_pair() -> None:
    gen = torch.Generator().manual_seed(0)
    batch = 6
    sims = torch.randn(batch, batch, generator=gen)
    sims.diagonal().add_(10.0)  # the positive dominates, as in training
    image_id = torch.tensor([0, 0, 1, 2, 2, 3])
    same = image_id[:, None] == image_id[None, :]
    seen_img = torch.zeros(batch, batch, dtype=torch.long)
    seen_txt = torch.zeros(batch, batch, dtype=torch.long)
    for _ in range(200):
        neg_img, neg_txt = sample_hard_negatives(sims, sims.t().contiguous(), same_pair=same, generator=gen)
        assert neg_img.dtype == torch.long and neg_txt.dtype == torch.long
        assert neg_img.shape == (batch,) and neg_txt.shape == (batch,)
        seen_img[torch.arange(batch), neg_img] += 1
        seen_txt[torch.arange(batch), neg_txt] += 1
    assert seen_img[same].sum() == 0  # includes the diagonal
    assert seen_txt[same].sum() == 0
    # every eligible pair is reachable
    assert (seen_img[~same] + seen_txt[~same] > 0).all()


def test_hard_negatives_without_same_pair_excludes_diagonal_only() -> None:
    gen = torch.Generator().manual_seed(1)
    sims = torch.zeros(3, 3)
    sims.fill_diagonal_(50.0)
    hits = torch.zeros(3, 3, dtype=torch.long)
    for _ in range(100):
        neg_img, _ = sample_hard_negatives(sims, sims, generator=gen)
        hits[torch.arange(3), neg_img] += 1
    assert hits.diagonal().sum() == 0
    assert (hits + torch.eye(3, dtype=torch.long) > 0).all()


def test_hard_negative_frequencies_follow_softmax() -> None:
    gen = torch.Generator().manual_seed(2)
    batch = 16
    # Row b gives column j (j != b) the logit log(w) with w = (j - b) mod B in 1..B-1, so every
    # row has the same weights 1..15, cyclically shifted; counts can then be pooled by weight.
    b_idx = torch.arange(batch)[:, None]
    j_idx = torch.arange(batch)[None, :]
    weight = (j_idx - b_idx) % batch  # 0 on the diagonal
    sim_t2i = weight.clamp(min=1).double().log().float()
    sim_t2i.fill_diagonal_(30.0)  # dominant but excluded
    weight_i2t = (b_idx - j_idx) % batch  # the mirrored layout for the other direction
    sim_i2t = weight_i2t.clamp(min=1).double().log().float()
    sim_i2t.fill_diagonal_(30.0)
    calls = 500
    pooled_img = torch.zeros(batch, dtype=torch.long)
    pooled_txt = torch.zeros(batch, dtype=torch.long)
    rows = torch.arange(batch)
    for _ in range(calls):
        neg_img, neg_txt = sample_hard_negatives(sim_i2t, sim_t2i, generator=gen)
        pooled_img += torch.bincount(weight[rows, neg_img], minlength=batch)
        pooled_txt += torch.bincount(weight_i2t[rows, neg_txt], minlength=batch)
    total_weight = sum(range(1, batch))
    for pooled in (pooled_img, pooled_txt):
        assert pooled[0] == 0  # never the diagonal
        expected = [calls * batch * w / total_weight for w in range(1, batch)]
        observed = pooled[1:].tolist()
        chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
        assert chi2 < 45.0, (observed, expected)  # df = 14; p(chi2 > 45) ~ 4e-5


def test_hard_negatives_survive_softmax_underflow() -> None:
    gen = torch.Generator().manual_seed(3)
    batch = 5
    # Diagonal 1e4 above everything: a full-row softmax underflows to exactly 0 off the diagonal.
    sims = torch.zeros(batch, batch)
    sims.fill_diagonal_(1e4)
    assert (torch.softmax(sims, 1) * (1 - torch.eye(batch))).sum() == 0
    # Eligible logits that are themselves wildly apart: the best one must win.
    spread = torch.full((batch, batch), -1e4)
    spread.fill_diagonal_(1e4)
    spread[:, 0] = -5e3
    spread[0, 1] = -5e3
    for _ in range(50):
        neg_img, neg_txt = sample_hard_negatives(sims, sims, generator=gen)
        assert (neg_img != torch.arange(batch)).all() and (neg_txt != torch.arange(batch)).all()
        neg_img, _ = sample_hard_negatives(spread, spread, generator=gen)
        assert neg_img.tolist() == [1, 0, 0, 0, 0]
    # Even all-(-inf) eligible logits still sample an eligible column.
    inf = torch.full((3, 3), float("-inf"))
    inf.fill_diagonal_(0.0)
    neg_img, neg_txt = sample_hard_negatives(inf, inf, generator=gen)
    assert (neg_img != torch.arange(3)).all() and (neg_txt != torch.arange(3)).all()


def test_hard_negatives_do_not_need_grad_and_detach() -> None:
    sims = torch.randn(4, 4, requires_grad=True)
    neg_img, neg_txt = sample_hard_negatives(sims, sims * 2, generator=torch.Generator().manual_seed(0))
    assert not neg_img.requires_grad and not neg_txt.requires_grad


def test_hard_negatives_reproducible_with_generator() -> None:
    sims = torch.randn(8, 8, generator=torch.Generator().manual_seed(5))
    a = sample_hard_negatives(sims, sims.t(), generator=torch.Generator().manual_seed(9))
    b = sample_hard_negatives(sims, sims.t(), generator=torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_hard_negatives_raise_without_candidates() -> None:
    with pytest.raises(ValueError, match="no eligible negative"):
        sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, 1))
    same = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="no eligible negative"):
        sample_hard_negatives(torch.zeros(3, 3), torch.zeros(3, 3), same_pair=same)
    # one row without candidates is enough
    same = torch.zeros(3, 3, dtype=torch.bool)
    same[2, :] = True
    with pytest.raises(ValueError):
        sample_hard_negatives(torch.zeros(3, 3), torch.zeros(3, 3), same_pair=same)
    with pytest.raises(ValueError):
        sample_hard_negatives(torch.zeros(3, 4), torch.zeros(3, 4))


# ---------------------------------------------------------------------------------------------
# MLM masking
# ---------------------------------------------------------------------------------------------

V = 30522
PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103


def _caption_batch(rows: int = 200, cols: int = 100, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, V, (rows, cols), generator=gen)
    ids[:, 0] = CLS
    lengths = torch.randint(10, cols + 1, (rows,), generator=gen)
    pos = torch.arange(cols)[None, :]
    ids[pos >= lengths[:, None]] = PAD
    ids[torch.arange(rows), lengths - 1] = SEP
    return ids


def test_mask_text_tokens_rules_and_proportions() -> None:
    ids = _caption_batch()
    original = ids.clone()
    gen = torch.Generator().manual_seed(123)
    masked, labels = mask_text_tokens(ids, vocab_size=V, mask_token_id=MASK, protected_ids=[PAD, CLS], generator=gen)
    assert torch.equal(ids, original)  # input untouched
    assert masked.dtype == torch.long and labels.dtype == torch.long
    assert masked.shape == ids.shape and labels.shape == ids.shape

    selected = labels != -100
    protected = (ids == PAD) | (ids == CLS)
    assert not (selected & protected).any()
    assert torch.equal(masked[protected], ids[protected])
    # labels hold the original id where selected
    assert torch.equal(labels[selected], ids[selected])
    # unselected positions are unchanged
    assert torch.equal(masked[~selected], ids[~selected])
    # [SEP] is not protected (reference behaviour)
    assert (selected & (ids == SEP)).any()

    n_candidates = (~protected).sum().item()
    n_sel = selected.sum().item()
    assert abs(n_sel / n_candidates - 0.15) < 0.015

    is_mask = selected & (masked == MASK)
    is_random = selected & (masked != MASK) & (masked != ids)
    is_kept = selected & (masked == ids)
    assert abs(is_mask.sum().item() / n_sel - 0.8) < 0.03
    assert abs(is_random.sum().item() / n_sel - 0.1) < 0.02
    assert abs(is_kept.sum().item() / n_sel - 0.1) < 0.02
    assert ((masked >= 0) & (masked < V)).all()


def test_mask_text_tokens_random_ids_cover_range() -> None:
    ids = torch.full((200, 100), 5000, dtype=torch.long)
    gen = torch.Generator().manual_seed(7)
    vocab = 50
    masked, labels = mask_text_tokens(
        ids, vocab_size=vocab, mask_token_id=9999, protected_ids=[], mlm_probability=1.0, mask_ratio=0.0,
        random_ratio=1.0, generator=gen,
    )
    assert (labels == 5000).all()
    assert masked.min() >= 0 and masked.max() < vocab
    assert torch.unique(masked).numel() == vocab  # uniform over [0, V), all values hit


def test_mask_text_tokens_extremes_and_dtype() -> None:
    ids = _caption_batch(20, 30).int()
    masked, labels = mask_text_tokens(ids, vocab_size=V, mask_token_id=MASK, protected_ids=[PAD, CLS], mlm_probability=0.0)
    assert masked.dtype == torch.long
    assert (labels == -100).all() and torch.equal(masked, ids.long())
    masked, labels = mask_text_tokens(ids, vocab_size=V, mask_token_id=MASK, protected_ids=[PAD, CLS], mlm_probability=1.0, mask_ratio=1.0)
    protected = (ids == PAD) | (ids == CLS)
    assert (masked[~protected] == MASK).all() and (labels[protected] == -100).all()
    with pytest.raises(ValueError):
        mask_text_tokens(ids, vocab_size=V, mask_token_id=MASK, protected_ids=[], mlm_probability=1.5)


def test_mask_text_tokens_reproducible() -> None:
    ids = _caption_batch(10, 20)
    a = mask_text_tokens(ids, vocab_size=V, mask_token_id=MASK, protected_ids=[PAD, CLS], generator=torch.Generator().manual_seed(4))
    b = mask_text_tokens(ids, vocab_size=V, mask_token_id=MASK, protected_ids=[PAD, CLS], generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------------------------------------
# distilled cross-entropy
# ---------------------------------------------------------------------------------------------

LOGITS = [[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 3.0, -2.0], [-1.0, 1.5, 0.3, 0.3]]
TEACHER = [[1.0, 1.0, 0.0, -1.0], [0.0, 0.5, 2.5, 0.0], [0.2, 2.0, -0.5, 0.1]]
LABELS = [0, 2, 3]


def _manual_dce(alpha: float) -> float:
    ce = sum(-_log_softmax(row)[y] for row, y in zip(LOGITS, LABELS)) / len(LOGITS)
    distill = _soft_ce(LOGITS, [_softmax(r) for r in TEACHER])
    return (1 - alpha) * ce + alpha * distill


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_distilled_cross_entropy_manual(alpha: float) -> None:
    out = distilled_cross_entropy(torch.tensor(LOGITS), torch.tensor(LABELS), torch.tensor(TEACHER), alpha)
    assert out.dim() == 0
    assert out.item() == pytest.approx(_manual_dce(alpha), rel=1e-5)


def test_distilled_cross_entropy_normalises_over_classes() -> None:
    # The sequence-axis variant of the reference (softmax over rows) gives a different number.
    logits, teacher = torch.tensor(LOGITS), torch.tensor(TEACHER)
    wrong = -(teacher.softmax(-1) * logits.log_softmax(0)).sum(-1).mean()
    right = distilled_cross_entropy(logits, torch.tensor(LABELS), teacher, 1.0)
    assert right.item() == pytest.approx(_manual_dce(1.0), rel=1e-5)
    assert abs(right.item() - wrong.item()) > 1e-3


def test_distilled_cross_entropy_without_teacher_is_ce() -> None:
    logits = torch.randn(7, 11)
    labels = torch.randint(11, (7,))
    teacher = torch.randn(7, 11)
    ref = F.cross_entropy(logits, labels)
    torch.testing.assert_close(distilled_cross_entropy(logits, labels, teacher, 0.0), ref)
    torch.testing.assert_close(distilled_cross_entropy(logits, labels, None, 0.4), ref)


def test_distilled_cross_entropy_empty_is_zero_with_graph() -> None:
    logits = torch.zeros(0, 5, requires_grad=True)
    out = distilled_cross_entropy(logits, torch.zeros(0, dtype=torch.long), torch.zeros(0, 5), 0.4)
    assert out.item() == 0.0 and not torch.isnan(out)
    assert out.requires_grad
    out.backward()
    assert logits.grad is not None and logits.grad.shape == (0, 5)


def test_distilled_cross_entropy_gradient_only_to_student() -> None:
    logits = torch.tensor(LOGITS, requires_grad=True)
    teacher = torch.tensor(TEACHER, requires_grad=True)
    distilled_cross_entropy(logits, torch.tensor(LABELS), teacher, 0.4).backward()
    assert logits.grad is not None and teacher.grad is None


# ---------------------------------------------------------------------------------------------
# PSL keyword selection
# ---------------------------------------------------------------------------------------------


def _select(att, ids, mask, **kw):  # type: ignore[no-untyped-def]
    return select_psl_keywords(
        torch.tensor(att, dtype=torch.float32), torch.tensor(ids), torch.tensor(mask), **kw
    )


def test_psl_special_tokens_win_in_reference_only() -> None:
    ids = [[CLS, 1010, 2000, 3000, SEP, PAD, PAD, PAD]]
    mask = [[1, 1, 1, 1, 1, 0, 0, 0]]
    att = [[
        [0.30, 0.05, 0.10, 0.02, 0.25, 0.15, 0.08, 0.05],  # head 0: CLS, SEP, pad, word 2000, ...
        [0.28, 0.12, 0.03, 0.06, 0.35, 0.04, 0.10, 0.02],  # head 1: SEP, CLS, word 1010, pad, ...
    ]]
    ref = _select(att, ids, mask, num_keywords=2, votes_per_head=2, reference=True)
    assert sorted(ref[0].tolist()) == [CLS, SEP]  # both got 2 votes, nothing else got any
    default = _select(att, ids, mask, num_keywords=2, votes_per_head=2)
    # eligible: positions 1..3. head 0 votes 2, 1; head 1 votes 1, 3 -> 1010 (2 votes), then
    # 2000 and 3000 tie at 1 vote -> the earlier position (2000) wins.
    assert default.tolist() == [[1010, 2000]]


def test_psl_short_caption_fewer_voted_positions() -> None:
    ids = [[CLS, 5000, SEP, PAD, PAD, PAD, PAD, PAD]]
    mask = [[1, 1, 1, 0, 0, 0, 0, 0]]
    att = [[[0.40, 0.10, 0.30, 0.06, 0.05, 0.04, 0.03, 0.02]]]
    default = _select(att, ids, mask)
    assert default.tolist() == [[5000, -1, -1, -1, -1]]
    ref = _select(att, ids, mask, reference=True)
    # votes: positions 0..3 one each; the fifth slot is a zero-vote padding position.
    values = ref[0].tolist()
    assert -1 not in values
    assert sorted(values[:4]) == sorted([CLS, 5000, SEP, PAD])
    assert values[4] == PAD


@pytest.mark.parametrize("reference", [False, True])
def test_psl_short_length_does_not_crash(reference: bool) -> None:
    ids = [[CLS, 7000, SEP]]
    mask = [[1, 1, 1]]
    att = [[[0.5, 0.2, 0.3], [0.1, 0.6, 0.3]]]
    out = _select(att, ids, mask, num_keywords=5, votes_per_head=4, reference=reference)
    assert out.shape == (1, 5) and out.dtype == torch.long
    if reference:
        # every position got 2 votes (L < votes_per_head): all three chosen, two empty slots
        assert sorted(out[0, :3].tolist()) == sorted([CLS, 7000, SEP])
        assert out[0, 3:].tolist() == [-1, -1]
    else:
        assert out.tolist() == [[7000, -1, -1, -1, -1]]


def test_psl_ties_break_by_earlier_position() -> None:
    ids = [[CLS, 11, 12, 13, 14, SEP]]
    mask = [[1] * 6]
    att = [[
        [0.0, 0.1, 0.1, 0.1, 0.6, 0.1],  # votes 14
        [0.0, 0.1, 0.1, 0.6, 0.1, 0.1],  # votes 13
        [0.0, 0.6, 0.1, 0.1, 0.1, 0.1],  # votes 11
        [0.0, 0.1, 0.1, 0.1, 0.6, 0.1],  # votes 14
    ]]
    out = _select(att, ids, mask, num_keywords=5, votes_per_head=1)
    # 14 has two votes; 11 and 13 one each (earlier first); 12 none.
    assert out.tolist() == [[14, 11, 13, -1, -1]]
    # equal attention inside a head also resolves to the earlier position
    flat = [[[0.2, 0.2, 0.2, 0.2, 0.2, 0.0]]]
    assert _select(flat, ids, mask, num_keywords=2, votes_per_head=1).tolist() == [[11, -1]]
    assert _select(flat, ids, mask, num_keywords=1, votes_per_head=2).tolist() == [[11]]


def test_psl_padded_batch_matches_unpadded_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    heads, length = 12, 9
    ids = torch.tensor([
        [CLS, 21, 22, 23, 24, 25, 26, 27, SEP],
        [CLS, 31, 32, SEP, PAD, PAD, PAD, PAD, PAD],
    ])
    mask = (ids != PAD).long()
    att = torch.rand(2, heads, length, generator=gen)
    att[1, :, 4:] += 5.0  # padding attracts attention; it must still get no votes
    att = att.softmax(-1)
    out = select_psl_keywords(att, ids, mask)
    assert out.shape == (2, 5)
    assert not torch.isin(out, torch.tensor([PAD, CLS, SEP])).any()
    assert out[1].tolist()[2:] == [-1, -1, -1] and set(out[1].tolist()[:2]) <= {31, 32}
    # default mode is independent of how much padding follows a caption
    for b, n in ((0, 9), (1, 4)):
        alone = select_psl_keywords(att[b : b + 1, :, :n], ids[b : b + 1, :n], mask[b : b + 1, :n])
        assert torch.equal(alone, out[b : b + 1])
    # reference mode on the padded batch does pick pads for the short row
    ref = select_psl_keywords(att, ids, mask, reference=True)
    assert (ref[1] == PAD).any()


def test_psl_excluded_ids_configurable() -> None:
    ids = [[CLS, 1996, 4937, SEP]]  # "the cat"
    mask = [[1, 1, 1, 1]]
    att = [[[0.1, 0.5, 0.3, 0.1]]]
    assert _select(att, ids, mask, num_keywords=1, votes_per_head=2).tolist() == [[1996]]
    out = _select(att, ids, mask, num_keywords=1, votes_per_head=2, excluded_ids=(0, 101, 102, 1996))
    assert out.tolist() == [[4937]]


# ---------------------------------------------------------------------------------------------
# PSL targets and loss
# ---------------------------------------------------------------------------------------------


def test_psl_targets() -> None:
    kw = torch.tensor([[5, 2, -1, 5], [0, 1, 3, -1], [-1, -1, -1, -1]])
    out = psl_targets(kw, 6, zero_ids=(1,))
    assert out.dtype == torch.float32 and out.shape == (3, 6)
    expected = torch.tensor([
        [0, 0, 1, 0, 0, 1],
        [1, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 0],
    ], dtype=torch.float32)
    assert torch.equal(out, expected)
    assert torch.equal(psl_targets(kw, 6)[1], torch.tensor([1, 1, 0, 1, 0, 0], dtype=torch.float32))


def _manual_bce(x: list[list[float]], y: list[list[float]]) -> float:
    total, n = 0.0, 0
    for xr, yr in zip(x, y):
        for xi, yi in zip(xr, yr):
            p = 1 / (1 + math.exp(-xi))
            total += -(yi * math.log(p) + (1 - yi) * math.log(1 - p))
            n += 1
    return total / n


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_psl_loss_manual(alpha: float) -> None:
    x = [[0.5, -1.0, 2.0], [0.0, 1.5, -0.3]]
    hard = [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    soft = [[0.7, 0.1, 0.6], [0.2, 0.9, 0.4]]
    out = psl_loss(torch.tensor(x), torch.tensor(hard), torch.tensor(soft), alpha)
    expected = (1 - alpha) * _manual_bce(x, hard) + alpha * _manual_bce(x, soft)
    assert out.item() == pytest.approx(expected, rel=1e-5)
    no_soft = psl_loss(torch.tensor(x), torch.tensor(hard), None, alpha)
    assert no_soft.item() == pytest.approx(_manual_bce(x, hard), rel=1e-5)


def test_psl_end_to_end_gradient() -> None:
    ids = torch.tensor([[CLS, 40, 41, SEP, PAD]])
    att = torch.tensor([[[0.1, 0.4, 0.3, 0.15, 0.05]]])
    kw = select_psl_keywords(att, ids, (ids != PAD).long(), num_keywords=3, votes_per_head=2)
    hard = psl_targets(kw, 50, zero_ids=(CLS % 50,))
    assert hard[0, 40] == 1 and hard[0, 41] == 1 and hard.sum() == 2
    logits = torch.zeros(1, 50, requires_grad=True)
    psl_loss(logits, hard, torch.full((1, 50), 0.5), 0.4).backward()
    assert logits.grad is not None and logits.grad[0, 40] < 0


def test_random_negatives_ignore_similarity_but_keep_exclusions() -> None:
    """itm_negatives=random: every eligible column equally often, however similar; excluded ones never."""
    gen = torch.Generator().manual_seed(3)
    batch = 6
    sim = torch.zeros(batch, batch)
    sim[:, 1] = 50.0  # a hard sampler would pick column 1 almost always
    same_pair = torch.zeros(batch, batch, dtype=torch.bool)
    same_pair[:, 2] = True
    same_pair[2, :] = True
    same_pair[2, 0] = False  # row 2 keeps one candidate
    counts = torch.zeros(batch, batch)
    for _ in range(600):
        neg_img, neg_txt = sample_hard_negatives(sim, sim, same_pair=same_pair, generator=gen, uniform=True)
        counts[torch.arange(batch), neg_img] += 1
        assert not same_pair[torch.arange(batch), neg_txt].any()
    assert counts.diagonal().sum() == 0 and counts[:, 2].sum() == 0 and counts[2, 0] == 600
    row0 = counts[0, [1, 3, 4, 5]]
    assert row0.min() > 100 and row0.max() < 200  # ~150 each, column 1 not favoured
