"""The search server and result pages: a static HTML report, the JSON API, and the page in a real browser.

Everything runs against a small fake index with the engine's interface, so no model is loaded.
The browser tests need selenium, chromium and chromedriver and skip cleanly without them (but fail under
SIMLA_REQUIRE_BROWSER=1, as CI sets it).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from simla.search.html import image_mime, render_app_page, render_results_page
from simla.search.results import Hit

REPO = Path(__file__).resolve().parents[1]
NASTY_CAPTION = 'a cat <script>alert("caption")</script> & a "dog"'


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeIndex:
    """The search engine's interface over ``n`` tiny coloured PNGs.

    A text query ranks the items as a rotation that starts at ``len(text) % n`` ("a dog" puts items
    5, 6, 7, ... first); an image query starts at the image's byte length. Item 6 has a caption with
    markup, item 7 carries collapsed duplicates.
    """

    def __init__(self, path: Path, n: int = 45, delay: float = 0.0) -> None:
        self.path = path
        self.n = n
        self.delay = delay
        self.calls: list[dict] = []
        self.active = 0
        self.max_active = 0
        self._count_lock = threading.Lock()

    def refresh(self) -> bool:
        return False  # no other process changes a fake

    def info(self) -> dict:
        return {"items": self.n, "errors": 1, "source": "folder:photos", "model": "fake-simla", "dim": 8,
                "rerank_available": True}

    def caption(self, item_id: int) -> str | None:
        if item_id == 6:
            return NASTY_CAPTION
        return None if item_id == 9 else f"photo number {item_id}"

    def search(self, text: str | None = None, image=None, *, k: int = 20, rerank: int = 0, offset: int = 0,
               dedup: float | None = 0.98, itc_weight: float = 0.0) -> list[Hit]:
        with self._count_lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if text is None and image is None:
                raise ValueError("give a text, an image or both")
            if k < 1:
                raise ValueError("k must be at least 1")
            if text == "boom":
                raise ValueError("the fake refuses 'boom'")
            if image is not None:
                Image.open(io.BytesIO(image)).load()
            self.calls.append({"text": text, "image": image, "k": k, "rerank": rerank, "offset": offset,
                               "dedup": dedup, "itc_weight": itc_weight})
            time.sleep(self.delay)
            start = len(text) if text else len(image)
            hits = []
            for position in range(self.n):
                item_id = (start + position) % self.n
                itc = round(0.9 - 0.01 * position, 4)
                itm = round(1.0 - 0.02 * position, 4) if position < rerank else None
                hits.append(Hit(rank=position + 1, item_id=item_id, key=f"photos/{item_id:03d}.png",
                                path=str(self.path.parent / f"photos/{item_id:03d}.png"),
                                caption=self.caption(item_id), score=itm if itm is not None else itc, itc=itc,
                                itm=itm, duplicates=["photos/copy-a.png", "photos/copy-b.png"] if item_id == 7 else []))
            return hits[offset:offset + k]
        finally:
            with self._count_lock:
                self.active -= 1

    def _check(self, item_id: int) -> None:
        if not 0 <= item_id < self.n:
            raise KeyError(item_id)

    def image_bytes(self, item_id: int) -> bytes:
        self._check(item_id)
        return png_bytes((item_id * 37 % 256, item_id * 91 % 256, 200))

    def thumbnail(self, item_id: int, size: int = 256) -> bytes:
        image = Image.open(io.BytesIO(self.image_bytes(item_id))).convert("RGB")
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG")
        return buffer.getvalue()

    def explain(self, text: str, item_ids: list[int]) -> dict[int, bytes]:
        for item_id in item_ids:
            self._check(item_id)
        return {item_id: png_bytes((255, 0, 0)) for item_id in item_ids}


@pytest.fixture
def fake(tmp_path: Path) -> FakeIndex:
    return FakeIndex(tmp_path / "photos.idx")


class _Collector(HTMLParser):
    """Cards (item id, rank) and every src/href of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[tuple[int, int]] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if "data-item-id" in values:
            self.cards.append((int(values["data-item-id"]), int(values["data-rank"])))
        self.links += [value for name, value in attrs if name in ("src", "href") and value]


def collect(page: str) -> _Collector:
    collector = _Collector()
    collector.feed(page)
    return collector


# ---------------------------------------------------------------------------------------------
# The static results page
# ---------------------------------------------------------------------------------------------


def test_results_page_shows_every_hit_escaped_and_self_contained(fake):
    hits = fake.search("a dog", k=12, rerank=3)
    overlays = fake.explain("a dog", [hits[0].item_id, hits[2].item_id])
    query = {"text": "a <b>dog</b>", "image_thumbnail": fake.thumbnail(1, 64), "k": 12, "rerank": 3}
    page = render_results_page(query, hits, lambda hit: fake.thumbnail(hit.item_id), overlays, title="<demo>")

    found = collect(page)
    assert found.cards == [(hit.item_id, hit.rank) for hit in hits]
    # Every image is embedded: nothing is fetched from anywhere.
    assert found.links and all(link.startswith("data:image/") for link in found.links)
    assert "http://" not in page and "https://" not in page
    # Text from the data and the query is escaped, never parsed as markup.
    assert "<script>" not in page
    assert "a cat &lt;script&gt;alert(&quot;caption&quot;)&lt;/script&gt; &amp; a &quot;dog&quot;" in page
    assert "a &lt;b&gt;dog&lt;/b&gt;" in page and "<title>&lt;demo&gt;</title>" in page
    # Overlays beside exactly the hits that have one; thumbnails, query image and overlays are all there.
    assert page.count("Grad-CAM</figcaption>") == 2
    assert page.count('class="card with-overlay" data-item-id') == 2
    assert len(found.links) == len(hits) + 1 + len(overlays)
    # Scores, ITM when re-ranked, the key and the collapsed duplicates.
    assert f"{hits[0].score:.4f}" in page and "ITM" in page and '<span class="file">005.png</span>' in page
    assert "+2 near-duplicates collapsed" in page and "photos/copy-a.png" in page
    assert page.count('class="caption"') == len(hits) - 1  # item 9 has none


def test_results_page_without_hits_or_overlays():
    page = render_results_page({"text": "nothing"}, [], lambda hit: b"")
    assert "No results." in page and "data-item-id" not in page and "Grad-CAM" not in page


def test_results_page_never_shows_negative_zero():
    hit = Hit(rank=1, item_id=0, key="a.png", path="/a.png", caption=None, score=-0.00001, itc=-0.0002)
    page = render_results_page({"text": "x"}, [hit], lambda hit: b"\x89PNG\r\n\x1a\n")
    assert "<dd>0.0000</dd>" in page and "<dd>0.000</dd>" in page and "<dd>-" not in page


def test_image_mime_from_magic_numbers(fake):
    assert image_mime(fake.image_bytes(0)) == "image/png"
    assert image_mime(fake.thumbnail(0)) == "image/jpeg"
    assert image_mime(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert image_mime(b"not an image") == "application/octet-stream"


def test_app_page_is_self_contained():
    page = render_app_page("simla search <x>", max_k=50, max_rerank=300)
    assert "http://" not in page and "https://" not in page
    assert "<script src" not in page and "<link" not in page
    assert 'max="50"' in page and 'max="300"' in page and "simla search &lt;x&gt;" in page


# ---------------------------------------------------------------------------------------------
# The HTTP API
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def client(fake):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from simla.search.server import create_app

    with TestClient(create_app(fake), base_url="http://localhost:8000") as test_client:
        yield test_client


def data_url(data: bytes) -> str:
    return f"data:{image_mime(data)};base64,{base64.b64encode(data).decode()}"


def test_module_imports_without_fastapi_and_says_how_to_install(monkeypatch, fake):
    monkeypatch.setitem(sys.modules, "fastapi", None)
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    from simla.search import server

    with pytest.raises(ImportError, match=r'pip install "simla\[serve\]"'):
        server.create_app(fake)
    with pytest.raises(ImportError, match=r'pip install "simla\[serve\]"'):
        server.serve(fake)


def test_page_and_info(client, fake):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert 'id="search-form"' in response.text and "photos.idx" in response.text
    assert "http://" not in response.text and "https://" not in response.text
    assert client.get("/api/info").json() == {**fake.info(), "model_label": "fake-simla (8-d features)"}


def test_model_label_describes_the_loaded_model(tmp_path):
    from types import SimpleNamespace

    import simla
    from simla.search.server import create_app, model_label

    pytest.importorskip("httpx")
    testclient = pytest.importorskip("fastapi.testclient")
    # The demo model: the simla_tiny preset run at 48 px with 4 px patches; the preset's name alone hides that.
    config = simla.get_config("simla_tiny", **{"vision.image_size": 48, "vision.patch_size": 4})
    label = "simla_tiny (48 px images, 4 px patches, 64-d features)"
    assert model_label({"model": "simla_tiny", "dim": 64}, SimpleNamespace(config=config)) == label
    assert model_label({"model": "simla_tiny", "dim": 64}) == "simla_tiny (64-d features)"
    assert model_label({"model": None, "dim": 64}) is None

    index = FakeIndex(tmp_path / "photos.idx")
    index.model = SimpleNamespace(config=config)  # an index's model, as Index.model loads it
    with testclient.TestClient(create_app(index), base_url="http://localhost:8000") as test_client:
        info = test_client.get("/api/info").json()
    assert info["model_label"] == label and info["model"] == "fake-simla"


def test_get_search_round_trip_and_paging(client, fake):
    response = client.get("/api/search", params={"q": "a dog", "k": 5, "rerank": 2})
    assert response.status_code == 200
    body = response.json()
    assert body["hits"] == [hit.to_dict() for hit in fake.search("a dog", k=5, rerank=2)]
    assert body["offset"] == 0 and body["k"] == 5 and body["elapsed_ms"] >= 0
    assert fake.calls[0] == {"text": "a dog", "image": None, "k": 5, "rerank": 2, "offset": 0, "dedup": 0.98,
                             "itc_weight": 0.0}

    page2 = client.get("/api/search", params={"q": "a dog", "k": 5, "offset": 5}).json()
    assert [hit["rank"] for hit in page2["hits"]] == [6, 7, 8, 9, 10]
    assert page2["hits"] == [hit.to_dict() for hit in fake.search("a dog", k=20)[5:10]]
    assert page2["offset"] == 5

    # Without dedup the index's own default applies (the fake's is 0.98); "off" keeps duplicates.
    client.post("/api/search", json={"text": "a dog"})
    assert fake.calls[-1]["dedup"] == 0.98
    client.get("/api/search", params={"q": "a dog", "dedup": "off"})
    assert fake.calls[-1]["dedup"] is None
    client.get("/api/search", params={"q": "a dog", "dedup": "0.9"})
    assert fake.calls[-1]["dedup"] == 0.9


def test_post_search_with_an_uploaded_image(client, fake):
    image = png_bytes((10, 200, 30), (40, 30))
    response = client.post("/api/search", json={"image": data_url(image), "k": 4, "offset": 2, "dedup": None})
    assert response.status_code == 200, response.text
    call = fake.calls[-1]
    assert call["image"] == image and call["text"] is None and call["dedup"] is None
    assert response.json()["hits"] == [hit.to_dict() for hit in fake.search(image=image, k=4, offset=2)]

    both = client.post("/api/search", json={"text": "red", "image": data_url(image), "rerank": 3}).json()
    assert fake.calls[-1]["text"] == "red" and fake.calls[-1]["image"] == image
    assert len(both["hits"]) == 20 and both["hits"][0]["itm"] is not None


@pytest.mark.parametrize("request_args, message", [
    (("get", {"params": {}}), "empty query"),
    (("get", {"params": {"q": "   "}}), "empty query"),
    (("post", {"json": {}}), "empty query"),
    (("post", {"json": {"text": None, "image": None}}), "empty query"),
    (("post", {"json": {"image": "data:image/png;base64,@@not-base64@@"}}), "base64"),
    (("post", {"json": {"image": "data:image/png," + "x" * 10}}), "base64"),
    (("post", {"json": {"image": data_url(b"definitely not an image")}}), "decoded"),
    (("get", {"params": {"q": "dog", "k": 201}}), "k must be between 1 and 200"),
    (("get", {"params": {"q": "dog", "k": 0}}), "k must be between"),
    (("get", {"params": {"q": "dog", "k": "many"}}), "k"),
    (("post", {"json": {"text": "dog", "rerank": 1001}}), "rerank must be between 0 and 1000"),
    (("post", {"json": {"text": "dog", "offset": -1}}), "offset"),
    (("post", {"json": {"text": "dog", "dedup": 3}}), "dedup"),
    (("post", {"json": {"text": "dog", "colour": "red"}}), "unknown fields: colour"),
    (("post", {"content": b"{not json", "headers": {"content-type": "application/json"}}), "json"),
    (("get", {"params": {"q": "boom"}}), "the fake refuses 'boom'"),  # the index's own ValueError
])
def test_bad_queries_are_answered_400_with_a_message(client, fake, request_args, message):
    method, kwargs = request_args
    response = getattr(client, method)("/api/search", **kwargs)
    assert response.status_code == 400, response.text
    assert message.lower() in response.json()["detail"].lower()
    assert not fake.calls


def test_thumbnails_and_originals(client, fake):
    response = client.get("/api/thumb/3", params={"size": 20})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg" and "max-age" in response.headers["cache-control"]
    assert response.content[:3] == b"\xff\xd8\xff"
    assert max(Image.open(io.BytesIO(response.content)).size) <= 20
    assert client.get("/api/thumb/3").content == fake.thumbnail(3, 256)

    original = client.get("/api/image/3")
    assert original.status_code == 200 and original.headers["content-type"] == "image/png"
    assert original.content == fake.image_bytes(3)

    for url in ("/api/thumb/999", "/api/image/999", "/api/thumb/-1"):
        missing = client.get(url)
        assert missing.status_code == 404 and "no item with id" in missing.json()["detail"]
    assert client.get("/api/thumb/3", params={"size": 5000}).status_code == 400


def test_searches_are_serialised_on_a_real_server(tmp_path):
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    from simla.search.server import background_server

    fake = FakeIndex(tmp_path / "photos.idx", delay=0.05)
    with background_server(fake) as url:
        def ask(text: str) -> None:
            for _ in range(2):
                assert httpx.get(f"{url}/api/search", params={"q": text, "k": 3}, timeout=10).status_code == 200

        threads = [threading.Thread(target=ask, args=(f"query {i}",)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(fake.calls) == 8 and fake.max_active == 1


# ---------------------------------------------------------------------------------------------
# The page in a real headless browser
# ---------------------------------------------------------------------------------------------


def load_screenshot_script():
    spec = importlib.util.spec_from_file_location("screenshot_search_page", REPO / "scripts" / "screenshot_search_page.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def browser_tools():
    """The screenshot script's browser helpers. Without selenium or a Chromium the browser tests skip; but
    where CI installed them (SIMLA_REQUIRE_BROWSER=1, set by .ci/run) that fails, so they cannot quietly skip."""
    required = os.environ.get("SIMLA_REQUIRE_BROWSER") == "1"
    script = load_screenshot_script()
    try:
        import fastapi  # noqa: F401
        import selenium  # noqa: F401
        import uvicorn  # noqa: F401
        script.find_browser()
    except (ImportError, FileNotFoundError) as err:
        message = f"no browser to test the page in: {err} (pip install -e '.[dev]'; apt install chromium chromium-driver)"
        if required:
            pytest.fail(message)
        pytest.skip(message)
    return script


def test_search_page_in_a_headless_browser(browser_tools, fake, tmp_path):
    from selenium.webdriver.common.by import By

    from simla.search.server import background_server

    script = browser_tools
    with background_server(fake) as url:
        driver = script.make_driver(1280, 900)
        try:
            # Type a query, submit, wait for the cards and their thumbnails.
            assert script.run_query(driver, url, "a dog", k=6) == 6
            cards = driver.find_elements(By.CSS_SELECTOR, "#results .card")
            assert [int(card.get_attribute("data-item-id")) for card in cards] == [5, 6, 7, 8, 9, 10]
            assert "46 images" not in driver.find_element(By.ID, "status").text
            assert "45 images" in driver.find_element(By.ID, "status").text
            assert "model fake-simla (8-d features)" in driver.find_element(By.ID, "status").text
            widths = driver.execute_script(
                "return Array.from(document.querySelectorAll('#results img'), (img) => img.naturalWidth);")
            assert len(widths) == 6 and all(width > 0 for width in widths)
            # The caption with markup is shown as text and never runs.
            assert cards[1].find_element(By.CSS_SELECTOR, ".caption").text == NASTY_CAPTION
            assert driver.execute_script("return document.querySelectorAll('#results script').length") == 0
            assert "copy-a.png" in cards[2].find_element(By.CSS_SELECTOR, "details").get_attribute("title")

            # Next page.
            driver.find_element(By.ID, "next").click()
            script.wait_for(driver, "return document.querySelector('#results .card').dataset.rank;",
                            lambda rank: rank == "7", 10, "the second page")
            ids = [int(card.get_attribute("data-item-id"))
                   for card in driver.find_elements(By.CSS_SELECTOR, "#results .card")]
            assert ids == [11, 12, 13, 14, 15, 16] and fake.calls[-1]["offset"] == 6
            assert driver.find_element(By.ID, "prev").is_enabled()
            assert "offset=6" in driver.current_url

            # A query the index refuses: its message is shown to the user.
            driver.find_element(By.ID, "q").clear()
            driver.find_element(By.ID, "q").send_keys("boom")
            driver.find_element(By.ID, "search-button").click()
            message = script.wait_for(driver, "return document.getElementById('error').textContent;",
                                      bool, 10, "the error message")
            assert "the fake refuses 'boom'" in message and "HTTP 400" in message

            # An image query: the file travels as a data URL.
            picture = tmp_path / "query.png"
            picture.write_bytes(png_bytes((0, 0, 255), (30, 20)))
            driver.execute_script("document.getElementById('k').value = 4;")
            driver.find_element(By.ID, "q").clear()
            driver.find_element(By.ID, "image").send_keys(str(picture))
            script.wait_for(driver, "return !document.getElementById('preview').hidden;", bool, 10,
                            "the image preview")
            calls = len(fake.calls)
            driver.find_element(By.ID, "search-button").click()
            script.wait_for(driver, "return document.querySelectorAll('#results .card').length;",
                            lambda n: n == 4 and len(fake.calls) > calls, 10, "the image results")
            assert fake.calls[-1]["image"] == picture.read_bytes() and fake.calls[-1]["text"] is None
            assert driver.find_element(By.ID, "error").get_attribute("hidden") is not None
        finally:
            driver.quit()


def test_screenshot_script_drives_the_page(browser_tools, fake, tmp_path):
    from simla.search.server import background_server

    with background_server(fake) as url:
        path = browser_tools.capture_search_page(url, "a dog", tmp_path / "shots" / "page.png", rerank=3, k=8)
    with Image.open(path) as shot:
        assert shot.size == (1280, 900)
    assert fake.calls[-1]["rerank"] == 3 and fake.calls[-1]["k"] == 8


# Window widths the result grid must fill, and the columns its CSS yields there with the page's 24 px side
# padding and 14 px gaps: 210 px tracks for plain cards, 340 px for cards with a Grad-CAM overlay beside.
GRID_WIDTHS = {1280: (5, 3), 1024: (4, 2), 800: (3, 2), 400: (1, 1)}


def resize(driver, width: int, height: int = 900) -> None:
    driver.set_window_size(width, height)
    inner = driver.execute_script("return window.innerWidth;")
    if inner != width:
        driver.set_window_size(2 * width - inner, height)


def assert_row_is_full(layout: dict, columns: int) -> None:
    # One card per track, side by side, the last one flush with the grid's right edge; nothing overflows.
    assert layout["columns"] == columns, layout
    assert layout["row"] == layout["positions"] == columns, layout
    assert abs(layout["left_gap"]) < 1 and abs(layout["right_gap"]) < 1, layout
    assert not layout["overflow"], layout


def test_result_grid_rows_fill_the_width_in_a_browser(browser_tools, fake, tmp_path):
    from simla.search.server import background_server

    hits = fake.search("a dog", k=12)
    static = {}
    for name, overlays in (("plain", None), ("overlays", fake.explain("a dog", [hit.item_id for hit in hits]))):
        page = render_results_page({"text": "a dog"}, hits, lambda hit: fake.thumbnail(hit.item_id), overlays)
        static[name] = tmp_path / f"results-{name}.html"
        static[name].write_text(page, encoding="utf-8")
    with background_server(fake) as url:
        driver = browser_tools.make_driver(1280, 900)
        try:
            for width, (plain, with_overlays) in GRID_WIDTHS.items():
                resize(driver, width)
                assert browser_tools.run_query(driver, url, "a dog", k=12) == 12
                assert_row_is_full(browser_tools.grid_layout(driver), plain)
                for name, columns in (("plain", plain), ("overlays", with_overlays)):
                    driver.get(static[name].as_uri())
                    layout = browser_tools.grid_layout(driver)
                    assert layout["window"] == width and layout["cards"] == 12
                    assert_row_is_full(layout, columns)
        finally:
            driver.quit()
