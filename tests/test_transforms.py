"""Pretraining views and RandAugment: shapes, determinism, token/patch alignment, op statistics."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from simla.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    GEOMETRIC_OPS,
    RANDAUGMENT_OPS,
    EvalView,
    Op,
    PretrainViewConfig,
    PretrainViews,
    RandAugment,
    sample_crop_box,
    to_tensor,
)

_MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def pattern() -> Image.Image:
    """A smooth, asymmetric 400x300 image: red grows to the right, green downwards, blue oscillates.

    Smooth so that resampling at two resolutions agrees closely; asymmetric so that a wrong crop,
    flip, shear or rotation is obvious.
    """
    y, x = np.mgrid[0:300, 0:400].astype(np.float64)
    rgb = np.stack([x / 400 * 255, y / 300 * 255, 128 + 100 * np.sin(x / 23) * np.cos(y / 31)], axis=-1)
    return Image.fromarray(np.rint(rgb).astype(np.uint8))


def _unnormalise(encoder_view: torch.Tensor) -> torch.Tensor:
    return encoder_view * _STD + _MEAN


def _pooled_gap(encoder_view: torch.Tensor, tokenizer_view: torch.Tensor) -> torch.Tensor:
    """|avg-pooled (un-normalised) encoder view - tokenizer view| per pixel."""
    pooled = F.avg_pool2d(_unnormalise(encoder_view)[None], 2)[0]
    return (pooled - tokenizer_view).abs()


# ---------------------------------------------------------------------------------------- pretrain views


@pytest.mark.parametrize("shared", [True, False])
def test_shapes_dtypes_ranges(pattern: Image.Image, shared: bool) -> None:
    views = PretrainViews(PretrainViewConfig(shared_geometry=shared))
    encoder, tokenizer = views(pattern, random.Random(0))
    assert encoder.shape == (3, 256, 256) and encoder.dtype == torch.float32
    assert tokenizer.shape == (3, 128, 128) and tokenizer.dtype == torch.float32
    assert tokenizer.min() >= 0.0 and tokenizer.max() <= 1.0
    # the encoder view is CLIP-normalised: it un-normalises into [0, 1] and goes below 0 itself
    restored = _unnormalise(encoder)
    assert restored.min() >= -1e-5 and restored.max() <= 1 + 1e-5 and encoder.min() < 0


def test_custom_sizes(pattern: Image.Image) -> None:
    views = PretrainViews(PretrainViewConfig(image_size=64, tokenizer_size=32))
    encoder, tokenizer = views(pattern, random.Random(1))
    assert encoder.shape == (3, 64, 64) and tokenizer.shape == (3, 32, 32)


@pytest.mark.parametrize("shared", [True, False])
def test_deterministic_given_seed(pattern: Image.Image, shared: bool) -> None:
    views = PretrainViews(PretrainViewConfig(shared_geometry=shared))
    torch.manual_seed(0)
    first = views(pattern, random.Random(1234))
    torch.manual_seed(99)  # the global generators must play no part
    random.seed(99)
    np.random.seed(99)
    second = views(pattern, random.Random(1234))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    other = views(pattern, random.Random(1235))
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])


def test_global_rngs_untouched(pattern: Image.Image) -> None:
    random.seed(5)
    torch.manual_seed(5)
    np.random.seed(5)
    expected = (random.random(), torch.rand(1).item(), np.random.rand())
    random.seed(5)
    torch.manual_seed(5)
    np.random.seed(5)
    PretrainViews()(pattern, random.Random(0))
    assert (random.random(), torch.rand(1).item(), np.random.rand()) == expected


def test_shared_views_aligned_without_randaugment(pattern: Image.Image) -> None:
    views = PretrainViews(PretrainViewConfig(randaugment=False))
    flips = 0
    for seed in range(40):
        rng = random.Random(seed)
        encoder, tokenizer = views(pattern, rng)
        gap = _pooled_gap(encoder, tokenizer)
        assert gap.mean() < 0.003 and gap.max() < 0.02, seed
        # red grows left to right in the source, so its direction tells whether this view was flipped
        flips += bool(tokenizer[0, :, 0].mean() > tokenizer[0, :, -1].mean())
    assert 8 <= flips <= 32  # flips happened (and not always), and alignment held through them


def test_views_match_torchvision_resized_crop_up_to_rounding(pattern: Image.Image) -> None:
    # The views resize with torch's uint8 kernel (and the tokenizer view from the encoder view): the same
    # antialiased bicubic crop as PIL's, up to rounding.
    config = PretrainViewConfig(randaugment=False, hflip_prob=0.0)
    bicubic = InterpolationMode.BICUBIC
    for seed in range(5):
        encoder, tokenizer = PretrainViews(config)(pattern, random.Random(seed))
        top, left, h, w = sample_crop_box(400, 300, config.scale, config.ratio, random.Random(seed))
        levels = (_unnormalise(encoder) - TF.to_tensor(TF.resized_crop(pattern, top, left, h, w, [256, 256], bicubic)))
        levels = levels.abs() * 255
        assert levels.max() <= 2 + 1e-3 and levels.mean() < 0.05, seed
        small = (tokenizer - TF.to_tensor(TF.resized_crop(pattern, top, left, h, w, [128, 128], bicubic))).abs() * 255
        assert small.max() <= 3 + 1e-3 and small.mean() < 0.5, seed


def test_shared_geometric_randaugment_keeps_alignment(pattern: Image.Image) -> None:
    # Only geometric ops, always applied: the tokenizer view must follow every shear/translate/rotate.
    ra = RandAugment(ops=sorted(GEOMETRIC_OPS), prob=1.0)
    views = PretrainViews(PretrainViewConfig(), randaugment=ra)
    for seed in range(25):
        gap = _pooled_gap(*views(pattern, random.Random(seed)))
        # Pixels at the fill border are partly covered at one resolution only, hence a percentile.
        assert gap.mean() < 0.006 and gap.flatten().quantile(0.98) < 0.02, seed


def test_shared_photometric_ops_only_touch_the_encoder(pattern: Image.Image) -> None:
    ra = RandAugment(ops=["Brightness"], prob=1.0, num_ops=1)
    encoder, tokenizer = PretrainViews(PretrainViewConfig(), randaugment=ra)(pattern, random.Random(3))
    plain_encoder, plain_tokenizer = PretrainViews(PretrainViewConfig(randaugment=False))(pattern, random.Random(3))
    assert torch.equal(tokenizer, plain_tokenizer)  # same crop/flip draws, no photometric op
    assert _unnormalise(encoder).mean() > _unnormalise(plain_encoder).mean() + 0.05


def test_reference_mode_views_are_independent(pattern: Image.Image) -> None:
    views = PretrainViews(PretrainViewConfig(randaugment=False, shared_geometry=False))
    gaps = [float(_pooled_gap(*views(pattern, random.Random(seed))).mean()) for seed in range(30)]
    # Independent crops almost never coincide; a shared crop gives < 0.003 (see the test above).
    assert sum(gap > 0.03 for gap in gaps) >= 27


def test_rejects_bad_inputs(pattern: Image.Image) -> None:
    views = PretrainViews()
    with pytest.raises(TypeError):
        views(pattern, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        views(pattern.convert("L"), random.Random(0))
    with pytest.raises(ValueError):
        PretrainViewConfig(scale=(0.0, 1.0))
    with pytest.raises(ValueError):
        PretrainViewConfig(hflip_prob=1.5)


# ------------------------------------------------------------------------------------------ crop box


def test_crop_box_within_bounds_and_ranges() -> None:
    rng = random.Random(0)
    for _ in range(500):
        top, left, h, w = sample_crop_box(400, 300, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
        assert 0.19 <= h * w / (400 * 300) <= 1.0
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02


def test_crop_box_fallback_is_central() -> None:
    # A 1000x10 strip: no 3/4..4/3 box with >= 50% of the area fits, so the central fallback is used.
    box = sample_crop_box(1000, 10, (0.5, 1.0), (3 / 4, 4 / 3), random.Random(0))
    assert box == (0, (1000 - 13) // 2, 10, 13)


# ------------------------------------------------------------------------------------------ RandAugment


def test_randaugment_reference_values() -> None:
    values = RandAugment().values
    assert values["Brightness"] == pytest.approx(1.36) and values["Sharpness"] == pytest.approx(1.36)
    assert values["ShearX"] == pytest.approx(0.21) and values["TranslateY"] == pytest.approx(7.0)
    assert values["Rotate"] == pytest.approx(21.0)


def test_randaugment_sampling_statistics() -> None:
    ra = RandAugment()
    rng = random.Random(0)
    trials = 20000
    names: Counter[str] = Counter()
    applied = repeats = negative_geometric = geometric = 0
    for _ in range(trials):
        ops = ra.sample(rng)
        assert len(ops) == 2
        repeats += ops[0].name == ops[1].name
        for op in ops:
            names[op.name] += 1
            applied += op.applied
            if op.geometric:
                geometric += 1
                negative_geometric += op.value < 0
            elif op.name in ("Brightness", "Sharpness"):
                assert op.value == pytest.approx(1.36)  # never a random sign
    assert set(names) == set(RANDAUGMENT_OPS)
    assert all(abs(count / (2 * trials) - 0.1) < 0.01 for count in names.values())
    assert abs(applied / (2 * trials) - 0.5) < 0.015
    assert abs(repeats / trials - 0.1) < 0.01  # with replacement: the same op twice ~1/10 of the time
    assert abs(negative_geometric / geometric - 0.5) < 0.02


def test_brightness_only_increases(pattern: Image.Image) -> None:
    ra = RandAugment(ops=["Brightness"], prob=1.0)
    rng = random.Random(0)
    before = np.asarray(pattern).astype(int)
    for _ in range(5):
        after = np.asarray(ra(pattern, rng)).astype(int)
        assert (after >= before).all() and (after > before).any()


def test_apply_respects_kinds(pattern: Image.Image) -> None:
    ra = RandAugment()
    ops = [Op("Brightness", True, 1.36), Op("Rotate", True, 21.0), Op("Equalize", False)]
    geometric_only = ra.apply(pattern, ops, photometric=False)
    assert np.array_equal(np.asarray(geometric_only), np.asarray(ra.apply(pattern, [ops[1]])))
    photometric_only = ra.apply(pattern, ops, geometric=False)
    assert np.array_equal(np.asarray(photometric_only), np.asarray(ra.apply(pattern, [ops[0]])))
    assert ra.apply(pattern, ops, photometric=False, geometric=False) is pattern
    # a fill of gray where the rotation uncovered the corner
    assert geometric_only.getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize(
    "op",
    [Op("ShearX", True, 0.21), Op("ShearY", True, -0.21), Op("TranslateX", True, 7.0),
     Op("TranslateY", True, -7.0), Op("Rotate", True, 21.0), Op("Rotate", True, -21.0)],
)  # fmt: skip
def test_geometric_op_consistent_across_resolutions(pattern: Image.Image, op: Op) -> None:
    ra = RandAugment()
    big = pattern.resize((256, 256), Image.Resampling.BICUBIC)
    small = pattern.resize((128, 128), Image.Resampling.BICUBIC)
    moved_big, moved_small = ra.apply(big, [op]), ra.apply(small, [op], scale=0.5)
    gap = _pooled_gap((to_tensor(moved_big) - _MEAN) / _STD, to_tensor(moved_small))
    assert gap.mean() < 0.004 and gap.flatten().quantile(0.99) < 0.02
    # the check has teeth: the opposite motion at the small resolution is far off
    flipped = Op(op.name, True, -op.value)
    wrong = _pooled_gap((to_tensor(moved_big) - _MEAN) / _STD, to_tensor(ra.apply(small, [flipped], scale=0.5)))
    assert wrong.mean() > 5 * gap.mean()


def test_randaugment_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        RandAugment(ops=["Solarize"])
    with pytest.raises(ValueError):
        RandAugment(prob=2.0)
    with pytest.raises(ValueError):
        RandAugment(magnitude=11)


# ------------------------------------------------------------------------------------------ eval view


def test_eval_view_matches_manual_pil(pattern: Image.Image) -> None:
    tensor = EvalView(96)(pattern)
    manual = np.asarray(pattern.resize((96, 96), Image.Resampling.BICUBIC)).astype(np.float32) / 255.0
    mean, std = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)
    expected = torch.from_numpy(((manual - mean) / std).transpose(2, 0, 1).copy())
    assert tensor.shape == (3, 96, 96) and tensor.dtype == torch.float32
    assert torch.allclose(tensor, expected, atol=1e-6)
    # and against torchvision's own Resize/ToTensor/Normalize
    reference = TF.normalize(TF.to_tensor(TF.resize(pattern, [96, 96], InterpolationMode.BICUBIC)), CLIP_MEAN, CLIP_STD)
    assert torch.allclose(tensor, reference, atol=1e-6)
