"""SVG drawings rasterised for training: recognised by name or content, rendered by the optional cairosvg.

Clip art and icon collections (openclipart, Tux Paint stamps) are largely SVG, which PIL cannot read.
cairosvg renders them; it is an optional extra (``pip install "simla[svg]"``) because it needs the
cairo system library, so it is imported only when an SVG is met, and its absence is reported per
image rather than at import time.

An SVG can name other files and URLs (``<image href="file:///etc/passwd">``, ``http://...``). A
training job reading a scraped collection must never open local files or reach the network on the
data's say-so, so every external reference is refused: only ``data:`` URLs (images embedded in the
SVG itself) are decoded, and cairosvg's ``unsafe`` mode (XML entities, huge files) stays off.

Adobe Illustrator writes its namespaces as internal XML entities (``<!ENTITY ns_svg "http://...">``),
which cairosvg's safe parser refuses outright. Such plain text entities are expanded here first, under
a size cap, so those drawings render; anything else in a DTD (external or parameter entities, entities
that nest) is left for the parser to refuse, and the image is skipped as ``unsupported``.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import zlib
from typing import Any
from urllib.parse import unquote_to_bytes

from PIL import Image

__all__ = ["ExternalResourceRefused", "SVG_SUFFIXES", "SvgUnavailable", "UnsafeSvgRefused", "looks_like_svg",
           "rasterise_svg"]

SVG_SUFFIXES = (".svg", ".svgz")
_SNIFF_BYTES = 1024
# The most text an SVG (after gunzip and entity expansion) may hold: far above any real drawing, far
# below what a decompression or expansion bomb would make us allocate.
_MAX_SVG_BYTES = 64 << 20
_DOCTYPE = re.compile(rb"<!DOCTYPE\s+svg\b[^\[>]*(?:\[(?P<subset>[^\]]*)\])?\s*>", re.IGNORECASE)
_ENTITY = re.compile(rb"""<!ENTITY\s+(?P<name>[A-Za-z_][\w.\-]*)\s+(?P<q>["'])(?P<value>[^"'&%<]*)(?P=q)\s*>""")
_COMMENT = re.compile(rb"<!--.*?-->", re.DOTALL)


class SvgUnavailable(Exception):
    """cairosvg (or the cairo library under it) is not installed."""


class UnsafeSvgRefused(Exception):
    """The SVG uses XML features refused for safety (external or nested entities)."""


class ExternalResourceRefused(Exception):
    """The SVG refers to a file or URL outside itself; it is never fetched."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


def looks_like_svg(head: bytes, name: str | None = None) -> bool:
    """True for an ``.svg``/``.svgz`` name, or content starting with ``<svg``/``<?xml``/``<!DOCTYPE svg`` (or
    a comment followed by ``<svg``) within its first 1 KB.

    A byte-order mark and white space may come first; ``<?xml`` is enough because PIL reads no XML
    format, so an XML file that is not SVG fails in the renderer as a corrupt sample either way.
    """
    if name is not None and name.lower().endswith(SVG_SUFFIXES):
        return True
    text = _strip_lead(head[:_SNIFF_BYTES])
    if text.startswith((b"<svg", b"<?xml")) or text[:13].lower() == b"<!doctype svg":
        return True
    return text.startswith(b"<!--") and b"<svg" in text  # a licence comment before the drawing


def _strip_lead(data: bytes) -> bytes:
    """Drop a UTF-8 byte-order mark and white space before the markup (an XML parser refuses both)."""
    return data.removeprefix(b"\xef\xbb\xbf").lstrip()


def _plain_text(data: bytes) -> bytes:
    """The SVG text: SVGZ is gunzipped here, with a cap, so that a gzip bomb cannot exhaust memory."""
    if not data.startswith(b"\x1f\x8b"):
        return data
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        text = inflater.decompress(data, _MAX_SVG_BYTES)
    except zlib.error as exc:
        raise ValueError(f"corrupt SVGZ compression ({exc})") from exc
    if inflater.unconsumed_tail:
        raise ValueError(f"SVGZ expands beyond {_MAX_SVG_BYTES >> 20} MB")
    return text


def _inline_entities(data: bytes) -> bytes:
    """Expand plain internal entities (Illustrator's ``&ns_svg;``) and drop the DTD they were declared in.

    Only a DTD made of nothing but ``<!ENTITY name "text">`` declarations (and comments) is handled,
    with values free of ``&``, ``%`` and ``<``, so expansion cannot nest; a document that would grow past
    the size cap is left unchanged, as is any other DTD: the parser then refuses it.
    """
    match = _DOCTYPE.search(data[:65536])
    if match is None or not match["subset"]:
        return data
    subset = _COMMENT.sub(b"", match["subset"])
    if _ENTITY.sub(b"", subset).strip():
        return data
    entities = {m["name"]: m["value"] for m in _ENTITY.finditer(subset)}
    body = data[:match.start()] + data[match.end():]
    growth = sum(body.count(b"&" + name + b";") * len(value) for name, value in entities.items())
    if len(body) + growth > _MAX_SVG_BYTES:
        return data
    for name, value in entities.items():
        body = body.replace(b"&" + name + b";", value)
    return body


def _data_url(url: str) -> bytes:
    """The payload of a ``data:[<type>][;base64],<data>`` URL."""
    header, _, payload = url.partition(",")
    if header.endswith(";base64"):
        try:
            return base64.b64decode(unquote_to_bytes(payload), validate=False)
        except binascii.Error as exc:
            raise ValueError(f"malformed base64 data URL ({exc})") from exc
    return unquote_to_bytes(payload)


def _refuse_external(url: str, resource_type: str) -> bytes:
    """cairosvg's ``url_fetcher``: embedded ``data:`` URLs are decoded, everything else is refused."""
    if url.startswith("data:"):
        return _data_url(url)
    raise ExternalResourceRefused(url)


def _cairosvg() -> Any:
    """Import cairosvg on first use; a missing package or cairo library becomes :class:`SvgUnavailable`."""
    try:
        import cairosvg  # optional extra "svg"
    except (ImportError, OSError) as exc:  # OSError: cairocffi finds no libcairo
        raise SvgUnavailable(str(exc)) from exc
    return cairosvg


def _refused_errors() -> tuple[type[BaseException], ...]:
    """The exceptions of the XML guard under cairosvg's parser (defusedxml, one of its dependencies)."""
    try:
        from defusedxml import DefusedXmlException
    except ImportError:
        return ()
    return (DefusedXmlException,)


def _render(cairosvg: Any, data: bytes, **size: int) -> Image.Image:
    # svg2png() has no url_fetcher parameter; PNGSurface.convert passes it on to the parser's Tree.
    png = cairosvg.surface.PNGSurface.convert(bytestring=data, unsafe=False, url_fetcher=_refuse_external, **size)
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def rasterise_svg(data: bytes, size: int) -> Image.Image:
    """Render an SVG (or gzip-compressed SVGZ) so that its longer side is `size` pixels, keeping transparency.

    Raises:
        SvgUnavailable: cairosvg cannot be imported.
        ExternalResourceRefused: the drawing refers to an external file or URL.
        UnsafeSvgRefused: the drawing uses XML entities that are not plain text.
        ValueError: the renderer failed on the data (cairo's own errors are re-raised as ValueError);
            XML syntax errors arrive as SyntaxError.
    """
    cairosvg = _cairosvg()
    data = _inline_entities(_strip_lead(_plain_text(data)))
    cairo_error = getattr(getattr(cairosvg.surface, "cairo", None), "Error", ())
    try:
        image = _render(cairosvg, data, output_width=size)
        if image.height > size:  # taller than wide: render again with the height as the longer side
            image = _render(cairosvg, data, output_height=size)
    except cairo_error as exc:
        raise ValueError(f"cairo: {exc}") from exc
    except _refused_errors() as exc:
        raise UnsafeSvgRefused(f"{type(exc).__name__}: {exc}") from exc
    return image
