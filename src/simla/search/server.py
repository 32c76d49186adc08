"""A small web server around a search index: one HTML page plus a JSON API.

FastAPI and uvicorn are an optional extra (``pip install "simla[serve]"``), so they are imported
inside the functions that need them and this module imports without them.

The endpoints are plain ``def`` functions: FastAPI runs them in its threadpool, which keeps the
CPU-bound model code off the event loop. The model is not thread-safe, so searches go through one
lock; thumbnails and originals only read image storage and take a second lock of their own, so a
page of thumbnails does not wait behind a long re-ranking.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import math
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from PIL import Image, UnidentifiedImageError

from simla.data.images import BadSampleError
from simla.search.html import image_mime, render_app_page
from ..errors import MissingExtraError


__all__ = ["MAX_K", "MAX_RERANK", "background_server", "create_app", "serve"]

MAX_K = 200  # hits per request: more is a page nobody scrolls and a slow response
MAX_RERANK = 1000  # ITM re-ranking costs one cross-attention pass per candidate
MAX_OFFSET = 100_000
MAX_TEXT_CHARS = 2000
MAX_IMAGE_BYTES = 20 * 1024 * 1024
THUMB_SIZES = (16, 1024)  # smallest and largest thumbnail side the API hands out
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


def _decode_image(value: str) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` URL (or of bare base64), checked to be an image."""
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
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise QueryError(f"image could not be decoded: {err}") from None
    return data


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


class _Searcher:
    """The index behind its locks; turns raw request values into checked index calls."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self.model_lock = threading.Lock()
        self.storage_lock = threading.Lock()
        self.thumbs = _ThumbnailCache()

    def search(self, *, text: Any = None, image: Any = None, k: Any = 20, rerank: Any = 0, offset: Any = 0,
               dedup: Any = _INDEX_DEFAULT, itc_weight: Any = 0.0) -> dict[str, Any]:
        if text is not None and not isinstance(text, str):
            raise QueryError("text must be a string")
        text = text.strip() if text else None
        if text and len(text) > MAX_TEXT_CHARS:
            raise QueryError(f"text is longer than {MAX_TEXT_CHARS} characters")
        if image is not None and not isinstance(image, str):
            raise QueryError("image must be a base64 data URL string")
        image_bytes = _decode_image(image) if image else None
        if not text and image_bytes is None:
            raise QueryError("empty query: give a text, an image, or both")
        k = _as_int("k", k, 1, MAX_K)
        rerank = _as_int("rerank", rerank, 0, MAX_RERANK)
        offset = _as_int("offset", offset, 0, MAX_OFFSET)
        options = {} if dedup is _INDEX_DEFAULT else {"dedup": _parse_dedup(dedup)}
        itc_weight = _as_float("itc_weight", itc_weight)
        with self.model_lock:
            start = time.perf_counter()
            hits = self.index.search(text=text, image=image_bytes, k=k, rerank=rerank, offset=offset,
                                     itc_weight=itc_weight, **options)
            elapsed_ms = 1000 * (time.perf_counter() - start)
        return {"hits": [hit.to_dict() for hit in hits], "offset": offset, "k": k,
                "elapsed_ms": round(elapsed_ms, 1)}

    def thumbnail(self, item_id: int, size: int) -> bytes:
        size = _as_int("size", size, *THUMB_SIZES)
        with self.storage_lock:
            data = self.thumbs.get((item_id, size))
            if data is None:
                data = self.index.thumbnail(item_id, size)
                self.thumbs.put((item_id, size), data)
        return data

    def image(self, item_id: int) -> bytes:
        with self.storage_lock:
            return self.index.image_bytes(item_id)


def create_app(index: Any) -> Any:
    """A FastAPI app serving ``index``: the search page at ``/`` and a JSON API under ``/api``.

    Routes: ``GET /api/info``; ``GET /api/search?q=&k=&rerank=&offset=&dedup=`` and ``POST /api/search``
    with JSON ``{text, image (data URL), k, rerank, offset, dedup, itc_weight}``; ``GET
    /api/thumb/{item_id}?size=256`` (JPEG); ``GET /api/image/{item_id}`` (the original bytes).
    Without ``dedup`` a search uses the index's default; ``dedup=off`` (GET) or ``null`` (POST) keeps
    near-duplicates. Bad queries are answered with HTTP 400 and ``{"detail": message}``, unknown ids with 404.
    """
    fastapi = _require("fastapi")
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    searcher = _Searcher(index)
    name = getattr(getattr(index, "path", None), "name", "") or ""
    page = render_app_page(f"simla search \u00b7 {name}" if name else "simla search", MAX_K, MAX_RERANK)
    app = fastapi.FastAPI(title="simla search", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.index = index

    def bad_request(message: str) -> Any:
        return JSONResponse({"detail": message}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):  # noqa: ANN001 - FastAPI's handler signature
        # One error shape for the page: a 400 with a readable message instead of FastAPI's 422 list.
        problems = [f"{'.'.join(str(p) for p in err.get('loc', ())[1:]) or 'request'}: {err.get('msg')}"
                    for err in exc.errors()]
        return bad_request("; ".join(problems) or "invalid request")

    @app.exception_handler(ValueError)
    async def _value_error(request, exc):  # noqa: ANN001 - FastAPI's handler signature
        # QueryError from the checks here, ValueError from the index for queries it cannot run.
        return bad_request(str(exc) or "invalid query")

    @app.get("/", response_class=HTMLResponse)
    def home():
        return HTMLResponse(page)

    @app.get("/api/info")
    def info():
        return index.info()

    @app.get("/api/search")
    def search_get(q: str | None = None, k: int = 20, rerank: int = 0, offset: int = 0,
                   dedup: str | None = None, itc_weight: float = 0.0):
        return searcher.search(text=q, k=k, rerank=rerank, offset=offset, itc_weight=itc_weight,
                               **({} if dedup is None else {"dedup": dedup}))

    @app.post("/api/search")
    def search_post(payload: dict = fastapi.Body(...)):
        allowed = {"text", "image", "k", "rerank", "offset", "dedup", "itc_weight"}
        unknown = sorted(set(payload) - allowed)
        if unknown:
            raise QueryError(f"unknown fields: {', '.join(unknown)}")
        return searcher.search(**payload)

    def not_found(item_id: int, exc: BaseException) -> Any:
        # An unknown id, or a file that was moved or broken since it was indexed.
        reason = f"no item with id {item_id}" if isinstance(exc, LookupError) else f"item {item_id} is unreadable: {exc}"
        return JSONResponse({"detail": reason}, status_code=404)

    @app.get("/api/thumb/{item_id}")
    def thumb(item_id: int, size: int = 256):
        try:
            data = searcher.thumbnail(item_id, size)
        except (LookupError, OSError, BadSampleError) as exc:
            return not_found(item_id, exc)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/api/image/{item_id}")
    def original(item_id: int):
        try:
            data = searcher.image(item_id)
        except (LookupError, OSError) as exc:
            return not_found(item_id, exc)
        return Response(data, media_type=image_mime(data), headers={"Cache-Control": "public, max-age=3600"})

    return app


def serve(index: Any, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``index`` until interrupted (Ctrl-C). One process: the index lives in its memory."""
    uvicorn = _require("uvicorn")
    uvicorn.run(create_app(index), host=host, port=port, log_level="info")


@contextlib.contextmanager
def background_server(index: Any, host: str = "127.0.0.1", port: int = 0,
                      startup_timeout: float = 20.0) -> Iterator[str]:
    """Serve ``index`` from a background thread for the duration of a ``with`` block; yields the base URL.

    For scripts and tests that drive the page with a browser. The socket is bound here (port 0
    picks a free one) so the URL is known, and taken, before the server thread starts.
    """
    uvicorn = _require("uvicorn")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(index), log_level="warning", lifespan="off")
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
