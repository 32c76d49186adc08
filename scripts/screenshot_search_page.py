"""Screenshot the search server's page for the docs: serve an index, run one query in headless Chromium.

    python scripts/screenshot_search_page.py --index INDEX_DIR --query "a red bus" \
        --output docs/images/search_page.png --rerank 50

Needs the serving extra (``pip install "simla[serve]"``), selenium, and a Chromium with a matching
chromedriver on PATH (or given with --chromium / --chromedriver). The browser-driving part,
:func:`capture_search_page`, takes only a base URL, so the tests run it against a fake index.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

# JavaScript predicates evaluated in the page while waiting.
_RESULTS_OR_ERROR = """
const error = document.getElementById("error");
if (error && !error.hidden && error.textContent) return {error: error.textContent};
const busy = document.getElementById("search-button").disabled;
const cards = document.querySelectorAll("#results .card").length;
return busy ? null : {cards: cards};
"""

# Thumbnails in (or just below) the viewport must have finished loading; lazy ones further down
# never start in a screenshot, so they are not waited for.
_THUMBS_STATE = """
const visible = Array.from(document.querySelectorAll("#results img"))
    .filter((img) => img.getBoundingClientRect().top < window.innerHeight);
return {
  pending: visible.filter((img) => !img.complete).length,
  broken: visible.filter((img) => img.complete && img.naturalWidth === 0).map((img) => img.src),
  loaded: visible.filter((img) => img.complete && img.naturalWidth > 0).length,
};
"""

# The result grid's first row as laid out: how many tracks the CSS made, how many cards sit in the row, at
# how many distinct x positions, and how far the row's last card stops short of the grid's right edge.
_GRID_LAYOUT = """
const grid = document.querySelector(".grid");
const cards = Array.from(grid.querySelectorAll(".card"), (card) => card.getBoundingClientRect());
const box = grid.getBoundingClientRect();
const row = cards.filter((card) => Math.abs(card.top - cards[0].top) < 1);
return {
  window: window.innerWidth,
  columns: getComputedStyle(grid).gridTemplateColumns.split(" ").length,
  cards: cards.length,
  row: row.length,
  positions: new Set(row.map((card) => Math.round(card.left))).size,
  left_gap: row[0].left - box.left,
  right_gap: box.right - row[row.length - 1].right,
  overflow: document.documentElement.scrollWidth > document.documentElement.clientWidth,
};
"""


def grid_layout(driver: Any) -> dict[str, Any]:
    """The result grid's first row in the page ``driver`` shows (see ``_GRID_LAYOUT``)."""
    return driver.execute_script(_GRID_LAYOUT)


def find_browser(chromium: str | None = None, chromedriver: str | None = None) -> tuple[str, str]:
    """Paths of a Chromium binary and its chromedriver; raises FileNotFoundError naming what is missing."""
    browser = chromium or next((p for name in ("chromium", "chromium-browser", "google-chrome")
                                if (p := shutil.which(name))), None)
    driver = chromedriver or shutil.which("chromedriver")
    if not browser or not driver:
        missing = [name for name, found in (("chromium", browser), ("chromedriver", driver)) if not found]
        raise FileNotFoundError(f"not found on PATH: {', '.join(missing)}")
    return browser, driver


def make_driver(width: int = 1280, height: int = 900, chromium: str | None = None,
                chromedriver: str | None = None) -> Any:
    """A headless Chromium WebDriver whose viewport is ``width`` x ``height`` CSS pixels at scale 1."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = find_browser(chromium, chromedriver)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--hide-scrollbars", "--force-device-scale-factor=1", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    # The window size includes no browser chrome in headless mode, but check: the docs image size matters.
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight];")
    if inner != [width, height]:
        driver.set_window_size(width + width - inner[0], height + height - inner[1])
    return driver


def wait_for(driver: Any, script: str, done: Any, timeout: float, what: str) -> Any:
    """Poll ``script`` in the page until ``done(result)`` holds; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = driver.execute_script(script)
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last state: {result})")
        time.sleep(0.1)


def run_query(driver: Any, base_url: str, query: str, rerank: int = 0, k: int | None = None,
              timeout: float = 120.0) -> int:
    """Open the page, search for ``query`` and wait for the results and visible thumbnails; returns the card count.

    Raises RuntimeError with the page's message when the search fails.
    """
    from selenium.webdriver.common.by import By

    driver.get(base_url.rstrip("/") + "/")
    wait_for(driver, "return document.getElementById('status').textContent;",
             lambda text: text and not text.startswith("Loading"), 30, "the index information")
    box = driver.find_element(By.ID, "q")
    box.clear()
    box.send_keys(query)
    if k is not None:
        driver.execute_script("document.getElementById('k').value = arguments[0];", k)
    field = driver.find_element(By.ID, "rerank")
    if rerank and field.is_enabled():
        driver.execute_script("arguments[0].value = arguments[1];", field, rerank)
    driver.find_element(By.ID, "search-button").click()
    outcome = wait_for(driver, _RESULTS_OR_ERROR, lambda r: r is not None, timeout, "the search results")
    if "error" in outcome:
        raise RuntimeError(f"the search failed: {outcome['error']}")
    state = wait_for(driver, _THUMBS_STATE, lambda s: s["pending"] == 0, 60, "the thumbnails")
    if state["broken"]:
        raise RuntimeError(f"thumbnails failed to load: {state['broken'][:5]}")
    return outcome["cards"]


def capture_search_page(base_url: str, query: str, output: str | Path, rerank: int = 0, k: int | None = None,
                        width: int = 1280, height: int = 900, timeout: float = 120.0,
                        chromium: str | None = None, chromedriver: str | None = None) -> Path:
    """Run ``query`` on the search page served at ``base_url`` and save a ``width`` x ``height`` PNG."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    driver = make_driver(width, height, chromium, chromedriver)
    try:
        run_query(driver, base_url, query, rerank=rerank, k=k, timeout=timeout)
        driver.execute_script("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0);")
        if not driver.save_screenshot(str(output)):
            raise RuntimeError(f"the browser could not write {output}")
    finally:
        driver.quit()
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True, help="an index folder (as written by the index builder)")
    parser.add_argument("--query", required=True, help="the text to search for")
    parser.add_argument("--output", default="docs/images/search_page.png", help="where to write the PNG")
    parser.add_argument("--rerank", type=int, default=0, help="re-rank this many candidates with ITM")
    parser.add_argument("--k", type=int, default=None, help="results per page (the page's default if unset)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--chromium", default=None, help="Chromium binary (default: found on PATH)")
    parser.add_argument("--chromedriver", default=None, help="chromedriver binary (default: found on PATH)")
    args = parser.parse_args(argv)

    from simla.search import Index
    from simla.search.server import background_server

    index = Index.open(args.index)
    with background_server(index) as url:
        path = capture_search_page(url, args.query, args.output, rerank=args.rerank, k=args.k,
                                   width=args.width, height=args.height, chromium=args.chromium,
                                   chromedriver=args.chromedriver)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
