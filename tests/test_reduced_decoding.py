"""The training views' fast path: JPEGs decoded at the reduced scale the crop allows, the same views as from
the full decode (up to the resampling), EXIF-rotated photos handled, other formats decoded in full."""

from __future__ import annotations

import io
import random
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from simla.data.images import load_image
from simla.data.pixels import ResizeRegion
from simla.data.pretrain_data import SampleBuilder
from simla.data.readers import CaptionRecord
from simla.data.transforms import FinetuneView, PretrainViewConfig, PretrainViews
from simla.masking import BlockMaskGenerator

_EXIF_ORIENTATION = 0x0112


def _photo(width: int, height: int) -> Image.Image:
    """A smooth, asymmetric picture (so that resampling differences stay small and a wrong crop shows)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rgb = np.stack([x / width * 255, y / height * 255, 128 + 100 * np.sin(x / 41) * np.cos(y / 53)], axis=-1)
    return Image.fromarray(np.rint(rgb).astype(np.uint8))


def _jpeg(img: Image.Image, orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[_EXIF_ORIENTATION] = orientation
    img.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def test_jpeg_is_decoded_at_the_reduced_scale_asked_for() -> None:
    data = _jpeg(_photo(1200, 800))
    seen = []

    def wanted(size):
        seen.append(size)
        return (290, 190)  # at least this: libjpeg's 1/4 scale (300 x 200) is the smallest that fits

    img = load_image(data, decode_size=wanted)
    assert seen == [(1200, 800)] and img.size == (300, 200) and img.mode == "RGB"
    assert load_image(data, decode_size=lambda size: None).size == (1200, 800)
    assert load_image(data, decode_size=lambda size: (700, 500)).size == (1200, 800)  # 1/2 would be too small


def test_rotated_jpeg_reports_and_returns_the_upright_size() -> None:
    # Stored 1200 x 800 with orientation 6 (rotate 90 degrees): the picture is 800 wide, 1200 high.
    data = _jpeg(_photo(1200, 800), orientation=6)
    seen = []

    def wanted(size):
        seen.append(size)
        return (size[0] // 4, size[1] // 4)

    img = load_image(data, decode_size=wanted)
    assert seen == [(800, 1200)] and img.size == (200, 300)
    full = load_image(data)
    assert full.size == (800, 1200)
    reduced_back = np.asarray(img.resize(full.size, Image.Resampling.BILINEAR), dtype=np.float64)
    assert np.abs(reduced_back - np.asarray(full, dtype=np.float64)).mean() < 4  # same orientation, same picture


def test_other_formats_are_decoded_in_full_and_notes_describe_the_stored_image(tmp_path) -> None:
    path = tmp_path / "photo.png"
    _photo(1200, 800).save(path)
    seen = []
    img = load_image(path, decode_size=lambda size: seen.append(size) or (100, 100))
    assert seen == [(1200, 800)] and img.size == (1200, 800)
    notes: list[str] = []
    reduced = load_image(_jpeg(_photo(120, 100)), decode_size=lambda size: (10, 10), notes=notes)
    assert reduced.size == (15, 13) and "small" not in notes  # decoded at 1/8, below 16 px; stored at 120 x 100


def test_decode_size_must_be_callable() -> None:
    with pytest.raises(TypeError, match="decode_size"):
        load_image(_jpeg(_photo(64, 64)), decode_size=(10, 10))  # type: ignore[arg-type]


def test_region_asks_for_a_reduced_decode_only_when_the_crop_allows_it() -> None:
    whole = ResizeRegion(256)
    assert whole((1200, 800)) == (384, 256)  # the short side stays >= 256
    assert ResizeRegion(256)((500, 400)) is None  # less than 2x: decode everything
    cropped = ResizeRegion(256, ((0.2, 1.0), (3 / 4, 4 / 3)), random.Random(0))
    wanted = cropped((4000, 3000))
    top, left, h, w = cropped.box
    reduction = min(h, w) / 256
    assert wanted == (int(np.ceil(4000 / reduction)), int(np.ceil(3000 / reduction)))
    with pytest.raises(ValueError, match="rng"):
        ResizeRegion(256, ((0.2, 1.0), (3 / 4, 4 / 3)))


@pytest.mark.parametrize("shared", [True, False])
def test_pretrain_views_from_a_reader_equal_views_from_the_decoded_image(shared: bool) -> None:
    data = _jpeg(_photo(1600, 1200))
    decoded = load_image(data)
    views = PretrainViews(PretrainViewConfig(randaugment=False, shared_geometry=shared))
    sizes = []

    def reader(decode_size):
        img = load_image(data, decode_size=decode_size)
        sizes.append(img.size)
        return img

    reduced_count = 0
    for seed in range(8):
        from_reader = views(reader, random.Random(seed))
        from_image = views(decoded, random.Random(seed))  # the same draws: the same crop and flip
        for a, b in zip(from_reader, from_image):
            assert a.shape == b.shape
            assert (a - b).abs().mean() < 0.03, seed  # the same crop, resampled from fewer pixels
        reduced_count += sizes[-1] != (1600, 1200)
    assert reduced_count >= (4 if shared else 0)  # most crops of a 1600 px photo allow 1/2 or 1/4
    assert reduced_count == 0 or shared  # the reference's independent views decode everything


def test_finetune_view_reads_reduced_and_stays_deterministic() -> None:
    data = _jpeg(_photo(1600, 1200))
    for crop in (True, False):
        view = FinetuneView(image_size=128, crop=crop)
        first = view(partial(load_image, data), random.Random(3))
        again = view(partial(load_image, data), random.Random(3))
        full = view(load_image(data), random.Random(3))
        assert first.shape == (3, 128, 128) and torch.equal(first, again)
        assert (first - full).abs().mean() < 0.05  # normalised units: about 3 grey levels


def test_pretraining_samples_are_uint8_and_batches_normalise_like_the_views(tmp_path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(_jpeg(_photo(400, 300)))
    views = PretrainViews()
    builder = SampleBuilder(views, BlockMaskGenerator(16))
    record = CaptionRecord(str(path), ("a photo",), str(path))
    samples = [builder.build(record, random.Random(seed)) for seed in (5, 6)]
    assert all(s["image"].dtype == torch.uint8 and s["tokenizer_image"].dtype == torch.uint8 for s in samples)
    batch = builder.to_float({key: torch.stack([s[key] for s in samples]) for key in ("image", "tokenizer_image")})
    for row, seed in enumerate((5, 6)):  # one caption: the views draw first, as PretrainViews alone does
        encoder, tokenizer = views(partial(load_image, path), random.Random(seed))
        assert torch.allclose(batch["image"][row], encoder, atol=1e-5)
        assert torch.allclose(batch["tokenizer_image"][row], tokenizer, atol=1e-6)
