"""Robust image decoding: one bad file must never crash a pretraining run.

:func:`load_image` turns a path or an in-memory WebDataset member into an RGB :class:`PIL.Image.Image`.
Every problem that lies in the *data* (missing file, unreadable or corrupt bytes, truncated image, an
image too large to decode safely, a zero-size image, an unsupported pixel mode) raises
:class:`BadSampleError` with one of the :data:`BAD_SAMPLE_KINDS`; the dataset logs it, counts it by kind
and answers it by drawing a different sample. Everything else (a wrong argument type, a bug in this
module) propagates unchanged: the reference pipeline wraps loading in a bare ``except:``, which hid
exactly such bugs (on a recent NumPy every one of its samples failed, silently).

What the decoder did beyond plain RGB decoding (transparency composited, a palette or grey image
expanded, EXIF orientation applied, an SVG rendered, a tiny image kept) can be reported through the
``notes`` argument: the pretraining dataset counts these per batch, so a training log shows what a
collection really held instead of leaving it to be discovered in the samples.

Unlike the reference we do not set ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` or ``Image.MAX_IMAGE_PIXELS``
process-wide: a truncated file is a bad sample (silently grey-filled pixels would poison the MIM targets),
and the pixel budget is a per-call argument instead of a disabled safety check.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import warnings
from dataclasses import dataclass
from functools import lru_cache
from collections.abc import Callable
from typing import IO

import numpy as np
from PIL import Image, ImageFile, ImageOps

from ..errors import SimlaError
from .svg import ExternalResourceRefused, SvgUnavailable, UnsafeSvgRefused, looks_like_svg, rasterise_svg

__all__ = ["ALPHA_BACKGROUND", "BAD_SAMPLE_KINDS", "BadSampleError", "DecodeSize", "DEFAULT_MAX_PIXELS", "IMAGE_NOTES",
           "SMALL_IMAGE_SIDE", "load_image"]

logger = logging.getLogger(__name__)

# PIL's own default for Image.MAX_IMAGE_PIXELS (~ 9459 x 9459): large enough for any photo in the
# pretraining corpora, small enough that a forged header cannot make us allocate gigabytes.
DEFAULT_MAX_PIXELS = 89_478_485

# Transparent pixels are composited onto white by default: drawings, clip art, stamps and cut-out product
# photos are made to be seen on white, which is how image viewers and web pages show them, so white is
# what a caption written for such an image describes. The reference's plain ``.convert("RGB")`` instead
# shows whatever colour happens to hide under the transparent pixels, often black, turning line art
# into black shapes on black. ``load_image(background=...)`` picks another colour.
ALPHA_BACKGROUND = (255, 255, 255)

# Images with a side shorter than this are kept (the transforms resize them like any other) but noted
# as "small": icons and thumbnails carry little detail once upscaled to the model's input size.
SMALL_IMAGE_SIDE = 16

# What load_image can report through `notes` (the pretraining log counts them under "images"):
#   transparent   alpha or keyed (tRNS, GIF) transparency composited on the background
#   palette       a palette image expanded to RGB
#   grey          a single-channel (1, L, LA, I, F) image replicated to RGB
#   exif_rotated  an EXIF orientation tag applied
#   svg           an SVG drawing rendered (needs the "svg" extra)
#   small         a side shorter than SMALL_IMAGE_SIDE pixels
#   sixteen_bit   more than 8 bits per sample, scaled to 8
IMAGE_NOTES = ("transparent", "palette", "grey", "exif_rotated", "svg", "small", "sixteen_bit")

# Exceptions through which PIL and its plugins report malformed data. Fuzzing PIL shows all of these for
# corrupt headers or streams (struct.error / IndexError / KeyError from table parsing, SyntaxError from
# some plugins' header checks). TypeError and MemoryError are deliberately absent: after our argument
# checks they point at bugs or at the machine, not at one sample.
_DATA_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    ZeroDivisionError,
    struct.error,
    Image.DecompressionBombError,
)

# Modes that carry an alpha channel (premultiplied "La"/"RGBa" included); they are composited.
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
# Modes whose "transparency" info entry (a PNG tRNS chunk, a GIF transparent index) must be honoured.
_KEYED_TRANSPARENCY_MODES = frozenset({"P", "L", "RGB", "1"})
_INT16_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"}) | _INT16_MODES
_TIFF_BITS_PER_SAMPLE = 258
_EXIF_ORIENTATION = 0x0112


# The kinds of bad sample, as counted in the training log (`skipped`):
#   missing        the file (or the shard member) does not exist
#   unreadable     it exists but cannot be read: a directory, no permission, an unsupported pixel mode
#   corrupt        the bytes are not a valid image (or caption) of any supported format
#   truncated      a valid start that ends early, including an empty (0-byte) file
#   empty_caption  the caption is empty after cleaning
#   too_large      the header announces more pixels than the decoding budget allows
#   unsupported    a format simla can read only with an optional extra (SVG without cairosvg), or an SVG
#                  that refers to external files or URLs (never fetched) or declares unsafe XML entities
BAD_SAMPLE_KINDS = ("missing", "unreadable", "corrupt", "truncated", "empty_caption", "too_large", "unsupported")


class BadSampleError(SimlaError):
    """A sample whose data cannot be used (missing, corrupt, truncated, oversized ...).

    A :class:`SimlaError`: where one image is all that was asked for (``simla search --image``,
    ``simla explain``) the command reports it in one line. The pretraining dataset catches it by this
    class to skip the sample, so being a SimlaError changes nothing there.

    Attributes:
        source: where the sample came from: a file path, or ``shard/key`` for a WebDataset member.
        reason: a short human-readable description of what is wrong with it.
        kind: one of :data:`BAD_SAMPLE_KINDS`, the counter it is logged under.
    """

    def __init__(self, source: str, reason: str, kind: str = "unreadable") -> None:
        if kind not in BAD_SAMPLE_KINDS:
            raise ValueError(f"kind must be one of {BAD_SAMPLE_KINDS}, got {kind!r}")
        # Passing every field to Exception keeps the error picklable, which matters because DataLoader
        # workers send exceptions back to the main process by pickling them.
        super().__init__(source, reason, kind)
        self.source = source
        self.reason = reason
        self.kind = kind

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


# Told the upright (width, height) of an image before its pixels are decoded, returns the smallest upright
# size the caller will use, or None for the full size (see load_image's ``decode_size``).
DecodeSize = Callable[[tuple[int, int]], "tuple[int, int] | None"]


@dataclass(frozen=True)
class _Options:
    """The per-call decoding options, passed down as one value."""

    max_pixels: int
    background: tuple[int, int, int]
    exif_transpose: bool
    svg_size: int
    decode_size: DecodeSize | None = None


def load_image(
    source: str | os.PathLike[str] | bytes,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = ALPHA_BACKGROUND,
    exif_transpose: bool = True,
    svg_size: int = 512,
    notes: list[str] | None = None,
    decode_size: DecodeSize | None = None,
) -> Image.Image:
    """Fully decode an image and return it in RGB mode, or raise :class:`BadSampleError`.

    The whole file is decoded here (``Image.load``), so truncation and stream corruption surface now,
    inside the dataset's error handling, rather than later inside a transform.

    Mode conversion: alpha (and palette/tRNS transparency) is composited onto `background` (white by
    default, see :data:`ALPHA_BACKGROUND`); 16/32-bit integer images are scaled to 8 bits by their bit
    depth (``I;16``: divide by 257); float (``F``) images are taken as [0, 1] or [0, 255] when they lie in
    that range, else min-max stretched; 1/L/P/CMYK/YCbCr/LAB/HSV go through PIL's standard conversions.
    The EXIF orientation is applied (phones store portrait photos sideways with a rotation tag, and
    every viewer honours it, so the caption describes the rotated picture); the reference ignored it.
    SVG/SVGZ drawings (by name, or ``<svg``/``<?xml`` at the start) are rendered with the optional
    cairosvg, never fetching the files or URLs they name. Images smaller than :data:`SMALL_IMAGE_SIDE`
    are kept.

    Args:
        source: a file path, or the encoded bytes of an image (e.g. a WebDataset member).
        name: how to refer to ``bytes`` input in errors and logs (e.g. ``"shard-0001.tar/000042.jpg"``);
            for a path the default is the path itself. Its suffix also marks SVG bytes.
        max_pixels: refuse images whose header announces more than ``width * height`` pixels, before
            any pixel data is decoded. PIL's own hard limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``) still
            applies on top; raise that process-wide if you really need bigger images.
        background: the RGB colour transparent pixels are composited on.
        exif_transpose: apply the EXIF orientation tag (False keeps the stored pixel order).
        svg_size: the longer side, in pixels, SVG drawings are rendered at.
        notes: when a list is given, what was done is appended to it (see :data:`IMAGE_NOTES`).
        decode_size: called once with the upright (width, height) of the image as stored, before any
            pixel is decoded; it returns the smallest upright size the caller needs (or None). A JPEG is
            then decoded at the largest of libjpeg's reduced scales (1/2, 1/4, 1/8) that keeps at least that
            size, which is several times faster than decoding every pixel and resizing them away. Other
            formats are decoded in full. A random crop can ask for exactly what it will resize.

    Returns:
        A new, fully loaded RGB image not tied to any open file.

    Raises:
        BadSampleError: the data is unusable (or SVG without the "svg" extra: kind ``unsupported``).
        TypeError, ValueError: the arguments themselves are wrong (a bug in the caller).
    """
    _check_args(source, name, max_pixels)
    if decode_size is not None and not callable(decode_size):
        raise TypeError(f"decode_size must be callable, got {type(decode_size).__name__}")
    options = _Options(max_pixels, _check_background(background), bool(exif_transpose), _check_svg_size(svg_size),
                       decode_size)
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name if name is not None else "<bytes>"
        data = bytes(source)
        if not data:
            raise BadSampleError(label, "empty image data", "truncated")
        if looks_like_svg(data, name):
            return _decode_svg(data, label, options, notes)
        return _decode(io.BytesIO(data), label, options, notes)

    path = os.fspath(source)
    return _load_file(path, name if name is not None else str(path), options, notes)


def _load_file(path: str, label: str, options: _Options, notes: list[str] | None) -> Image.Image:
    """load_image for a file path: open errors and empty files become BadSampleError, SVG is detected."""
    try:
        fp = open(path, "rb")  # noqa: SIM115 - closed in the finally below
    except OSError as exc:  # missing file, directory, permission denied ...
        kind = "missing" if isinstance(exc, FileNotFoundError) else "unreadable"
        raise BadSampleError(label, f"cannot open file ({type(exc).__name__}: {exc.strerror or exc})", kind) from exc
    try:
        if os.fstat(fp.fileno()).st_size == 0:
            raise BadSampleError(label, "empty file", "truncated")
        head = fp.read(1024)
        if looks_like_svg(head, str(path)):
            return _decode_svg(head + fp.read(), label, options, notes)
        fp.seek(0)
        return _decode(fp, label, options, notes)
    finally:
        fp.close()


def _check_args(source: object, name: object, max_pixels: object) -> None:
    """Reject wrong argument types loudly: they are caller bugs, never bad samples."""
    if not isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        raise TypeError(f"source must be a path or bytes, got {type(source).__name__}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {type(name).__name__}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")


def _check_background(background: object) -> tuple[int, int, int]:
    if (not isinstance(background, (tuple, list)) or len(background) != 3
            or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in background)):
        raise ValueError(f"background must be an (r, g, b) tuple of ints in [0, 255], got {background!r}")
    return (background[0], background[1], background[2])


def _check_svg_size(svg_size: object) -> int:
    if isinstance(svg_size, bool) or not isinstance(svg_size, int) or svg_size < 1:
        raise ValueError(f"svg_size must be a positive int, got {svg_size!r}")
    return svg_size


def _note(notes: list[str] | None, what: str) -> None:
    if notes is not None:
        notes.append(what)


@lru_cache(maxsize=1)
def _allowed_formats() -> tuple[str, ...]:
    """Every format PIL can open except EPS, whose loader shells out to Ghostscript.

    A web-scraped corpus should never make a training job run an external interpreter on
    untrusted input, and no photo corpus needs EPS.
    """
    Image.init()  # registers every plugin so that Image.OPEN is complete
    return tuple(fmt for fmt in Image.OPEN if fmt != "EPS")


def _decode(fp: IO[bytes], label: str, options: _Options, notes: list[str] | None) -> Image.Image:
    """Open, size-check, fully decode and convert one image; data problems become BadSampleError."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone set the reference's global flag; we cannot detect truncation while it is on.
        logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images will not be rejected")
    # Our max_pixels check below supersedes PIL's soft limit, so its warning is noise here. The filter
    # is scoped to this call (catch_warnings is process-wide state, but DataLoader workers are processes).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp, formats=_allowed_formats())
        except _DATA_ERRORS as exc:
            raise BadSampleError(label, f"cannot identify image ({_describe(exc)})", _kind_of(exc)) from exc
        try:
            _check_size(img, label, options.max_pixels)
            stored_size = img.size
            if options.decode_size is not None:
                _reduce_decoding(img, options)
            try:
                img.load()  # the full decode: truncated or corrupt streams fail here, not later
            except _DATA_ERRORS as exc:
                raise BadSampleError(label, f"corrupt or truncated image data ({_describe(exc)})",
                                     _kind_of(exc)) from exc
            upright = _apply_orientation(img, notes) if options.exif_transpose else img
            return _finish(upright, label, options, notes, stored_size)
        finally:
            img.close()


def _reduce_decoding(img: Image.Image, options: _Options) -> None:
    """Ask the caller's ``decode_size`` what it needs and set up a reduced-scale JPEG decode to match."""
    orientation = _orientation(img) if options.exif_transpose else None
    swapped = orientation in (5, 6, 7, 8)  # stored sideways: upright width is the stored height
    width, height = img.size
    wanted = options.decode_size((height, width) if swapped else (width, height))
    if wanted is None or img.format != "JPEG":
        return
    wanted_width, wanted_height = (int(wanted[1]), int(wanted[0])) if swapped else (int(wanted[0]), int(wanted[1]))
    if wanted_width <= width // 2 and wanted_height <= height // 2:
        img.draft(img.mode, (max(1, wanted_width), max(1, wanted_height)))


def _decode_svg(data: bytes, label: str, options: _Options, notes: list[str] | None) -> Image.Image:
    """Render an SVG; a missing renderer or an external reference is ``unsupported``, bad XML ``corrupt``."""
    try:
        img = rasterise_svg(data, options.svg_size)
    except SvgUnavailable as exc:
        raise BadSampleError(label, 'SVG needs the optional extra: pip install "simla[svg]"', "unsupported") from exc
    except ExternalResourceRefused as exc:
        raise BadSampleError(label, f"SVG refers to an external resource ({exc.url[:80]}); files and URLs named "
                                    "in an SVG are never fetched", "unsupported") from exc
    except UnsafeSvgRefused as exc:
        raise BadSampleError(label, f"SVG uses XML entities refused for safety ({exc})", "unsupported") from exc
    except _DATA_ERRORS as exc:
        raise BadSampleError(label, f"cannot render SVG ({_describe(exc)})", "corrupt") from exc
    _note(notes, "svg")
    _check_size(img, label, options.max_pixels)
    if options.decode_size is not None:
        options.decode_size(img.size)  # rendered already: the caller still learns the size
    return _finish(img, label, options, notes, img.size)


def _orientation(img: Image.Image) -> int | None:
    """The EXIF orientation tag (1-8), or None when absent or unreadable (never fatal)."""
    try:
        return img.getexif().get(_EXIF_ORIENTATION)
    except _DATA_ERRORS:
        return None


def _apply_orientation(img: Image.Image, notes: list[str] | None) -> Image.Image:
    """The image turned upright by its EXIF orientation tag; unreadable EXIF is ignored, not fatal."""
    orientation = _orientation(img)
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return img
    try:
        upright = ImageOps.exif_transpose(img)
    except _DATA_ERRORS:
        return img
    _note(notes, "exif_rotated")
    return upright


def _finish(img: Image.Image, label: str, options: _Options, notes: list[str] | None,
            stored_size: tuple[int, int]) -> Image.Image:
    """Note what the image is (small as stored, palette, grey, deep, transparent) and convert it to RGB."""
    if notes is not None:
        if min(stored_size) < SMALL_IMAGE_SIDE:
            notes.append("small")
        notes.extend(_mode_notes(img))
    return _to_rgb(img, label, options.background)


def _mode_notes(img: Image.Image) -> list[str]:
    """The notes an image's mode earns (see :data:`IMAGE_NOTES`)."""
    mode, found = img.mode, []
    if mode in ("P", "PA"):
        found.append("palette")
    if mode in _GREY_MODES:
        found.append("grey")
    if mode in _INT16_MODES or mode == "I":
        found.append("sixteen_bit")
    if mode in _KEYED_TRANSPARENCY_MODES and img.info.get("transparency") is not None:
        found.append("transparent")
    elif mode in _ALPHA_MODES and img.convert("RGBA").getchannel("A").getextrema()[0] < 255:
        found.append("transparent")
    return found


def _kind_of(exc: BaseException) -> str:
    """The bad-sample kind of a decoding error: PIL says "truncated" (or hits EOF) when data ends early."""
    if isinstance(exc, Image.DecompressionBombError):
        return "too_large"
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
        return "truncated"
    return "corrupt"


def _describe(exc: BaseException) -> str:
    """``Type: message`` for an exception, compact enough for one log line."""
    return f"{type(exc).__name__}: {exc}"


def _check_size(img: Image.Image, label: str, max_pixels: int) -> None:
    """Refuse zero-size and oversized images using the header size only (nothing decoded yet)."""
    width, height = img.size
    if width <= 0 or height <= 0:
        raise BadSampleError(label, f"zero-size image ({width}x{height})", "corrupt")
    if width * height > max_pixels:
        raise BadSampleError(label, f"image too large ({width}x{height} = {width * height} pixels > {max_pixels})",
                             "too_large")


def _to_rgb(img: Image.Image, label: str, background: tuple[int, int, int] = ALPHA_BACKGROUND) -> Image.Image:
    """Convert a loaded image of any mode to a new RGB image (see :func:`load_image` for the rules)."""
    mode = img.mode
    if mode in _ALPHA_MODES or (mode in _KEYED_TRANSPARENCY_MODES and img.info.get("transparency") is not None):
        return _composite(img.convert("RGBA"), background)
    if mode == "RGB":
        return img.copy()  # a copy, so the result survives the img.close() in _decode
    if mode in _INT16_MODES or mode == "I":
        return _gray_to_rgb(_scale_integers(img))
    if mode == "F":
        return _gray_to_rgb(_scale_floats(np.asarray(img, dtype=np.float64)))
    try:
        return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX ...
    except ValueError as exc:  # PIL has no conversion for this (rare) mode
        raise BadSampleError(label, f"unsupported image mode {mode!r} ({exc})", "unreadable") from exc


def _composite(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Blend an RGBA image over `background` and drop the alpha channel."""
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    """Replicate an 8-bit (H, W) array into an RGB image."""
    return Image.fromarray(gray).convert("RGB")


def _bit_depth_hint(img: Image.Image) -> int | None:
    """Bits per sample recorded by the file format, when it records one (TIFF does)."""
    if img.format != "TIFF":
        return None
    bits = getattr(img, "tag_v2", {}).get(_TIFF_BITS_PER_SAMPLE)
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return int(bits) if isinstance(bits, int) and 1 <= bits <= 32 else None


def _scale_integers(img: Image.Image) -> np.ndarray:
    """Map a 16- or 32-bit integer image to uint8 by its bit depth: v * 255 / (2**bits - 1).

    Clipping (PIL's ``convert("L")``) would turn nearly every 16-bit image white; dividing by the
    full-scale value keeps the tonal range. The depth comes from the format when recorded, else from
    the mode (``I;16*`` = 16 bits) or, for ``I``, from the values: PIL decodes 16-bit PGM/PNG data
    into ``I``, so values within [0, 65535] are read as 16-bit and anything larger as 32-bit.
    """
    values = np.asarray(img).astype(np.float64)
    if values.size and values.min() < 0:
        # Signed data has no natural full scale; stretch it rather than clip the negative half away.
        logger.debug("signed %s image: min-max stretched to 8 bits", img.mode)
        return _stretch(values)
    bits = _bit_depth_hint(img)
    if bits is None:
        bits = 16 if img.mode in _INT16_MODES or (values.size == 0 or values.max() <= 65535) else 32
    full_scale = float(2**bits - 1)
    # Values above the declared depth can only come from inconsistent metadata; clip those only.
    scaled = np.clip(values, 0.0, full_scale) * (255.0 / full_scale)
    return np.rint(scaled).astype(np.uint8)


def _scale_floats(values: np.ndarray) -> np.ndarray:
    """Map a float image to uint8: [0, 1] and [0, 255] are taken as such, other ranges are stretched."""
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low >= 0.0 and high <= 1.0:
        return np.rint(values * 255.0).astype(np.uint8)
    if low >= 0.0 and high <= 255.0:
        return np.rint(values).astype(np.uint8)
    return _stretch(values)


def _stretch(values: np.ndarray) -> np.ndarray:
    """Min-max stretch to [0, 255]; a constant image maps to 0."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)
