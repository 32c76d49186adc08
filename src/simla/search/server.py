"""A small web server around a search index: one HTML page plus a JSON API.

FastAPI and uvicorn are an optional extra (``pip install "simla[serve]"``), so they are imported
inside the functions that need them and this module imports without them.

The endpoints are plain ``def`` functions: FastAPI runs them in its threadpool, which keeps the
CPU-bound model code off the event loop. The model is not thread-safe, so searches go through one
lock; thumbnails and originals only read image storage and take a second lock of their own, so a
page of thumbnails does not wait behind a long re-ranking.

Safety for a server left running: every request passes :class:`simla.search.guard.RequestGuard` first (a ``Host``
allow-list against DNS rebinding, a request body cap, a strictly UTF-8 query string); uploaded
images are size-checked from their header and decoded, capped and shrunk before the model lock is
taken; before each search the index may reload what another process (``simla index update``) changed;
and every error is answered as JSON with a status that says whose fault it is (:func:`error_status`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import logging
import math
import socket
import sys
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from PIL import Image

from simla.data.images import BadSampleError, load_image
from simla.search.html import image_mime, render_app_page

from ..errors import MissingExtraError, SimlaError
from .guard import INVALID_TEXT, RequestGuard, allowed_hosts, exposure_warning, json_bytes
from .lock import IndexBusyError
from .sources import ItemUnavailableError

__all__ = ["INCOMPLETE_WARNING", "MAX_BODY_BYTES", "MAX_K", "MAX_RERANK", "MAX_UPLOAD_PIXELS", "background_server",
           "create_app", "error_status", "serve"]

logger = logging.getLogger(__name__)

MAX_K = 200  # hits per request: more is a page nobody scrolls and a slow response
MAX_RERANK = 1000  # ITM re-ranking costs one cross-attention pass per candidate
MAX_OFFSET = 100_000
MAX_TEXT_CHARS = 2000
MAX_IMAGE_BYTES = 20 * 1024 * 1024
#: The whole request body: a base64 data URL of MAX_IMAGE_BYTES plus room for the other JSON fields.
MAX_BODY_BYTES = MAX_IMAGE_BYTES * 4 // 3 + 64 * 1024
#: Uploaded query images may announce at most this many pixels (e.g. 6000 x 6000); the header is read
#: before anything is decoded, so a small file that unpacks to gigabytes (a "PNG bomb") costs nothing.
MAX_UPLOAD_PIXELS = 36_000_000
#: Larger query images are shrunk to this longer side right after decoding: every model reads far fewer
#: pixels (224 to 384 a side), and the model lock must not be held while a huge image is resized.
QUERY_IMAGE_SIDE = 1024
#: Uploads decoded at the same time: each may need a few hundred MB while it is being decoded.
DECODE_SLOTS = 2
MAX_ITEM_ID = 2**63 - 1  # item ids are SQLite integers
THUMB_SIZES = (16, 1024)  # smallest and largest thumbnail side the API hands out
#: Host header names always accepted (any port): the loopback names a browser on this machine uses.
#: Original images the browser may show inline; anything else is sent as a download.
INLINE_IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp")
# A request without ``dedup`` gets the index's own default: a good threshold depends on the model.
_INDEX_DEFAULT = object()


def _require(module: str) -> Any:
    """Import an optional serving dependency, or say how to install it."""
    try:
        return __import__(module)
    except ImportError as err:
        raise MissingExtraError(f'the search server needs {module}: pip install "simla[serve]"') from err


class QueryError(ValueError):
    """A request the server refuses before it reaches the index (answered with HTTP 400)."""


# ------------------------------------------------------------------------------------------ request values
def _check_text(text: Any) -> str | None:
    """The stripped query text, or None; QueryError for a non-string, invalid Unicode or an overlong text."""
    if text is not None and not isinstance(text, str):
        raise QueryError(f"text must be a string, not {type(text).__name__}")
    try:
        (text or "").encode("utf-8")
    except UnicodeEncodeError:
        raise QueryError(f"{INVALID_TEXT}: it holds a lone surrogate (expected UTF-8 text)") from None
    text = text.strip() if text else None
    if text and len(text) > MAX_TEXT_CHARS:
        raise QueryError(f"text is longer than {MAX_TEXT_CHARS} characters")
    return text or None


def _upload_bytes(value: str) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` URL (or of bare base64)."""
    payload = value.strip()
    if payload.startswith("data:"):
        header, sep, payload = payload.partition(",")
        if not sep or not header.endswith(";base64"):
            raise QueryError("image must be a base64 data URL (data:image/...;base64,...)")
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise QueryError(f"image is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MiB")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise QueryError(f"image is not valid base64: {err}") from None
    if not data:
        raise QueryError("image is empty")
    return data


_decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)


def _upload_size(data: bytes) -> tuple[int, int, str | None]:
    """Width, height and format of an uploaded image from its header alone (PIL opens lazily)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the cap below decides
            with Image.open(io.BytesIO(data)) as probe:
                return probe.size[0], probe.size[1], probe.format
    except Image.DecompressionBombError as err:
        raise QueryError(f"image is too large: {err} (expected at most {MAX_UPLOAD_PIXELS:,} pixels)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise QueryError(f"image could not be decoded: not an image PIL can read ({type(err).__name__}: {err}); "
                         f"expected a PNG, JPEG, GIF, WebP or BMP image") from None


def _decode_upload(data: bytes, fmt: str | None) -> Image.Image:
    """The decoded RGB image; a JPEG is decoded straight at a reduced scale when it is much larger than needed."""
    if fmt != "JPEG":
        try:
            return load_image(data, name="uploaded image", max_pixels=MAX_UPLOAD_PIXELS)
        except BadSampleError as err:
            raise QueryError(f"image could not be decoded: {err.reason} (expected a complete PNG, JPEG, GIF, "
                             f"WebP or BMP image of at most {MAX_UPLOAD_PIXELS:,} pixels)") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (QUERY_IMAGE_SIDE, QUERY_IMAGE_SIDE))  # DCT scaling: 1/2 to 1/8 of the work
            image.load()
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise QueryError(f"image could not be decoded: corrupt or truncated JPEG ({type(err).__name__}: {err}); "
                         f"expected a complete image") from None


def _checked_upload(data: bytes) -> bytes:
    """``data`` if it is an image of at most QUERY_IMAGE_SIDE a side, else a PNG of it shrunk to that.

    The size comes from the header and is checked against MAX_UPLOAD_PIXELS before any pixel is decoded
    (a small file that unpacks to gigabytes costs nothing); then the whole image is decoded, so truncated
    and corrupt files are refused here, with a 400, and not inside the model.
    """
    width, height, fmt = _upload_size(data)
    if width * height > MAX_UPLOAD_PIXELS:
        raise QueryError(f"image is too large: {width}x{height} = {width * height:,} pixels (expected at most "
                         f"{MAX_UPLOAD_PIXELS:,} pixels)")
    with _decode_slots:
        image = _decode_upload(data, fmt)
        if max(width, height) <= QUERY_IMAGE_SIDE:
            return data
        image.thumbnail((QUERY_IMAGE_SIDE, QUERY_IMAGE_SIDE), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()


def _parse_dedup(value: Any) -> float | None:
    """The duplicate-collapsing cosine threshold in [-1, 1], or None/"off"/"none" to keep duplicates."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() in ("", "none", "off", "false"):
            return None
        try:
            value = float(value)
        except ValueError:
            raise QueryError(f"dedup must be a cosine threshold in [-1, 1] or 'off', not {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 1:
        raise QueryError(f"dedup must be a cosine threshold in [-1, 1] or 'off', not {value!r}")
    return float(value)


def _as_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise QueryError(f"{name} must be an integer, not {value!r}")
    if not low <= value <= high:
        raise QueryError(f"{name} must be between {low} and {high}, not {value}")
    return value


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise QueryError(f"{name} must be a finite number, not {value!r}")
    return float(value)


def _check_item_id(item_id: int) -> int:
    """``item_id`` if it can name an item (a SQLite integer >= 0); KeyError (a 404) otherwise."""
    if not 0 <= item_id <= MAX_ITEM_ID:
        raise KeyError(f"no item with id {item_id}")
    return item_id


# ------------------------------------------------------------------------------------------ errors
def error_status(exc: BaseException) -> int:
    """The HTTP status for an error raised while answering a request.

    503: the index is being updated by another process (``IndexBusyError``); 409: the item's file changed
    since it was indexed; 404: an unknown or deleted item (``ItemNotFoundError``, any ``LookupError``) or an
    item whose file is gone, outside the source or not a regular file (``ItemUnavailableError``); 400: a
    request that cannot work as asked (``ValueError``, ``SimlaError``, an unusable image); 500: anything
    else, which is a bug.
    """
    if isinstance(exc, IndexBusyError):
        return 503
    if isinstance(exc, ItemUnavailableError):
        return 409 if exc.kind == "changed" else 404
    if isinstance(exc, LookupError):
        return 404
    if isinstance(exc, (ValueError, SimlaError)):
        return 400
    return 500


def _json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    from fastapi.responses import Response

    return Response(json_bytes(content), status_code=status, media_type="application/json", headers=headers)


def _error_response(exc: Exception, item_id: int | None = None) -> Any:
    """``{"detail": message}`` with the status of :func:`error_status`; a 500 logs the traceback only."""
    status = error_status(exc)
    if item_id is not None and isinstance(exc, (OSError, BadSampleError)):
        # The item's file moved, was swapped, changed or broke since it was indexed (409 only when it changed).
        status, message = (409 if status == 409 else 404), f"item {item_id} is unreadable: {exc}"
    elif status == 404 and item_id is not None:
        message = f"no item with id {item_id}"
    elif status == 500:
        logger.error("the search server failed to answer a request", exc_info=exc)
        message = "internal server error (the server's log has the details)"
    else:
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    headers = {"Retry-After": "2"} if status == 503 else None
    return _json_response({"detail": message or type(exc).__name__}, status, headers)


def _answered(work: Any, item_id: int | None = None) -> Any:
    """The result of ``work()``, or the JSON error response for what it raised."""
    try:
        return work()
    except Exception as exc:  # every error becomes a JSON answer; a 500 is logged with its traceback
        return _error_response(exc, item_id)


# ------------------------------------------------------------------------------------------ the index
class _ThumbnailCache:
    """The last few hundred thumbnails: paging back and forth must not decode the same images again."""

    def __init__(self, capacity: int = 512) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def get(self, key: tuple[int, int]) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def put(self, key: tuple[int, int], data: bytes) -> None:
        self._items[key] = data
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


def model_label(info: dict[str, Any], model: Any = None) -> str | None:
    """The index's model in words for the page: its name with the image size, patch size and feature
    dimension it runs with, read from the loaded model's config (a preset's name alone hides overrides:
    the demo model is "simla_tiny" at 48 px with 4 px patches). Without a model, the name and dimension
    the index recorded. An int8 index says so ("int8")."""
    int8 = ", int8" if info.get("precision") == "int8" else ""
    config = getattr(model, "config", None)
    if config is not None:
        return (f"{config.name} ({config.vision.image_size} px images, {config.vision.patch_size} px patches, "
                f"{config.objectives.embed_dim}-d features{int8})")
    if not info.get("model"):
        return None
    return f"{info['model']} ({info['dim']}-d features{int8})" if info.get("dim") else str(info["model"])


INCOMPLETE_WARNING = ("this index is not complete (its build was interrupted or is still running): the results "
                      "cover only the images indexed so far; `simla index update` finishes it")


class _Searcher:
    """The index behind its locks; turns raw request values into checked index calls."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self.model_lock = threading.Lock()
        self.storage_lock = threading.Lock()
        self.thumbs = _ThumbnailCache()
        self._model_label: str | None = None

    def info(self) -> dict[str, Any]:
        """The index's facts plus ``model_label`` (see :func:`model_label`); loads the model if it is not yet,
        as the first search would."""
        info = dict(self.index.info())
        if self._model_label is None:
            with self.model_lock:
                try:
                    model = getattr(self.index, "model", None)
                except (OSError, SimlaError) as err:  # checkpoint gone or unknown: label from the records
                    logger.warning("the search page's model label cannot load the model: %s", err)
                    model = None
                self._model_label = model_label(info, model)
        info["model_label"] = self._model_label
        return info

    def search(self, *, text: Any = None, image: Any = None, k: Any = 20, rerank: Any = 0, offset: Any = 0,
               dedup: Any = _INDEX_DEFAULT, itc_weight: Any = 0.0) -> dict[str, Any]:
        text = _check_text(text)
        if image is not None and not isinstance(image, str):
            raise QueryError("image must be a base64 data URL string")
        if not text and not image:
            raise QueryError("empty query: give a text, an image, or both")
        k = _as_int("k", k, 1, MAX_K)
        rerank = _as_int("rerank", rerank, 0, MAX_RERANK)
        offset = _as_int("offset", offset, 0, MAX_OFFSET)
        options = {} if dedup is _INDEX_DEFAULT else {"dedup": _parse_dedup(dedup)}
        itc_weight = _as_float("itc_weight", itc_weight)
        # Decoded (and shrunk) before the model lock: a large upload never holds up other searches.
        image_bytes = _checked_upload(_upload_bytes(image)) if image else None
        query = {"text": text, "image": image_bytes, "k": k, "rerank": rerank, "offset": offset,
                 "itc_weight": itc_weight, **options}
        with self.model_lock:
            self._refresh()
            start = time.perf_counter()
            hits = self._run(query)
            elapsed_ms = 1000 * (time.perf_counter() - start)
            complete = self._complete()
        answer = {"hits": [hit.to_dict() for hit in hits], "offset": offset, "k": k,
                  "elapsed_ms": round(elapsed_ms, 1), "complete": complete}
        if not complete:
            answer["warning"] = INCOMPLETE_WARNING
        return answer

    def _refresh(self) -> None:
        """Let the index reload what another process (``simla index update``) changed since the last query."""
        if self.index.refresh():
            with self.storage_lock:
                self.thumbs.clear()  # ids may now name other images

    def _run(self, query: dict[str, Any]) -> list[Any]:
        return self.index.search(**query)

    def _complete(self) -> bool:
        """False only when the index says its build is not finished."""
        get_meta = getattr(getattr(self.index, "manifest", None), "get_meta", None)
        complete = get_meta("complete") if callable(get_meta) else self.index.info().get("complete")
        return complete is not False

    def thumbnail(self, item_id: int, size: int) -> bytes:
        _check_item_id(item_id)
        size = _as_int("size", size, *THUMB_SIZES)
        with self.storage_lock:
            data = self.thumbs.get((item_id, size))
            if data is None:
                data = self.index.thumbnail(item_id, size)
                self.thumbs.put((item_id, size), data)
        return data

    def image(self, item_id: int) -> bytes:
        _check_item_id(item_id)
        with self.storage_lock:
            return self.index.image_bytes(item_id)


# ------------------------------------------------------------------------------------------ the app
def _image_response(data: bytes, response_class: Any) -> Any:
    """An original image with the type its bytes say; a download for anything a browser should not render."""
    mime = image_mime(data)
    headers = {"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"}
    if mime not in INLINE_IMAGE_TYPES:
        mime = "application/octet-stream"
        headers["Content-Disposition"] = "attachment"
    return response_class(data, media_type=mime, headers=headers)


def _add_error_handlers(app: Any) -> None:
    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):  # FastAPI's handler signature
        # One error shape for the page: a 400 with a readable message instead of FastAPI's 422 list.
        problems = [f"{'.'.join(str(p) for p in err.get('loc', ())[1:]) or 'request'}: {err.get('msg')}"
                    for err in exc.errors()]
        return _json_response({"detail": "; ".join(problems) or "invalid request"}, 400)


def _add_page_routes(app: Any, index: Any, searcher: _Searcher) -> None:
    from fastapi.responses import HTMLResponse

    name = getattr(getattr(index, "path", None), "name", "") or ""
    page = render_app_page(f"simla search \u00b7 {name}" if name else "simla search", MAX_K, MAX_RERANK)

    @app.get("/", response_class=HTMLResponse)
    def home():
        return HTMLResponse(page)

    @app.get("/api/info")
    def info():
        return _answered(lambda: _json_response(searcher.info()))


def _add_search_routes(app: Any, searcher: _Searcher) -> None:
    from fastapi import Body

    @app.get("/api/search")
    def search_get(q: str | None = None, k: int = 20, rerank: int = 0, offset: int = 0,
                   dedup: str | None = None, itc_weight: float = 0.0):
        options = {} if dedup is None else {"dedup": dedup}
        return _answered(lambda: _json_response(searcher.search(text=q, k=k, rerank=rerank, offset=offset,
                                                                itc_weight=itc_weight, **options)))

    @app.post("/api/search")
    def search_post(payload: dict = Body(...)):
        def run() -> Any:
            unknown = sorted(set(payload) - {"text", "image", "k", "rerank", "offset", "dedup", "itc_weight"})
            if unknown:
                raise QueryError(f"unknown fields: {', '.join(unknown)} (expected text, image, k, rerank, offset, "
                                 f"dedup, itc_weight)")
            return _json_response(searcher.search(**payload))
        return _answered(run)


def _add_item_routes(app: Any, searcher: _Searcher) -> None:
    from fastapi.responses import Response

    @app.get("/api/thumb/{item_id}")
    def thumb(item_id: int, size: int = 256):
        return _answered(lambda: Response(searcher.thumbnail(item_id, size), media_type="image/jpeg",
                                          headers={"Cache-Control": "public, max-age=3600"}), item_id)

    @app.get("/api/image/{item_id}")
    def original(item_id: int):
        return _answered(lambda: _image_response(searcher.image(item_id), Response), item_id)


def create_app(index: Any, *, host: str | None = "127.0.0.1", allow_hosts: Iterable[str] = ()) -> Any:
    """A FastAPI app serving ``index``: the search page at ``/`` and a JSON API under ``/api``.

    Routes: ``GET /api/info``; ``GET /api/search?q=&k=&rerank=&offset=&dedup=`` and ``POST /api/search``
    with JSON ``{text, image (data URL), k, rerank, offset, dedup, itc_weight}``; ``GET
    /api/thumb/{item_id}?size=256`` (JPEG); ``GET /api/image/{item_id}`` (the original bytes).
    Without ``dedup`` a search uses the index's default; ``dedup=off`` (GET) or ``null`` (POST) keeps
    near-duplicates. A search answer says ``"complete": false`` (and gives a ``warning``) while the
    index's build is unfinished.

    Requests must name ``localhost``, ``127.0.0.1``, ``[::1]``, ``host`` (the address the server is bound
    to) or one of ``allow_hosts`` in their ``Host`` header; others get a 400. Errors are JSON
    ``{"detail": message}`` with the status of :func:`error_status` (413 for a body over MAX_BODY_BYTES).
    """
    fastapi = _require("fastapi")
    hosts = allowed_hosts(host, allow_hosts)
    searcher = _Searcher(index)
    app = fastapi.FastAPI(title="simla search", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.index = index
    app.add_middleware(RequestGuard, hosts=hosts, max_body=MAX_BODY_BYTES)
    _add_error_handlers(app)
    _add_page_routes(app, index, searcher)
    _add_search_routes(app, searcher)
    _add_item_routes(app, searcher)
    return app


def serve(index: Any, host: str = "127.0.0.1", port: int = 8000, allow_hosts: Iterable[str] = (),
          warnings_to: TextIO | None = None) -> None:
    """Serve ``index`` until interrupted (Ctrl-C). One process: the index lives in its memory.

    Listening on anything but a loopback address prints :func:`exposure_warning` (to stderr by default).
    """
    uvicorn = _require("uvicorn")
    app = create_app(index, host=host, allow_hosts=allow_hosts)
    warning = exposure_warning(host)
    if warning:
        print(warning, file=warnings_to or sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")


@contextlib.contextmanager
def background_server(index: Any, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 20.0,
                      allow_hosts: Iterable[str] = ()) -> Iterator[str]:
    """Serve ``index`` from a background thread for the duration of a ``with`` block; yields the base URL.

    For scripts and tests that drive the page with a browser. The socket is bound here (port 0
    picks a free one) so the URL is known, and taken, before the server thread starts.
    """
    uvicorn = _require("uvicorn")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(index, host=host, allow_hosts=allow_hosts), log_level="warning",
                            lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="simla-search-server",
                              daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the search server did not start on {host}:{bound_port}")
            time.sleep(0.02)
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
