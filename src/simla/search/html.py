"""HTML for search results: a self-contained report file and the page the search server serves.

Both pages share one stylesheet so a saved report looks like the live page. Nothing here loads
anything from the network: a report is a single file you can mail or archive (its images are
embedded as data URIs), and the live page must work on machines without internet access.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Iterable
from typing import Any

from simla.search.results import Hit
from simla.search.sources import image_mime_type

__all__ = ["STYLE", "image_mime", "render_app_page", "render_results_page"]

def image_mime(data: bytes) -> str:
    """The MIME type of encoded image bytes, from their magic number (`application/octet-stream` when they are
    no image encoding).

    Browsers refuse or mis-render data URIs and responses with the wrong type, and file
    extensions are not available for WebDataset samples, so the bytes decide.
    """
    return image_mime_type(data) or "application/octet-stream"


def _data_uri(data: bytes) -> str:
    return f"data:{image_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


STYLE = """
:root {
  --bg: #f4f5f7; --panel: #ffffff; --ink: #1d2330; --muted: #667085; --line: #e1e4ea;
  --accent: #2f5fd0; --accent-ink: #ffffff; --chip: #eef2fb; --bad: #b42318; --bad-bg: #fef3f2;
  --radius: 10px;
}
* { box-sizing: border-box; }
body {
  margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
}
header.top {
  display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap;
  padding: 14px 24px; background: var(--panel); border-bottom: 1px solid var(--line);
}
header.top h1 { margin: 0; font-size: 18px; font-weight: 650; letter-spacing: -0.01em; }
.status { color: var(--muted); font-size: 13px; }
main { padding: 18px 24px 40px; max-width: 1600px; margin: 0 auto; }
.panel {
  background: var(--panel); border: 1px solid var(--line); border-radius: var(--radius);
  padding: 14px 16px; margin-bottom: 16px;
}
.query { display: flex; gap: 14px; align-items: center; }
.query img { width: 72px; height: 72px; object-fit: cover; border-radius: 6px; border: 1px solid var(--line); }
.query-text { font-size: 17px; font-weight: 600; }
.chips { display: flex; flex-wrap: wrap; gap: 6px; margin-top: 6px; }
.chip {
  background: var(--chip); color: #33415c; border-radius: 999px; padding: 1px 9px; font-size: 12px;
}
.summary { color: var(--muted); margin: 0 0 10px; min-height: 1.4em; }
/* Every card takes one track, so a full row always spans the grid's width (a card spanning two tracks
   leaves a hole wherever the column count is odd). Cards with an explanation overlay show two pictures side
   by side, so their grid has wider tracks. min(..., 100%) keeps one column inside a narrow window. */
.grid {
  display: grid; gap: 14px; grid-template-columns: repeat(auto-fill, minmax(min(210px, 100%), 1fr));
}
.grid.with-overlays { grid-template-columns: repeat(auto-fill, minmax(min(340px, 100%), 1fr)); }
.card {
  background: var(--panel); border: 1px solid var(--line); border-radius: var(--radius);
  overflow: hidden; display: flex; flex-direction: column;
}
.figures { display: flex; background: #eceef2; position: relative; }
.figures a, .figures figure { flex: 1; display: block; margin: 0; aspect-ratio: 4 / 3; min-width: 0; }
.figures img { width: 100%; height: 100%; object-fit: contain; display: block; }
.figures figure { position: relative; }
.figures > * + * { border-left: 1px solid var(--line); }
.figures figcaption {
  position: absolute; bottom: 6px; right: 6px; background: rgba(20, 24, 33, .72); color: #fff;
  font-size: 11px; padding: 1px 6px; border-radius: 4px;
}
.rank {
  position: absolute; top: 8px; left: 8px; background: rgba(20, 24, 33, .78); color: #fff;
  font-weight: 650; font-size: 12px; padding: 1px 8px; border-radius: 999px; pointer-events: none;
}
.body { padding: 9px 11px 11px; display: flex; flex-direction: column; gap: 6px; flex: 1; }
.scores { display: flex; flex-wrap: wrap; gap: 4px 16px; margin: 0; }
.scores div { display: flex; flex-direction: column; }
.scores dt { color: var(--muted); font-size: 10px; letter-spacing: .06em; text-transform: uppercase; }
.scores dd { margin: 0; font-size: 13px; font-variant-numeric: tabular-nums; font-weight: 600; }
.scores div:first-child dd { color: var(--accent); }
.caption {
  margin: 0; display: -webkit-box; -webkit-line-clamp: 3; -webkit-box-orient: vertical; overflow: hidden;
}
/* Long keys lose the start of their folder, never the file name. */
.key {
  display: flex; min-width: 0; margin-top: auto; white-space: nowrap;
  font: 11.5px/1.35 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; color: var(--muted);
}
.key .dir { overflow: hidden; text-overflow: ellipsis; direction: rtl; text-align: left; min-width: 0; flex: 0 1 auto; }
.key .file { flex: none; color: #475467; }
details.dups { font-size: 12px; color: var(--muted); }
details.dups summary { cursor: pointer; }
details.dups ul { margin: 4px 0 0; padding-left: 16px; font-family: ui-monospace, Menlo, Consolas, monospace; }
details.dups li { overflow-wrap: anywhere; }
.error {
  background: var(--bad-bg); color: var(--bad); border: 1px solid #fecdca; border-radius: var(--radius);
  padding: 10px 14px; margin-bottom: 14px; white-space: pre-wrap;
}
.notice {
  background: #fffaeb; color: #93370d; border: 1px solid #fedf89; border-radius: var(--radius);
  padding: 10px 14px; margin-bottom: 14px;
}
.empty { color: var(--muted); padding: 30px 0; text-align: center; }
form.search { display: flex; flex-direction: column; gap: 10px; }
.row { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; }
input[type=search] {
  flex: 1; min-width: 240px; font: inherit; font-size: 15px; padding: 9px 12px;
  border: 1px solid #c9ced8; border-radius: 8px; background: #fff;
}
input[type=search]:focus, input[type=number]:focus { outline: 2px solid #b8c9f2; border-color: var(--accent); }
input[type=number] { width: 78px; font: inherit; padding: 5px 8px; border: 1px solid #c9ced8; border-radius: 6px; }
button, .file-button {
  font: inherit; padding: 8px 14px; border-radius: 8px; border: 1px solid #c9ced8; background: #fff;
  color: var(--ink); cursor: pointer; white-space: nowrap;
}
button.primary { background: var(--accent); border-color: var(--accent); color: var(--accent-ink); font-weight: 600; }
button:disabled { opacity: .5; cursor: default; }
.file-button input { display: none; }
.settings { display: flex; gap: 8px 18px; flex-wrap: wrap; color: #344054; font-size: 13px; }
.settings label { display: flex; gap: 6px; align-items: center; }
.settings .hint { color: var(--muted); }
.preview { display: flex; gap: 10px; align-items: center; font-size: 13px; color: #344054; }
.preview img { height: 48px; width: 48px; object-fit: cover; border-radius: 6px; border: 1px solid var(--line); }
.preview button { padding: 3px 10px; font-size: 12px; }
.pager { display: flex; justify-content: center; align-items: center; gap: 14px; margin-top: 20px; }
.pager span { color: var(--muted); font-variant-numeric: tabular-nums; }
[hidden] { display: none !important; }
"""


# ---------------------------------------------------------------------------------------------
# A self-contained report of one search.
# ---------------------------------------------------------------------------------------------

# Query settings worth showing, in display order, with their labels.
_SETTINGS = (("k", "k"), ("rerank", "re-rank"), ("offset", "offset"), ("dedup", "dedup"),
             ("itc_weight", "ITC weight"))


def _fixed(value: float, digits: int) -> str:
    """``value`` with ``digits`` decimals, never as a puzzling "-0.000"."""
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _score_rows(hit: Hit) -> str:
    rows = [("score", _fixed(hit.score, 4)), ("ITC", _fixed(hit.itc, 3))]
    if hit.itm is not None:
        rows.append(("ITM", _fixed(100 * hit.itm, 1) + "%"))
    return "".join(f"<div><dt>{_esc(label)}</dt><dd>{_esc(value)}</dd></div>" for label, value in rows)


def _key(hit: Hit) -> str:
    folder, cut, name = hit.key.rpartition("/")
    tooltip = hit.key if hit.path == hit.key else f"{hit.key}\n{hit.path}"
    # The marks keep the folder's slashes in place inside the right-to-left box that ellipsises its start.
    folder_html = f'<span class="dir">\u200e{_esc(folder + cut)}\u200e</span>' if cut else ""
    return f'<div class="key" title="{_esc(tooltip)}">{folder_html}<span class="file">{_esc(name)}</span></div>'


def _duplicates(keys: Iterable[str]) -> str:
    keys = list(keys)
    if not keys:
        return ""
    noun = "near-duplicate" if len(keys) == 1 else "near-duplicates"
    items = "".join(f"<li>{_esc(key)}</li>" for key in keys)
    tooltip = _esc("\n".join(keys))
    return (f'<details class="dups" title="{tooltip}"><summary>+{len(keys)} {noun} collapsed</summary>'
            f"<ul>{items}</ul></details>")


def _card(hit: Hit, thumbnail: bytes, overlay: bytes | None) -> str:
    label = hit.caption or hit.key
    figures = (f'<img src="{_data_uri(thumbnail)}" alt="{_esc(label)}">'
               f'<span class="rank">#{hit.rank}</span>')
    if overlay is not None:
        figures = (f"<figure>{figures}</figure>"
                   f'<figure><img src="{_data_uri(overlay)}" alt="{_esc("Grad-CAM: " + label)}">'
                   f"<figcaption>Grad-CAM</figcaption></figure>")
    else:
        figures = f"<figure>{figures}</figure>"
    caption = f'<p class="caption">{_esc(hit.caption)}</p>' if hit.caption else ""
    classes = "card with-overlay" if overlay is not None else "card"
    return (f'<article class="{classes}" data-item-id="{hit.item_id}" data-rank="{hit.rank}">'
            f'<div class="figures">{figures}</div>'
            f'<div class="body"><dl class="scores">{_score_rows(hit)}</dl>{caption}'
            f"{_key(hit)}"
            f"{_duplicates(hit.duplicates)}</div></article>")


def _query_panel(query: dict[str, Any], count: int) -> str:
    image = query.get("image_thumbnail")
    picture = f'<img src="{_data_uri(image)}" alt="query image">' if image else ""
    text = query.get("text")
    if text:
        headline = f'<div class="query-text">&ldquo;{_esc(text)}&rdquo;</div>'
    else:
        headline = '<div class="query-text">Image query</div>'
    chips = [f'<span class="chip">{_esc(label)} {_esc(query[name])}</span>'
             for name, label in _SETTINGS if query.get(name) is not None]
    chips.append(f'<span class="chip">{count} {"result" if count == 1 else "results"}</span>')
    return (f'<section class="panel query">{picture}<div>{headline}'
            f'<div class="chips">{"".join(chips)}</div></div></section>')


def render_results_page(query: dict[str, Any], hits: list[Hit], thumbnail: Callable[[Hit], bytes],
                        overlays: dict[int, bytes] | None = None, title: str = "simla search") -> str:
    """One self-contained HTML file showing a query and its hits as a grid of cards.

    Args:
        query: what was asked: ``text`` and/or ``image_thumbnail`` (encoded image bytes), plus any of
            ``k``, ``rerank``, ``offset``, ``dedup`` and ``itc_weight`` to show as settings.
        hits: the hits to show, in order.
        thumbnail: encoded thumbnail bytes for a hit (e.g. ``lambda h: index.thumbnail(h.item_id)``).
        overlays: optional Grad-CAM overlays by item id, shown beside the thumbnail.
        title: the page title and heading.

    Every image is embedded as a data URI and every text is escaped, so the file can be opened
    anywhere, offline, and captions from untrusted sources cannot inject markup.
    """
    overlays = overlays or {}
    cards = "\n".join(_card(hit, thumbnail(hit), overlays.get(hit.item_id)) for hit in hits)
    if not hits:
        cards = '<p class="empty">No results.</p>'
    return _page(title, f"""<header class="top"><h1>{_esc(title)}</h1></header>
<main>
{_query_panel(query, len(hits))}
<div class="{"grid with-overlays" if any(hit.item_id in overlays for hit in hits) else "grid"}">
{cards}
</div>
</main>""")


def _page(title: str, body: str) -> str:
    """A complete HTML document around ``body``, with the shared stylesheet inline."""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title>
<style>{STYLE}</style>
</head>
<body>
{body}
</body>
</html>
"""


# ---------------------------------------------------------------------------------------------
# The interactive page of the search server.
# ---------------------------------------------------------------------------------------------

_APP_BODY = """
<header class="top"><h1>__TITLE__</h1><div id="status" class="status">Loading index information&hellip;</div></header>
<main>
<section class="panel">
<form id="search-form" class="search" autocomplete="off">
  <div class="row">
    <input id="q" type="search" name="q" placeholder="Describe the image you are looking for&hellip;" autofocus>
    <label class="file-button" title="Search with an image (alone or together with the text)">Image&hellip;
      <input id="image" type="file" accept="image/*"></label>
    <button id="search-button" class="primary" type="submit">Search</button>
  </div>
  <div id="preview" class="preview" hidden>
    <img id="preview-img" alt="query image"><span id="preview-name"></span>
    <button id="clear-image" type="button">Remove image</button>
  </div>
  <div class="settings">
    <label>Results per page <input id="k" type="number" min="1" max="__MAX_K__" value="20"></label>
    <label>Re-rank the top <input id="rerank" type="number" min="0" max="__MAX_RERANK__" value="0">
      <span class="hint">with the ITM head (0 = off)</span></label>
  </div>
</form>
</section>
<div id="error" class="error" role="alert" hidden></div>
<div id="notice" class="notice" role="status" hidden></div>
<p id="summary" class="summary"></p>
<div id="results" class="grid"></div>
<nav id="pager" class="pager" hidden>
  <button id="prev" type="button">&larr; Previous</button><span id="page-label"></span>
  <button id="next" type="button">Next &rarr;</button>
</nav>
</main>
"""

# Results are built with DOM calls and textContent only: captions and keys come from the indexed
# data and must never be parsed as markup. URLs are relative so the page also works behind a
# reverse proxy that mounts the server under a path prefix.
_APP_SCRIPT = """
"use strict";
const $ = (id) => document.getElementById(id);
const state = {text: "", image: null, k: 20, rerank: 0, offset: 0, hasNext: false, busy: false};

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function fetchJSON(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    throw new Error("The search server cannot be reached (" + err.message + ").");
  }
  let data = null;
  try { data = await response.json(); } catch (err) { data = null; }
  if (!response.ok) {
    const detail = data && data.detail;
    const message = typeof detail === "string" ? detail : (detail ? JSON.stringify(detail) : response.statusText);
    throw new Error(message + " (HTTP " + response.status + ")");
  }
  return data;
}

async function loadInfo() {
  try {
    const info = await fetchJSON("api/info");
    const parts = [info.items.toLocaleString() + " images"];
    if (info.errors) parts.push(info.errors.toLocaleString() + " unreadable");
    if (info.complete === false) parts.push("build not complete");
    if (info.source) parts.push("from " + info.source);
    if (info.model_label) parts.push("model " + info.model_label);
    parts.push(info.rerank_available ? "ITM re-ranking available" : "no ITM re-ranking");
    $("status").textContent = parts.join(" \\u00b7 ");
    if (!info.rerank_available) {
      $("rerank").value = 0;
      $("rerank").disabled = true;
      $("rerank").title = "This index has no ITM head to re-rank with.";
    }
  } catch (err) {
    $("status").textContent = "Index information unavailable: " + err.message;
  }
}

function fixed(value, digits) {
  const text = value.toFixed(digits);
  return /^-0\\.?0*$/.test(text) ? text.slice(1) : text;
}

// Long keys lose the start of their folder, never the file name (see the .key CSS).
function keyLine(hit) {
  const key = document.createElement("div");
  key.className = "key";
  key.title = hit.path === hit.key ? hit.key : hit.key + "\\n" + hit.path;
  const cut = hit.key.lastIndexOf("/") + 1;
  if (cut) {
    const folder = document.createElement("span");
    folder.className = "dir";
    folder.textContent = "\\u200e" + hit.key.slice(0, cut) + "\\u200e";
    key.append(folder);
  }
  const name = document.createElement("span");
  name.className = "file";
  name.textContent = hit.key.slice(cut);
  key.append(name);
  return key;
}

function scoreRow(dl, label, value) {
  const div = document.createElement("div");
  const dt = document.createElement("dt");
  const dd = document.createElement("dd");
  dt.textContent = label;
  dd.textContent = value;
  div.append(dt, dd);
  dl.append(div);
}

function card(hit) {
  const el = document.createElement("article");
  el.className = "card";
  el.dataset.itemId = hit.item_id;
  el.dataset.rank = hit.rank;

  const figures = document.createElement("div");
  figures.className = "figures";
  const link = document.createElement("a");
  link.href = "api/image/" + hit.item_id;
  link.target = "_blank";
  link.rel = "noopener";
  link.title = "Open the original image";
  const img = document.createElement("img");
  img.src = "api/thumb/" + hit.item_id + "?size=256";
  img.alt = hit.caption || hit.key;
  img.loading = "lazy";
  link.append(img);
  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = "#" + hit.rank;
  figures.append(link, rank);

  const body = document.createElement("div");
  body.className = "body";
  const scores = document.createElement("dl");
  scores.className = "scores";
  scoreRow(scores, "score", fixed(hit.score, 4));
  scoreRow(scores, "ITC", fixed(hit.itc, 3));
  if (hit.itm !== null && hit.itm !== undefined) scoreRow(scores, "ITM", fixed(100 * hit.itm, 1) + "%");
  body.append(scores);
  if (hit.caption) {
    const caption = document.createElement("p");
    caption.className = "caption";
    caption.textContent = hit.caption;
    caption.title = hit.caption;
    body.append(caption);
  }
  body.append(keyLine(hit));

  const dups = hit.duplicates || [];
  if (dups.length) {
    const details = document.createElement("details");
    details.className = "dups";
    details.title = dups.join("\\n");
    const summary = document.createElement("summary");
    summary.textContent = "+" + dups.length + (dups.length === 1 ? " near-duplicate" : " near-duplicates") + " collapsed";
    const list = document.createElement("ul");
    for (const name of dups) {
      const li = document.createElement("li");
      li.textContent = name;
      list.append(li);
    }
    details.append(summary, list);
    body.append(details);
  }
  el.append(figures, body);
  return el;
}

function updatePager() {
  $("prev").disabled = state.busy || state.offset === 0;
  $("next").disabled = state.busy || !state.hasNext;
}

function render(data) {
  $("results").replaceChildren(...data.hits.map(card));
  // An unfinished index answers from the images indexed so far: say so next to the results.
  const incomplete = data.complete === false;
  const warning = data.warning || "some images are not indexed yet.";
  $("notice").textContent = incomplete ? "Incomplete index: " + warning : "";
  $("notice").hidden = !incomplete;
  const first = data.offset + 1;
  const last = data.offset + data.hits.length;
  if (!data.hits.length) {
    $("summary").textContent = data.offset ? "No more results." : "No results.";
  } else {
    $("summary").textContent = "Results " + first + "\\u2013" + last + " \\u00b7 " + Math.round(data.elapsed_ms) + " ms";
  }
  $("page-label").textContent = data.hits.length ? first + "\\u2013" + last : "";
  state.offset = data.offset;
  state.hasNext = data.hits.length >= data.k;
  $("pager").hidden = data.offset === 0 && !state.hasNext;
}

function setBusy(busy) {
  state.busy = busy;
  $("search-button").disabled = busy;
  $("search-button").textContent = busy ? "Searching\\u2026" : "Search";
  updatePager();
}

async function search(offset) {
  if (state.busy) return;
  if (!state.text && !state.image) {
    showError("Type a description or choose an image to search with.");
    return;
  }
  setBusy(true);
  try {
    const data = await fetchJSON("api/search", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({text: state.text || null, image: state.image, k: state.k,
                            rerank: state.rerank, offset: offset}),
    });
    showError("");
    render(data);
    if (!state.image) {
      const params = new URLSearchParams({q: state.text, k: state.k, rerank: state.rerank, offset: offset});
      history.replaceState(null, "", "?" + params.toString());
    }
    window.scrollTo({top: 0});
  } catch (err) {
    showError(err.message);
  } finally {
    setBusy(false);
  }
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("Could not read " + file.name));
    reader.readAsDataURL(file);
  });
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.text = $("q").value.trim();
  state.k = parseInt($("k").value, 10) || 20;
  state.rerank = $("rerank").disabled ? 0 : (parseInt($("rerank").value, 10) || 0);
  search(0);
});
$("prev").addEventListener("click", () => search(Math.max(0, state.offset - state.k)));
$("next").addEventListener("click", () => search(state.offset + state.k));
$("image").addEventListener("change", async () => {
  const file = $("image").files[0];
  if (!file) return;
  try {
    state.image = await readAsDataURL(file);
    $("preview-img").src = state.image;
    $("preview-name").textContent = file.name;
    $("preview").hidden = false;
    showError("");
  } catch (err) {
    showError(err.message);
  }
});
$("clear-image").addEventListener("click", () => {
  state.image = null;
  $("image").value = "";
  $("preview").hidden = true;
});

loadInfo();
const params = new URLSearchParams(location.search);
if (params.get("q")) {
  $("q").value = params.get("q");
  if (params.get("k")) $("k").value = params.get("k");
  if (params.get("rerank")) $("rerank").value = params.get("rerank");
  state.text = params.get("q");
  state.k = parseInt($("k").value, 10) || 20;
  state.rerank = parseInt($("rerank").value, 10) || 0;
  search(Math.max(0, parseInt(params.get("offset") || "0", 10) || 0));
}
"""


def render_app_page(title: str = "simla search", max_k: int = 200, max_rerank: int = 1000) -> str:
    """The search server's single page: form, result grid and pager, with its CSS and JS inline.

    Inline so that the server has a single route for its UI and works without internet access;
    the limits are written into the number inputs so the browser flags values the API would refuse.
    """
    body = (_APP_BODY.replace("__TITLE__", _esc(title)).replace("__MAX_K__", str(int(max_k)))
            .replace("__MAX_RERANK__", str(int(max_rerank))))
    return _page(title, f"{body}\n<script>{_APP_SCRIPT}</script>")
