"""load_image: every data problem is a BadSampleError, every valid mode becomes a sensible RGB image."""

from __future__ import annotations

import io
import pickle
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from simla.data.images import ALPHA_BACKGROUND, BadSampleError, load_image


def _noise(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: noise compresses badly, so truncation hits real pixel data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _save(img: Image.Image, path: Path, fmt: str, **kwargs: object) -> Path:
    img.save(path, fmt, **kwargs)
    return path


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------- valid files


@pytest.mark.parametrize(("fmt", "suffix"), [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")])
def test_valid_rgb_files(tmp_path: Path, fmt: str, suffix: str) -> None:
    original = _noise()
    path = _save(original, tmp_path / f"img.{suffix}", fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (64, 48)
    if fmt != "JPEG":  # lossless formats round-trip exactly
        assert np.array_equal(np.asarray(img), np.asarray(original))
    # str paths work as well as PathLike
    assert load_image(str(path)).size == (64, 48)


def test_result_is_independent_of_the_file(tmp_path: Path) -> None:
    original = _noise()
    path = _save(original, tmp_path / "img.png", "PNG")
    img = load_image(path)
    path.unlink()  # the image must already be fully decoded and detached
    assert img.getpixel((0, 0)) == original.getpixel((0, 0))
    assert img.getpixel((63, 47)) == original.getpixel((63, 47))
    assert np.array_equal(np.asarray(img), np.asarray(original))  # PNG is lossless: every pixel survives


def test_grayscale(tmp_path: Path) -> None:
    gray = Image.fromarray(np.arange(64 * 8, dtype=np.uint8).reshape(8, 64) % 251)
    img = load_image(_save(gray, tmp_path / "g.png", "PNG"))
    array = np.asarray(img)
    assert img.mode == "RGB"
    for channel in range(3):
        assert np.array_equal(array[..., channel], np.asarray(gray))


def test_one_bit(tmp_path: Path) -> None:
    bilevel = Image.new("1", (8, 8), 0)
    bilevel.putpixel((1, 1), 1)
    array = np.asarray(load_image(_save(bilevel, tmp_path / "b.png", "PNG")))
    assert tuple(array[1, 1]) == (255, 255, 255) and tuple(array[0, 0]) == (0, 0, 0)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    img = load_image(_save(cmyk, tmp_path / "c.jpg", "JPEG", quality=100))
    r, g, b = np.asarray(img).reshape(-1, 3).mean(0)
    assert img.mode == "RGB" and r > 240 and g < 15 and b < 15


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((1, 0), (0, 0, 255, 255))  # opaque blue
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black
    array = np.asarray(load_image(_save(rgba, tmp_path / "a.png", "PNG")))
    assert tuple(array[0, 0]) == ALPHA_BACKGROUND  # colour under alpha 0 must not leak through
    assert tuple(array[0, 1]) == (0, 0, 255)
    assert ALPHA_BACKGROUND == (255, 255, 255)
    assert all(126 <= v <= 128 for v in array[0, 2])  # 255 * (1 - 128/255) over white


def test_la_composited(tmp_path: Path) -> None:
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (0, 255))
    array = np.asarray(load_image(_save(la, tmp_path / "la.png", "PNG")))
    assert tuple(array[0, 0]) == ALPHA_BACKGROUND and tuple(array[0, 1]) == (0, 0, 0)


def test_palette_png(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    pal.putpixel((0, 0), 0)
    array = np.asarray(load_image(_save(pal, tmp_path / "p.png", "PNG")))
    assert tuple(array[0, 0]) == (255, 0, 0) and tuple(array[1, 1]) == (0, 255, 0)


def test_palette_with_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    pal.putpixel((0, 0), 0)
    path = _save(pal, tmp_path / "pt.png", "PNG", transparency=0)  # index 0 is transparent
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns when P+transparency is converted to RGB directly
        array = np.asarray(load_image(path))
    assert tuple(array[0, 0]) == ALPHA_BACKGROUND and tuple(array[1, 1]) == (0, 255, 0)


def test_16bit_png_scaled_by_depth(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    src = Image.fromarray(values)
    assert src.mode == "I;16"
    array = np.asarray(load_image(_save(src, tmp_path / "d.png", "PNG")))
    # divide by 257, not clip: 65535 -> 255, 32896 -> 128, 257 -> 1
    assert array[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.array_equal(array[..., 0], array[..., 2])


def test_16bit_big_endian_tiff(tmp_path: Path) -> None:
    # frombytes, not convert(): PIL's I;16 -> I;16B conversion clips to 8 bits.
    src = Image.frombytes("I;16B", (3, 1), np.array([0, 65535, 12850], dtype=">u2").tobytes())
    path = _save(src, tmp_path / "d.tif", "TIFF")
    assert Image.open(path).mode == "I;16B"
    assert np.asarray(load_image(path))[0, :, 1].tolist() == [0, 255, 50]


def test_16bit_pgm_opens_as_mode_i(tmp_path: Path) -> None:
    path = tmp_path / "d.pgm"
    path.write_bytes(b"P5\n3 1\n65535\n" + np.array([0, 514, 65535], dtype=">u2").tobytes())
    assert Image.open(path).mode == "I"
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 2, 255]


def test_32bit_tiff_uses_recorded_depth(tmp_path: Path) -> None:
    values = np.array([[0, 2**31 - 1]], dtype=np.int32)
    array = np.asarray(load_image(_save(Image.fromarray(values), tmp_path / "i.tif", "TIFF")))
    assert array[0, :, 0].tolist() == [0, 127]  # (2^31 - 1) * 255 / (2^32 - 1)


def test_float_tiff(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    array = np.asarray(load_image(_save(Image.fromarray(values), tmp_path / "f.tif", "TIFF")))
    assert array[0, :, 0].tolist() == [0, 128, 255]


def test_bytes_input() -> None:
    data = _encode(_noise(), "PNG")
    img = load_image(data, name="shard-0001.tar/000042.png")
    assert img.mode == "RGB" and img.size == (64, 48)
    assert load_image(bytearray(data)).size == (64, 48)


# ------------------------------------------------------------------------------------------- bad samples


def _bad(source: object, **kwargs: object) -> BadSampleError:
    with pytest.raises(BadSampleError) as info:
        load_image(source, **kwargs)  # type: ignore[arg-type]
    return info.value


def test_truncated_jpeg_file(tmp_path: Path) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # we must not rely on, or set, the global flag
    data = _encode(_noise(320, 240), "JPEG", quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    err = _bad(path)
    assert err.source == str(path) and "truncated" in err.reason
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png_bytes() -> None:
    data = _encode(_noise(320, 240), "PNG")
    err = _bad(data[: len(data) // 2], name="shard/key.png")
    assert err.source == "shard/key.png"


def test_garbage_bytes(tmp_path: Path) -> None:
    path = tmp_path / "garbage.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert "cannot identify" in _bad(path).reason


def test_corrupt_header_after_valid_magic(tmp_path: Path) -> None:
    data = bytearray(_encode(_noise(), "PNG"))
    data[16:24] = b"\xff" * 8  # IHDR width/height overwritten
    _bad(bytes(data))


def test_empty_file_and_empty_bytes(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.touch()
    assert _bad(path).reason == "empty file"
    assert _bad(b"", name="k").reason == "empty image data"


def test_missing_path_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    err = _bad(missing)
    assert err.source == str(missing) and "FileNotFoundError" in err.reason
    _bad(tmp_path)  # a directory is not an image either


def test_too_many_pixels_checked_from_header(tmp_path: Path) -> None:
    path = _save(_noise(64, 48), tmp_path / "big.png", "PNG")
    err = _bad(path, max_pixels=64 * 48 - 1)
    assert "too large" in err.reason
    assert load_image(path, max_pixels=64 * 48).size == (64, 48)  # the limit is inclusive


def test_pil_decompression_bomb_is_a_bad_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(_noise(64, 48), tmp_path / "bomb.png", "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 3072 pixels > 2 * 1000: PIL raises
    assert "DecompressionBombError" in _bad(path).reason
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 3072 pixels > 2000: PIL only warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).size == (64, 48)  # our own max_pixels is the authority


def test_zero_size_image(tmp_path: Path) -> None:
    # A PNG whose IHDR announces width 0 (with a valid CRC, so only the size is wrong). PIL's plugins
    # already refuse such headers; load_image's own size check is a second line of defence.
    data = bytearray(_encode(_noise(), "PNG"))
    data[16:20] = (0).to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    path = tmp_path / "zero.png"
    path.write_bytes(bytes(data))
    _bad(path)


def test_bad_sample_error_str_and_pickle() -> None:
    err = BadSampleError("shard-3.tar/17.jpg", "corrupt")
    assert str(err) == "shard-3.tar/17.jpg: corrupt"
    clone = pickle.loads(pickle.dumps(err))  # DataLoader workers pickle exceptions
    assert (clone.source, clone.reason, str(clone)) == (err.source, err.reason, str(err))


# ------------------------------------------------------------------------------------ programming errors


@pytest.mark.parametrize("source", [None, 123, ["a.jpg"], io.BytesIO(b"x")])
def test_wrong_source_type_is_not_a_bad_sample(source: object) -> None:
    with pytest.raises(TypeError):
        load_image(source)  # type: ignore[arg-type]


@pytest.mark.parametrize("max_pixels", [0, -1, 1.5, True])
def test_wrong_max_pixels(max_pixels: object) -> None:
    with pytest.raises(ValueError):
        load_image(b"x", max_pixels=max_pixels)  # type: ignore[arg-type]


def test_wrong_name_type() -> None:
    with pytest.raises(TypeError):
        load_image(b"x", name=3)  # type: ignore[arg-type]


def test_each_problem_is_counted_under_its_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _encode(_noise(320, 240), "JPEG", quality=95)
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "stub.jpg").write_bytes(data[:40])  # a valid start, cut inside the header
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image at all")
    (tmp_path / "empty.jpg").touch()
    broken = bytearray(_encode(_noise(320, 240), "PNG"))
    broken[200:260] = b"\0" * 60  # the compressed pixel stream is damaged, not cut short
    (tmp_path / "broken.png").write_bytes(bytes(broken))
    big = _save(_noise(64, 48), tmp_path / "big.png", "PNG")
    expected = {"cut.jpg": "truncated", "stub.jpg": "truncated", "empty.jpg": "truncated",
                "garbage.jpg": "corrupt", "broken.png": "corrupt", "nope.jpg": "missing"}
    for name, kind in expected.items():
        assert _bad(tmp_path / name).kind == kind, name
    assert _bad(tmp_path).kind == "unreadable"  # a directory
    assert _bad(b"", name="k").kind == "truncated"
    assert _bad(big, max_pixels=100).kind == "too_large"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's own bomb check
    assert _bad(big).kind == "too_large"


def test_bad_sample_kind_is_checked_and_pickled() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        BadSampleError("x.jpg", "odd", "weird")
    clone = pickle.loads(pickle.dumps(BadSampleError("x.jpg", "gone", "missing")))
    assert (clone.source, clone.reason, clone.kind) == ("x.jpg", "gone", "missing")
