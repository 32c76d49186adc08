"""`simla.search.Index`: build, update and query an index of images with a SIMLA checkpoint.

Ranking. A query (a text, an image, or both: then the normalised sum of the two features) is compared
with every stored image feature by cosine similarity (ITC). With ``rerank=R`` the R best candidates of a
text query are re-scored by the ITM head, which reads the text and the image together; the final score
of a re-ranked hit is its ITM match probability plus ``itc_weight`` times its cosine (``itc_weight=0``,
the default, is ITM alone, the reference's retrieval rule up to the monotone softmax: the reference ranks
by the positive-class logit, simla by the match probability, which can be compared across queries).
Re-ranked hits come first; the others follow in ITC order with ``score = itc``, as in the reference,
which gives every candidate outside the top R the lowest score. Image queries are ranked by ITC alone.

Precision. An index records the precision family its features were made in (``float``: fp32 or bf16
autocast; ``int8``: a dynamically quantized copy of the model, CPU only; see `simla.search.precision`).
Queries embed and re-rank with that family (an int8 index quantizes its model itself, and a query's
features are comparable with the stored ones); an update in the other family is refused.

Near-duplicates. With ``dedup=t``, a hit whose stored feature has cosine >= t with a better-ranked hit is
folded into that hit (listed in ``Hit.duplicates``) instead of taking a place of its own. It is off by
default because the right threshold depends on the model: a well-trained model puts re-encoded or resized
copies of a photo above 0.99 and distinct photos below, but a small model may not separate distinct
images of one kind from copies (the easy-VQA demo model gives two different red circles 0.996).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..checkpoint import load_checkpoint
from ..data.images import load_image
from ..distributed import get_rank, is_distributed
from ..errors import SimlaError
from ..explain import gradcam
from ..explain.render import overlay_png
from ..models.quantize import INT8, int8_device, is_int8, quantize_int8
from ..version import __version__
from .build import NoImagesError, SyncSummary, describe_no_images, sync_index
from .fingerprint import ModelMismatchError, model_fingerprint
from .lock import LOCK_NAME, write_lock
from .manifest import MANIFEST_NAME, CorruptIndexError, ItemNotFoundError, Manifest, StoredItem
from .precision import precision_family, update_precision
from .rerank import itm_probabilities
from .results import Hit
from .sources import SourceSpec, read_item_bytes, resolve_source
from .store import FEATURES_DIR, load_live_features, verify_chunks
from .vectors import VectorIndex


__all__ = ["Index", "IndexExistsError", "IndexNotFoundError", "ItemNotFoundError", "NoImagesError", "SearchError"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: ITM scores kept per open index, keyed by (query text, feature row): paging through a re-ranked query (or
#: asking it again) re-ranks nothing twice. 100,000 entries are a few MB.
ITM_CACHE_ENTRIES = 100_000


class IndexNotFoundError(FileNotFoundError):
    """The folder holds no simla index."""


class IndexExistsError(SimlaError, FileExistsError):
    """A build was asked into a folder that holds a finished index."""


class SearchError(SimlaError, ValueError):
    """A query or an index use that cannot work as asked (the message says what to change)."""


@dataclass
class _Live:
    """What a search reads, loaded together and replaced together (a refresh swaps the whole object, so a
    search running meanwhile keeps a consistent view): item ids, their features, the ITM score cache."""

    ids: np.ndarray
    vectors: VectorIndex
    itm_cache: OrderedDict[tuple[str, int], float | None] = field(default_factory=OrderedDict)


def jpeg_thumbnail(image: Image.Image, size: int = 256) -> bytes:
    """JPEG bytes of ``image`` scaled down (never up) so that its longer side is at most ``size`` pixels."""
    image = image.copy()
    image.thumbnail((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def _load_model(checkpoint: str | os.PathLike, device: str | torch.device):
    model = load_checkpoint(checkpoint, task="base")
    return model.to(device).eval()


def _refuse_int8_model(model) -> None:
    if is_int8(model):
        raise SearchError("give the index the float model: an int8 index quantizes it itself, and checks the "
                          "float weights' fingerprint; pass precision='int8' to build one")


def _with_images(index: Index, spec: SourceSpec) -> Index:
    """A just-built ``index``, or NoImagesError (its manifest closed) when its source gave no usable image."""
    if len(index) > 0:
        return index
    why = describe_no_images(spec, index.manifest.errors())
    index.manifest.close()
    raise NoImagesError(f"no images to index in {spec.location}: {why}; no index was written to {index.path}")


def _remove_empty_index(folder: Path, before: set[str] | None) -> None:
    """Undo a build that found no images: its index files, whatever else it added, the folder if it made it."""
    if not folder.is_dir():
        return
    ours = {MANIFEST_NAME, f"{MANIFEST_NAME}-wal", f"{MANIFEST_NAME}-shm", f"{MANIFEST_NAME}-journal", FEATURES_DIR,
            LOCK_NAME}
    for name in os.listdir(folder):
        if name in ours or before is None or name not in before:
            path = folder / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if before is None and not any(folder.iterdir()):
        folder.rmdir()


class Index:
    """An index folder: ``manifest.sqlite`` (items, errors, model fingerprint) and ``features/*.npy``.

    Open one with :meth:`open`, create one with :meth:`build`. The model is loaded (from the checkpoint
    recorded at build time, unless another is given) and checked against the index's fingerprint the
    first time a query or an update needs it.
    """

    def __init__(self, path: Path, manifest: Manifest, *, model=None, checkpoint: str | None = None,
                 device: str | torch.device = "cpu", backend: str = "auto") -> None:
        self.path = path
        self.manifest = manifest
        self.device = torch.device(device)
        self.backend = backend
        self._checkpoint = checkpoint
        self._model = None
        self._int8_model = None  # the quantized copy an int8 index embeds and re-ranks with, made on first use
        self._live: _Live | None = None
        self._data_version = manifest.data_version()
        if model is not None:
            _refuse_int8_model(model)
            self._check_model(model)
            self._model = model.eval()

    # ------------------------------------------------------------------------------ creation
    @classmethod
    def open(cls, path: str | os.PathLike, *, model=None, checkpoint: str | os.PathLike | None = None,
             device: str | torch.device = "cpu", backend: str = "auto") -> "Index":
        """Open an existing index. ``checkpoint``/``model`` replace the recorded checkpoint (same weights only)."""
        folder = Path(path)
        if not (folder / MANIFEST_NAME).is_file():
            raise IndexNotFoundError(f"{folder}: no simla index here (no {MANIFEST_NAME}); create one with "
                                     f"`simla index build SOURCE --checkpoint C --output {folder}`")
        manifest = Manifest(folder / MANIFEST_NAME)
        version = manifest.get_meta("format_version")
        if version is None or manifest.get_meta("dim") is None:
            manifest.close()
            raise CorruptIndexError(f"{folder / MANIFEST_NAME}: the index manifest is damaged (its meta table lacks "
                                    f"format_version or dim); run `simla index check {folder} --repair`, or move "
                                    f"{folder} away and build the index again")
        if version != FORMAT_VERSION:
            manifest.close()
            raise SearchError(f"{folder}: index format {version!r}, this simla reads format {FORMAT_VERSION}")
        return cls(folder, manifest, model=model, checkpoint=os.fspath(checkpoint) if checkpoint else None,
                   device=device, backend=backend)

    @classmethod
    def build(cls, source: str | os.PathLike, output: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None,
              model=None, image_root: str | os.PathLike | None = None, batch_size: int = 64, num_workers: int = 2,
              precision: str = "auto", device: str | torch.device = "cpu", progress: bool = True,
              backend: str = "auto", allow_empty: bool = True) -> "Index":
        """Index every image of ``source`` (folder, annotation file or shard pattern) into ``output``.

        A folder holding an unfinished build of the same source and model is resumed; a finished index is
        refused (use :meth:`update`). Give ``checkpoint`` (recorded, so later commands need not repeat it)
        or an in-memory ``model`` (then pass it again to :meth:`open`).

        ``precision``: "auto" (bf16 on a GPU, fp32 on a CPU), "fp32", "bf16", or "int8" (a dynamically
        quantized copy of the model, CPU only); the index records int8 or float, and keeps to it.

        A source without one usable image gives an empty index (a later :meth:`update` can fill it), unless
        ``allow_empty=False`` (what `simla index build` passes): then :class:`NoImagesError` says which files
        were skipped and why, and the build's files are removed again (an existing folder keeps what it held).
        """
        if (checkpoint is None) == (model is None):
            raise SearchError("give exactly one of checkpoint= or model=")
        if model is not None:
            _refuse_int8_model(model)
        if precision == INT8:
            int8_device(device)  # refused on a GPU before anything is written
        spec = resolve_source(source, image_root)
        folder = Path(output)
        checkpoint = os.path.abspath(checkpoint) if checkpoint is not None else None
        before = set(os.listdir(folder)) if folder.is_dir() else None
        try:
            with write_lock(folder):
                index = cls._build_locked(spec, folder, checkpoint, model, device, backend, {
                    "batch_size": batch_size, "num_workers": num_workers, "precision": precision,
                    "progress": progress})
                return index if allow_empty else _with_images(index, spec)
        except NoImagesError:
            if get_rank() == 0:
                _remove_empty_index(folder, before)
            raise

    @classmethod
    def _build_locked(cls, spec: SourceSpec, folder: Path, checkpoint: str | None, model, device, backend: str,
                      options: dict[str, Any]) -> "Index":
        """:meth:`build` under the index's write lock."""
        if (folder / MANIFEST_NAME).is_file():
            existing = cls.open(folder, model=model, checkpoint=checkpoint, device=device, backend=backend)
            if existing.manifest.get_meta("complete"):
                raise IndexExistsError(f"{folder} already holds an index; run `simla index update {folder}` to add "
                                      f"new images, or choose another --output")
            if existing.manifest.get_meta("source") != spec.to_dict():
                raise SearchError(f"{folder} holds an unfinished index of {existing.manifest.get_meta('source')}, "
                                 f"not of {spec.location}; choose another --output")
            logger.info("resuming the unfinished build in %s", folder)
            existing.update(**options)
            return existing
        if model is None:
            model = _load_model(checkpoint, device)
        folder.mkdir(parents=True, exist_ok=True)
        if get_rank() == 0:
            manifest = Manifest(folder / MANIFEST_NAME, create=True)
            manifest.set_meta({
                "format_version": FORMAT_VERSION, "source": spec.to_dict(), "checkpoint": checkpoint,
                "fingerprint": model_fingerprint(model), "model": model.config.name,
                "dim": model.config.objectives.embed_dim, "image_size": model.config.vision.image_size,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "simla_version": __version__, "complete": False,
                "precision": precision_family(options["precision"]),
            })
        if is_distributed():
            torch.distributed.barrier()
        index = cls.open(folder, model=model, checkpoint=checkpoint, device=device, backend=backend)
        index.last_summary = index.update(**options)
        return index

    def update(self, *, batch_size: int = 64, num_workers: int = 2, precision: str = "auto",
               progress: bool = True) -> SyncSummary:
        """Re-scan the source: embed new and changed images, drop deleted ones (resumes an interrupted run).

        Holds the index's write lock (another writer raises IndexBusyError at once) and first checks every
        feature chunk the index keeps: a damaged one raises CorruptIndexError instead of a false success.
        ``precision`` "auto" follows the index's recorded family; one of the other family raises
        :class:`~simla.search.precision.PrecisionMismatchError`.
        """
        spec = SourceSpec(**self.manifest.get_meta("source"))
        precision = update_precision(self.path, self.precision, precision)
        model = self.query_model if precision == INT8 else self.model
        with write_lock(self.path):
            verify_chunks(self.path, self.manifest)
            summary = sync_index(self.path, self.manifest, spec, model, batch_size=batch_size,
                                 num_workers=num_workers, precision=precision, progress=progress)
        self._live = None  # the features changed, rows moved, and changed files must be scored again
        self._data_version = self.manifest.data_version()
        self.last_summary = summary
        return summary

    def refresh(self) -> bool:
        """Reload what another process changed since this index was opened (or last refreshed).

        Cheap when nothing changed (one SQLite pragma). When another process committed to the manifest
        (an update, a repair), the features and item ids are reloaded, and the ITM score cache dropped, so
        that searches see the new items and never return deleted ones; returns True then, else False.
        """
        version = self.manifest.data_version()
        if version == self._data_version:
            return False
        loaded = self._live is not None
        self._data_version = version
        self._live = None
        if loaded:
            self._load_live()
        return True

    # ------------------------------------------------------------------------------ the model
    def _check_model(self, model) -> None:
        expected = self.manifest.get_meta("fingerprint")
        actual = model_fingerprint(model)
        if actual != expected:
            raise ModelMismatchError(
                f"{self.path} was built with another model ({self.manifest.get_meta('model')!r} from "
                f"{self.manifest.get_meta('checkpoint')}, fingerprint {expected[:12]}); this one "
                f"({model.config.name!r}, fingerprint {actual[:12]}) embeds into a different space. Query the "
                f"index with its own checkpoint, or build a new index for this model")

    @property
    def model(self):
        """The index's model, loaded on first use and checked against the index's fingerprint."""
        if self._model is None:
            checkpoint = self._checkpoint or self.manifest.get_meta("checkpoint")
            if checkpoint is None:
                raise SearchError(f"{self.path} was built from an in-memory model; pass model= to Index.open")
            if not Path(checkpoint).exists():
                raise FileNotFoundError(f"the index's checkpoint {checkpoint} is gone; pass checkpoint= (the "
                                        f"same weights) to Index.open, or --checkpoint on the command line")
            model = _load_model(checkpoint, self.device)
            self._check_model(model)
            self._model = model
        return self._model

    @property
    def precision(self) -> str:
        """The family the index's features were made in: "int8" or "float" (also for indexes that predate it)."""
        return precision_family(self.manifest.get_meta("precision"))

    @property
    def query_model(self):
        """The model queries are embedded and re-ranked with: the index's model for a float index, its int8
        copy (made once, on the CPU) for an int8 index."""
        if self.precision != INT8:
            return self.model
        if self._int8_model is None:
            int8_device(self.device)
            self._int8_model = quantize_int8(self.model)
        return self._int8_model

    # ------------------------------------------------------------------------------ facts
    def __len__(self) -> int:
        return self.manifest.count_items()

    def info(self) -> dict[str, Any]:
        meta = self.manifest.all_meta()
        source = meta.get("source") or {}
        return {"items": self.manifest.count_items(), "errors": self.manifest.count_errors(),
                "source": source.get("location"), "source_kind": source.get("kind"), "model": meta.get("model"),
                "checkpoint": meta.get("checkpoint"), "fingerprint": meta.get("fingerprint"),
                "dim": meta.get("dim"), "complete": meta.get("complete"), "created": meta.get("created"),
                "updated": meta.get("updated"), "precision": self.precision, "rerank_available": True,
                "path": str(self.path)}

    def item(self, item_id: int) -> StoredItem:
        """The stored item ``item_id``; raises ItemNotFoundError (a LookupError) if there is none (any more)."""
        return self.manifest.item(item_id)

    def errors(self):
        return self.manifest.errors()

    # ------------------------------------------------------------------------------ images
    def image_bytes(self, item_id: int) -> bytes:
        """The item's encoded image, checked before it is returned: the path must lie inside the index's
        source once symlinks are followed, be a regular file of at most ``MAX_ITEM_BYTES``, and hold the
        bytes indexed (sha256); else :class:`~simla.search.sources.ItemUnavailableError` says why."""
        item = self.manifest.item(item_id)
        source = SourceSpec(**self.manifest.get_meta("source"))
        return read_item_bytes(item.path, item.member, item.offset, item.size, key=item.key, source=source,
                               sha256=item.sha256)

    def load_image(self, item_id: int) -> Image.Image:
        """The item's image, decoded (read through the checks of :meth:`image_bytes`)."""
        item = self.manifest.item(item_id)
        return load_image(self.image_bytes(item_id), name=item.key)

    def thumbnail(self, item_id: int, size: int = 256) -> bytes:
        """JPEG bytes of the image scaled down so that its longer side is at most ``size`` pixels."""
        return jpeg_thumbnail(self.load_image(item_id), size)

    # ------------------------------------------------------------------------------ search
    def _load_live(self) -> _Live:
        """The searchable state, loaded from the manifest and the feature chunks on first use."""
        live = self._live
        if live is None:
            ids, features = load_live_features(self.path, self.manifest)
            live = self._live = _Live(ids, VectorIndex(features, backend=self.backend))
        return live

    def _query_feature(self, text: str | None, image) -> torch.Tensor:
        model = self.query_model
        parts = []
        with torch.no_grad():
            if text is not None:
                parts.append(model.encode_text([text]))
            if image is not None:
                if isinstance(image, (bytes, bytearray)):
                    image = load_image(bytes(image), name="query image")
                parts.append(model.encode_image(model.prepare_pixels(image)))
        return F.normalize(torch.stack(parts).sum(0), dim=-1).float().cpu()

    def search(self, text: str | None = None, image=None, *, k: int = 20, rerank: int = 0, offset: int = 0,
               dedup: float | None = None, itc_weight: float = 0.0, batch_size: int = 32) -> list[Hit]:
        """Hits ``offset`` to ``offset + k - 1`` of the ranking for a text and/or image query (module doc)."""
        if text is not None and not isinstance(text, str):
            raise SearchError(f"text must be a string, got {type(text).__name__}")
        if text is not None and not text.strip():
            text = None
        if text is None and image is None:
            raise SearchError("give a text query, an image query, or both")
        for name, value, low in (("k", k, 1), ("rerank", rerank, 0), ("offset", offset, 0)):
            if int(value) != value or value < low:
                raise SearchError(f"{name} must be an integer >= {low}, got {value!r}")
        if dedup is not None and not -1.0 <= dedup <= 1.0:
            raise SearchError(f"dedup must be a cosine threshold in [-1, 1] (or None to keep duplicates), got {dedup}")
        query = self._query_feature(text, image)
        live = self._load_live()
        vectors = live.vectors
        total = len(vectors)
        if total == 0:
            return []  # an empty index (e.g. a folder with no readable image) answers every query with nothing
        wanted = offset + k
        fetch = max(wanted, rerank if text is not None else 0)
        rerank = rerank if text is not None else 0
        while True:
            scores, rows = vectors.search(query, min(fetch, total))
            order = self._rank(live, text, scores[0], rows[0], rerank, itc_weight, batch_size)
            kept = self._collapse(order, vectors, dedup, wanted)
            if len(kept) >= wanted or fetch >= total:
                break
            fetch = min(total, fetch * 2)  # duplicates took places: look further down the ranking
        return [self._hit(live, rank, entry) for rank, entry in enumerate(kept[offset:wanted], start=offset + 1)]

    def _itm_scores(self, live: _Live, text: str, rows: list[int], batch_size: int) -> list[float | None]:
        """ITM probabilities of ``text`` with the items of ``rows``, from the cache or computed in batches."""
        cache = live.itm_cache
        missing = [r for r in rows if (text, r) not in cache]
        if missing:
            scores = itm_probabilities(self.query_model, text, [int(live.ids[r]) for r in missing], self, rows=missing,
                                       batch_size=batch_size)
            cache.update(((text, r), p) for r, p in scores.items())
        for r in rows:
            cache.move_to_end((text, r))
        out = [cache[(text, r)] for r in rows]
        while len(cache) > ITM_CACHE_ENTRIES:
            cache.popitem(last=False)
        return out

    def _rank(self, live: _Live, text, scores, rows, rerank, itc_weight, batch_size) -> list[dict]:
        """Candidates in final order: re-ranked ones by fused score, then the rest by ITC."""
        entries = [{"row": int(r), "itc": float(s), "itm": None} for s, r in zip(scores.tolist(), rows.tolist())]
        head = entries[:rerank]
        for e, p in zip(head, self._itm_scores(live, text, [e["row"] for e in head], batch_size) if head else []):
            e["itm"] = p
        scored = [e for e in head if e["itm"] is not None]
        for e in scored:
            e["score"] = e["itm"] + itc_weight * e["itc"]
        for e in entries:
            e.setdefault("score", e["itc"])
        # Stable sorts: equal fused scores keep the ITC order.
        scored.sort(key=lambda e: -e["score"])
        rest = [e for e in entries if e["itm"] is None]
        return scored + rest

    @staticmethod
    def _collapse(order: list[dict], vectors, threshold: float | None, wanted: int) -> list[dict]:
        if threshold is None:
            return order[:wanted]
        kept: list[dict] = []
        kept_rows: list[int] = []
        for entry in order:
            if kept_rows:
                sims = vectors.rows(kept_rows) @ vectors.rows([entry["row"]])[0]
                best = int(torch.argmax(sims))
                if float(sims[best]) >= threshold:
                    kept[best].setdefault("duplicates", []).append(entry["row"])
                    continue
            if len(kept) == wanted:
                break
            kept.append(entry)
            kept_rows.append(entry["row"])
        return kept

    def _hit(self, live: _Live, rank: int, entry: dict) -> Hit:
        item = self.manifest.item(int(live.ids[entry["row"]]))
        duplicates = [self.manifest.item(int(live.ids[r])).key for r in entry.get("duplicates", [])]
        return Hit(rank=rank, item_id=item.id, key=item.key, path=item.path, caption=item.caption,
                   score=float(entry["score"]), itc=float(entry["itc"]), itm=entry["itm"], duplicates=duplicates)

    # ------------------------------------------------------------------------------ explain
    def explain(self, text: str, item_ids: Sequence[int]) -> dict[int, bytes]:
        """PNG overlays of the Grad-CAM map of ``text`` over each item's image (ITM, whole-text map; by the
        float model also for an int8 index: Grad-CAM needs gradients, which quantized layers do not give)."""
        out: dict[int, bytes] = {}
        for item_id in item_ids:
            image = self.load_image(item_id)
            explanation = gradcam(self.model, [image], text)[0]
            out[int(item_id)] = overlay_png(image, explanation)
        return out

    def close(self) -> None:
        self.manifest.close()

