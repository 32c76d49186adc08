"""What every request to `simla serve` passes before it reaches a route: the request guard.

- A ``Host`` allow-list against DNS rebinding: a web page from elsewhere that points its own domain name at
  127.0.0.1 reaches the server with that name in ``Host`` and is refused. Local names are always allowed,
  plus the address the server is bound to and the names given with ``--allow-host``.
- A request body cap: bodies are read (at most ``max_body`` bytes) before the app sees them, so an
  oversized upload is a 413 without being parsed.
- A strictly UTF-8 query string, and ``X-Content-Type-Options: nosniff`` on every answer.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import urllib.parse
from collections.abc import Iterable
from typing import Any

from ..errors import SimlaError

__all__ = ["INVALID_TEXT", "LOCAL_HOSTS", "HostNameError", "RequestGuard", "allowed_hosts", "exposure_warning",
           "json_bytes"]

LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
INVALID_TEXT = "query text is not valid Unicode"


class HostNameError(SimlaError, ValueError):
    """A name given to ``--allow-host`` (or ``allow_hosts=``) is not a host name or address."""


def json_bytes(content: Any) -> bytes:
    """A JSON answer's bytes."""
    # ASCII with \\u escapes: a file name that is not valid UTF-8 (a lone surrogate in Python) still encodes.
    return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")


def _host_of(header: str) -> str:
    """The host of a Host header, lower case, without port or trailing dot: ``"[::1]:8000"`` -> ``"[::1]"``."""
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[:end + 1] if end > 0 else value
    name, sep, port = value.rpartition(":")
    if sep and port.isdigit():
        value = name
    return value.rstrip(".")


def _host_name(value: str) -> str:
    """A bind address or ``--allow-host`` value as it appears in a Host header (bare IPv6 gets brackets)."""
    text = value.strip().lower()
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(text).version == 6:
            return f"[{text}]"
    name = _host_of(text)
    if name.startswith("[") and name.endswith("]"):
        valid = set(name[1:-1]) <= set("0123456789abcdef:.") and ":" in name
    else:
        valid = bool(name) and set(name) <= _HOST_CHARS
    if not valid:
        raise HostNameError(f"{value!r} is not a host name or address (expected e.g. photos.lan, 192.168.1.20 "
                            f"or ::1)")
    return name


def allowed_hosts(host: str | None = None, extra: Iterable[str] = ()) -> frozenset[str]:
    """The Host header names a server bound to ``host`` answers: LOCAL_HOSTS, ``host`` and ``extra``."""
    names = set(LOCAL_HOSTS) | {_host_name(name) for name in extra}
    if host:
        names.add(_host_name(host))
    return frozenset(names)


def _is_loopback(host: str) -> bool:
    name = _host_name(host).strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a name: it may well resolve to a network address


def exposure_warning(host: str) -> str | None:
    """What to tell whoever serves on ``host`` when it is not a loopback address (None when it is)."""
    if _is_loopback(host):
        return None
    where = "every network interface" if _host_name(host) in ("0.0.0.0", "[::]") else host
    return (f"warning: listening on {where}: anyone who can reach this machine over the network can search "
            f"the index and see its file names, thumbnails, images and paths (there is no login). Use --host "
            f"127.0.0.1 to keep it on this machine; other machines must use a name or address given with "
            f"--allow-host.")


class RequestGuard:
    """ASGI middleware in front of every route: Host allow-list, request body cap, UTF-8 query string (see
    the module's doc)."""

    def __init__(self, app: Any, hosts: frozenset[str], max_body: int) -> None:
        self.app = app
        self.hosts = hosts
        self.max_body = max_body

    def _refusal(self, scope: dict) -> tuple[int, str] | None:
        headers = dict(scope.get("headers") or ())
        host = _host_of(headers.get(b"host", b"").decode("latin-1"))
        if host not in self.hosts:
            return 400, (f"host not allowed: {host or '(no Host header)'!r} (expected one of "
                         f"{', '.join(sorted(self.hosts))}; simla serve --allow-host NAME adds one)")
        length = headers.get(b"content-length", b"0").strip()
        if length.isdigit() and int(length) > self.max_body:
            return 413, f"request body too large: {int(length):,} bytes (expected at most {self.max_body:,})"
        try:
            urllib.parse.unquote_to_bytes(scope.get("query_string", b"")).decode("utf-8")
        except UnicodeDecodeError:
            return 400, f"{INVALID_TEXT}: the URL's query string is not UTF-8"
        return None

    async def _read_body(self, receive: Any) -> tuple[list[dict], bool]:
        """The request's body messages, and whether it stayed within ``max_body`` bytes."""
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages, True
            size += len(message.get("body", b""))
            if size > self.max_body:
                return messages, False
            if not message.get("more_body"):
                return messages, True

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            messages, within = await self._read_body(receive)
            if not within:
                refusal = 413, f"request body too large (expected at most {self.max_body:,} bytes)"

            async def replay() -> dict:
                return messages.pop(0) if messages else await receive()
            receive = replay
        if refusal is not None:
            await _send_json(send, *refusal)
            return

        async def send_nosniff(message: dict) -> None:
            headers = list(message.get("headers", []))
            if message["type"] == "http.response.start" and all(k.lower() != _NOSNIFF[0] for k, _ in headers):
                message = {**message, "headers": [*headers, _NOSNIFF]}
            await send(message)
        await self.app(scope, receive, send_nosniff)


_NOSNIFF = (b"x-content-type-options", b"nosniff")


async def _send_json(send: Any, status: int, message: str) -> None:
    body = json_bytes({"detail": message})
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            _NOSNIFF]})
    await send({"type": "http.response.body", "body": body})
