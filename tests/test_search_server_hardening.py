"""The search server left running: bad input, foreign Host headers, a changed or unfinished index.

Each test here answered HTTP 500 (or accepted what it must refuse) before the server checked for it.
Most run against the small fake index of test_search_server.py; the update test uses a real index.
"""

from __future__ import annotations

import io
import sqlite3
import threading
import time

import pytest
import torch
from PIL import Image
from test_search_index import _write
from test_search_server import FakeIndex, data_url, png_bytes

import simla
from simla.checkpoint import save_checkpoint
from simla.cli import main
from simla.search import Index, guard, server
from simla.search.lock import IndexBusyError
from simla.search.manifest import ItemNotFoundError
from simla.search.sources import ItemUnavailableError

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: I001 - after the skips: the serve extra is optional

LOCAL = "http://localhost:8000"


class SQLiteFakeIndex(FakeIndex):
    """Looks items up in SQLite like the real index, so ids past SQLite's integers overflow as there."""

    def _check(self, item_id: int) -> None:
        sqlite3.connect(":memory:").execute("SELECT ?", (item_id,))
        super()._check(item_id)

    def __len__(self) -> int:
        return self.n


@pytest.fixture
def fake(tmp_path):
    return SQLiteFakeIndex(tmp_path / "photos.idx")


@pytest.fixture
def client(fake):
    with TestClient(server.create_app(fake), base_url=LOCAL) as test_client:
        yield test_client


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def png_bomb() -> bytes:
    """A PNG of a few tens of kB that decodes to 20000 x 20000 pixels."""
    return encoded(Image.new("1", (20000, 20000)))


# ------------------------------------------------------------------------------------------ item ids
@pytest.mark.parametrize("url", ["/api/thumb/9223372036854775808", "/api/image/9223372036854775808",
                                 "/api/image/18446744073709551616", "/api/thumb/-9223372036854775809"])
def test_ids_outside_sqlite_integers_are_unknown_items(client, url):
    response = client.get(url)
    assert response.status_code == 404, response.text
    assert response.json()["detail"].startswith("no item with id ")


# ------------------------------------------------------------------------------------------ uploads
def test_png_bomb_is_refused_quickly_without_reaching_the_model(client, fake, png_bomb):
    assert len(png_bomb) < 200_000
    start = time.perf_counter()
    response = client.post("/api/search", json={"image": data_url(png_bomb)})
    elapsed = time.perf_counter() - start
    assert response.status_code == 400, response.text
    assert "pixels" in response.json()["detail"] and elapsed < 2.0
    assert not fake.calls


@pytest.mark.parametrize("size", [(12000, 12000), (9000, 9000)])
def test_images_over_the_pixel_cap_are_refused_from_their_header(client, fake, size):
    response = client.post("/api/search", json={"image": data_url(encoded(Image.new("1", size)))})
    assert response.status_code == 400
    assert f"at most {server.MAX_UPLOAD_PIXELS:,} pixels" in response.json()["detail"]
    assert not fake.calls


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_large_allowed_images_are_shrunk_before_the_model(client, fake, fmt):
    image = Image.new("RGB", (4096, 2048), "red")
    response = client.post("/api/search", json={"image": data_url(encoded(image, fmt)), "k": 2})
    assert response.status_code == 200, response.text
    with Image.open(io.BytesIO(fake.calls[-1]["image"])) as shrunk:
        assert shrunk.size == (server.QUERY_IMAGE_SIDE, server.QUERY_IMAGE_SIDE // 2)
        assert shrunk.convert("RGB").getpixel((10, 10))[0] > 240  # still the same red picture


def test_truncated_jpeg_is_a_bad_request(client, fake):
    jpeg = encoded(Image.effect_noise((256, 256), 64).convert("RGB"), "JPEG")
    response = client.post("/api/search", json={"image": data_url(jpeg[: len(jpeg) // 2])})
    assert response.status_code == 400, response.text
    assert "could not be decoded" in response.json()["detail"] and not fake.calls


def test_request_bodies_over_the_cap_are_413(fake, monkeypatch):
    monkeypatch.setattr(server, "MAX_BODY_BYTES", 4096)
    with TestClient(server.create_app(fake), base_url=LOCAL) as client:
        big = client.post("/api/search", json={"text": "dog", "image": data_url(b"x" * 8000)})
        assert big.status_code == 413 and "at most 4,096" in big.json()["detail"]
        streamed = client.post("/api/search", content=iter([b"{", b" " * 5000, b"}"]),
                               headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        assert client.post("/api/search", json={"text": "dog"}).status_code == 200
    assert len(fake.calls) == 1


# ------------------------------------------------------------------------------------------ query text
def test_lone_surrogates_are_not_valid_query_text(client, fake):
    got = client.get("/api/search?q=%ED%A0%80")
    assert got.status_code == 400 and got.json()["detail"].startswith(guard.INVALID_TEXT)
    posted = client.post("/api/search", content=b'{"text": "a \\ud800 dog"}',
                         headers={"content-type": "application/json"})
    assert posted.status_code == 400 and posted.json()["detail"].startswith(guard.INVALID_TEXT)
    odd_field = client.post("/api/search", content=b'{"\\udc80": 1}', headers={"content-type": "application/json"})
    assert odd_field.status_code == 400 and "unknown fields" in odd_field.json()["detail"]
    assert not fake.calls
    assert client.get("/api/search", params={"q": "caf\u00e9 \U0001f415"}).status_code == 200


def test_file_names_that_are_not_utf8_still_encode(tmp_path):
    class OddNames(SQLiteFakeIndex):
        def search(self, *args, **kwargs):
            hits = super().search(*args, **kwargs)
            hits[0].key = "photos/caf\udce9.png"  # os.fsdecode of a Latin-1 file name
            return hits

    with TestClient(server.create_app(OddNames(tmp_path / "x.idx")), base_url=LOCAL) as client:
        response = client.get("/api/search", params={"q": "dog", "k": 1})
    assert response.status_code == 200 and response.json()["hits"][0]["key"] == "photos/caf\udce9.png"


# ------------------------------------------------------------------------------------------ hosts
@pytest.mark.parametrize("host", ["localhost:8000", "localhost", "127.0.0.1:9", "[::1]:8000", "LOCALHOST."])
def test_local_host_headers_are_accepted(client, host):
    assert client.get("/api/info", headers={"host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example:8000", "attacker.test", "127.0.0.1.evil.example", ""])
def test_foreign_host_headers_are_refused(client, host):
    response = client.get("/api/info", headers={"host": host})
    assert response.status_code == 400 and response.json()["detail"].startswith("host not allowed")
    assert "/photos" not in response.text  # none of the index's paths


def test_allow_host_and_the_bound_address_are_accepted(fake):
    app = server.create_app(fake, host="192.168.1.20", allow_hosts=["photos.lan", "fd00::7"])
    with TestClient(app, base_url=LOCAL) as client:
        for host in ("photos.lan", "photos.lan:8000", "192.168.1.20:8000", "[fd00::7]:8000", "localhost"):
            assert client.get("/api/info", headers={"host": host}).status_code == 200, host
        assert client.get("/api/info", headers={"host": "other.lan"}).status_code == 400
    with pytest.raises(guard.HostNameError, match="not a host name"):
        server.create_app(fake, allow_hosts=["photos.lan/x"])


def test_simla_serve_passes_allow_host_and_warns_about_the_network(fake, monkeypatch, capsys):
    served = {}
    monkeypatch.setattr("simla.cli_search.Index.open", lambda *args, **kwargs: fake)
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: served.update(app=app, **kwargs))
    assert main(["serve", "photos.idx", "--host", "0.0.0.0", "--port", "8123", "--allow-host", "photos.lan",
                 "--allow-host", "10.0.0.5"]) == 0
    assert served["host"] == "0.0.0.0" and served["port"] == 8123
    err = capsys.readouterr().err
    assert "every network interface" in err and "file names, thumbnails" in err
    with TestClient(served["app"], base_url=LOCAL) as client:
        for host, status in (("photos.lan", 200), ("10.0.0.5:8123", 200), ("elsewhere.lan", 400)):
            assert client.get("/api/info", headers={"host": host}).status_code == status, host

    assert main(["serve", "photos.idx"]) == 0  # the default, 127.0.0.1: no warning
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("host, warns", [("127.0.0.1", False), ("localhost", False), ("::1", False),
                                         ("127.0.0.2", False), ("0.0.0.0", True), ("::", True),
                                         ("192.168.1.20", True), ("photos.lan", True)])
def test_exposure_warning_for_non_loopback_addresses(host, warns):
    assert (guard.exposure_warning(host) is not None) == warns


# ------------------------------------------------------------------------------------------ index state
def test_unfinished_index_is_flagged_in_answers_and_on_the_page(tmp_path):
    class Unfinished(SQLiteFakeIndex):
        def info(self) -> dict:
            return {**super().info(), "complete": False}

    with TestClient(server.create_app(Unfinished(tmp_path / "x.idx")), base_url=LOCAL) as client:
        body = client.get("/api/search", params={"q": "dog"}).json()
        assert body["complete"] is False and "not complete" in body["warning"]
        page = client.get("/").text
    assert 'id="notice"' in page and "data.complete === false" in page


def test_complete_index_answers_complete(client):
    body = client.get("/api/search", params={"q": "dog"}).json()
    assert body["complete"] is True and "warning" not in body


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(simla.create_model("simla_tiny", queue_size=8, task="base"),
                           tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def test_search_after_an_update_by_another_process(tmp_path, checkpoint):
    photos = tmp_path / "photos"
    for i in range(6):
        _write(photos / f"p{i}.png", i)
    assert main(["index", "build", str(photos), "--checkpoint", str(checkpoint), "--output", str(tmp_path / "idx"),
                 "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--quiet"]) == 0
    served = Index.open(tmp_path / "idx")
    with TestClient(server.create_app(served), base_url=LOCAL) as client:
        before = client.get("/api/search", params={"q": "a red square", "k": 6}).json()["hits"]
        assert len(before) == 6
        (photos / "p0.png").unlink()
        (photos / "p1.png").unlink()
        _write(photos / "p9.png", 9)
        # The update runs on its own Index object, as `simla index update` in another process would.
        assert main(["index", "update", str(tmp_path / "idx"), "--num-workers", "0", "--device", "cpu",
                     "--quiet"]) == 0
        after = client.get("/api/search", params={"q": "a red square", "k": 6, "rerank": 3})
        assert after.status_code == 200, after.text
        keys = [hit["key"] for hit in after.json()["hits"]]
        assert sorted(keys) == ["p2.png", "p3.png", "p4.png", "p5.png", "p9.png"]
        gone = next(hit["item_id"] for hit in before if hit["key"] == "p0.png")
        for url in (f"/api/thumb/{gone}", f"/api/image/{gone}"):
            response = client.get(url)
            assert response.status_code == 404 and response.json()["detail"] == f"no item with id {gone}"


# ------------------------------------------------------------------------------------------ errors
def test_error_kinds_map_to_statuses():
    def unavailable(kind: str) -> ItemUnavailableError:
        return ItemUnavailableError("p0.png", "/photos/p0.png", kind, "a reason")

    assert server.error_status(IndexBusyError("an update is running")) == 503
    assert server.error_status(unavailable("changed")) == 409
    assert [server.error_status(unavailable(kind)) for kind in ("missing", "outside_source", "not_regular",
                                                                 "too_large")] == [404] * 4
    assert server.error_status(ItemNotFoundError("no item with id 3")) == 404
    assert server.error_status(KeyError("no item")) == 404
    assert server.error_status(ValueError("bad")) == 400
    assert server.error_status(simla.errors.ConfigError("bad")) == 400
    assert server.error_status(RuntimeError("bug")) == 500


def test_index_errors_become_json_answers(tmp_path, caplog):
    class Troubled(SQLiteFakeIndex):
        def search(self, text=None, *args, **kwargs):
            if text == "busy":
                raise IndexBusyError("an update is running in another process")
            if text == "bug":
                raise RuntimeError("secret internals /home/me/index")
            return super().search(text, *args, **kwargs)

    with TestClient(server.create_app(Troubled(tmp_path / "x.idx")), base_url=LOCAL) as client:
        busy = client.get("/api/search", params={"q": "busy"})
        assert busy.status_code == 503 and "another process" in busy.json()["detail"]
        assert busy.headers["retry-after"]
        bug = client.get("/api/search", params={"q": "bug"})
        assert bug.status_code == 500 and "secret" not in bug.text and "log" in bug.json()["detail"]
    assert "secret internals" in caplog.text  # the traceback goes to the log only


def test_original_images_carry_their_type_and_nosniff(client, fake, monkeypatch):
    original = client.get("/api/image/3")
    assert original.status_code == 200 and original.content == png_bytes((3 * 37 % 256, 3 * 91 % 256, 200))
    assert original.headers["content-type"] == "image/png"
    assert original.headers["x-content-type-options"] == "nosniff"
    assert "content-disposition" not in original.headers

    monkeypatch.setattr(fake, "image_bytes", lambda item_id: b"<html><script>alert(1)</script>")
    html = client.get("/api/image/3")
    assert html.headers["content-type"] == "application/octet-stream"
    assert html.headers["content-disposition"] == "attachment" and html.headers["x-content-type-options"] == "nosniff"
    assert client.get("/api/info").headers["x-content-type-options"] == "nosniff"


def test_uploads_are_checked_without_waiting_for_the_model_lock(tmp_path, png_bomb):
    """A bomb is refused while a slow search holds the model lock: the check happens before the lock."""
    pytest.importorskip("uvicorn")
    import httpx

    slow = SQLiteFakeIndex(tmp_path / "x.idx", delay=3.0)
    with server.background_server(slow) as url:
        searching = threading.Thread(target=httpx.get, args=(f"{url}/api/search",),
                                     kwargs={"params": {"q": "slow"}, "timeout": 30})
        searching.start()
        deadline = time.monotonic() + 10
        while not slow.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert slow.active == 1  # the slow search holds the model lock now
        start = time.perf_counter()
        refused = httpx.post(f"{url}/api/search", json={"image": data_url(png_bomb)}, timeout=30)
        assert refused.status_code == 400 and time.perf_counter() - start < 1.5
        assert slow.active == 1
        searching.join()
    assert [call["text"] for call in slow.calls] == ["slow"]


def test_the_index_refreshes_before_each_search_and_its_answer_stands(tmp_path):
    class Refreshing(SQLiteFakeIndex):
        refreshes = 0

        def refresh(self) -> bool:
            self.refreshes += 1
            return True

        def search(self, *args, **kwargs):
            if kwargs.get("rerank"):
                raise type("ItemNotFoundError", (KeyError,), {})("no item with id 3")
            return super().search(*args, **kwargs)

    index = Refreshing(tmp_path / "x.idx")
    with TestClient(server.create_app(index), base_url=LOCAL) as client:
        assert client.get("/api/search", params={"q": "dog"}).status_code == 200
        assert index.refreshes == 1
        missing = client.get("/api/search", params={"q": "dog", "rerank": 5})
        assert missing.status_code == 404 and missing.json()["detail"] == "no item with id 3"
        assert index.refreshes == 2  # refreshed once, not retried: a refreshing index's answer stands
