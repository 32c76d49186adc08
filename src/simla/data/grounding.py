"""Weakly supervised visual grounding data (RefCOCO+): train pairs, evaluation refs, detector proposals.

Train JSON: a list of {"image": path, "text": referring expression}. The image id is the image's file name
(its last "/" part, as the reference takes it), made dense in first-appearance order, so that the
expressions of one image share an id and are not used as each other's negatives.
Eval JSON: a list of {"image", "text", "ref_id"}, optionally with the ground truth itself: "bbox" [x, y, w, h],
"split", "image_id", "height" and "width". Facts a record lacks come from the REFER toolkit's files in
`refer_dir` (`refs(unc).p`, `instances.json`), as the reference looks them up; a fact the record carries wins.
Detections JSON: {str(image_id): [[x, y, w, h, extra numbers such as a score...], ...]}.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ..errors import DataError
from .readers import DataFormatError
from .annotations import join_image_root, load_json, load_records, record_field
from .retrieval import RetrievalRecord

__all__ = ["INSTANCES_FILE", "REFS_FILE", "GroundingRef", "PickleDataError", "UnsafePickleError", "load_plain_pickle", "read_detections",
           "read_grounding_refs", "read_grounding_train"]

REFS_FILE = "refs(unc).p"  # the REFER toolkit's name for RefCOCO+'s refs (UNC split)
INSTANCES_FILE = "instances.json"
FACTS = ("bbox", "split", "image_id")  # what evaluation needs for each ref

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class GroundingRef:
    ref_id: int
    image: str  # joined to image_root when relative
    text: str  # may be empty: the evaluator counts it as a miss rather than dropping it
    image_id: str  # always a string: the key into the detections file
    split: str
    box: Box  # ground truth (x, y, w, h)
    size: tuple[int, int] | None  # (height, width) when known; None: read it from the image


def _error(path: str, index: int | str, key: str, message: str) -> DataFormatError:
    return DataFormatError(f"{path}, record {index}, field {key!r}: {message}", path=path, record=str(index), field=key)


def _box_problem(value: Any, exact: bool, positive: bool) -> str | None:
    """What is wrong with a box (None: nothing); `exact` wants 4 numbers, else at least 4 (dets carry scores)."""
    if not isinstance(value, (list, tuple)) or (len(value) != 4 if exact else len(value) < 4):
        return f"expected {'4' if exact else 'at least 4'} numbers [x, y, w, h, ...], got {value!r:.80}"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return f"expected finite numbers, got {value!r:.80}"
    if positive and not (value[2] > 0 and value[3] > 0):
        return f"width and height must be positive, got {value!r:.80}"
    return None


def _as_box(value: Any) -> Box:
    return (float(value[0]), float(value[1]), float(value[2]), float(value[3]))


def _nonempty_str(path: str, index: int, obj: Any, key: str) -> str:
    value = record_field(path, index, obj, key, (str,))
    if not value.strip():
        raise _error(path, index, key, "empty string")
    return value


def read_grounding_train(path: str | os.PathLike, image_root: str | None = None) -> list[RetrievalRecord]:
    """Training pairs; the dense image id comes from the file name, so one image's expressions share it."""
    data, path = load_records(path), str(path)
    dense: dict[str, int] = {}
    records = []
    for i, obj in enumerate(data):
        image = _nonempty_str(path, i, obj, "image")
        text = _nonempty_str(path, i, obj, "text")
        name = image.rsplit("/", 1)[-1]
        records.append(RetrievalRecord(join_image_root(image_root, image), (text,), f"{path}[{i}]",
                                       dense.setdefault(name, len(dense))))
    return records


class PickleDataError(DataError, pickle.UnpicklingError):
    """A pickle data file (REFER's refs file) cannot be read; the `simla` command reports it in one line."""


class UnsafePickleError(PickleDataError):
    """A pickle asked for a global (a class or a function): loading it could run arbitrary code."""


class _PlainUnpickler(pickle.Unpickler):
    """Builds only lists, dicts, tuples, strings and numbers. Every global is refused: classes and functions
    are the only way a pickle runs code, and REFER's refs file (downloaded data) needs none."""

    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file, encoding="latin1")  # Python 2 str: never fails, ids and splits are ASCII
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(f"{self._path}: refusing to load {module}.{name}: only plain lists, dicts, "
                                "strings and numbers are read from a pickle (anything else could run code)")


def load_plain_pickle(path: str | os.PathLike) -> Any:
    """A pickle of plain containers, strings and numbers; anything else is an UnpicklingError naming the file."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such pickle file: {path}")
    with open(path, "rb") as handle:
        try:
            return _PlainUnpickler(handle, path).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, TypeError) as err:
            raise PickleDataError(f"{path}: not a readable pickle: {err}") from err


class _Refer:
    """REFER's two files, each read (and checked) only when a record needs something from it."""

    def __init__(self, folder: str) -> None:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"no such REFER folder: {folder} (it should hold {REFS_FILE} and {INSTANCES_FILE})")
        self.refs_path = os.path.join(folder, REFS_FILE)
        self.instances_path = os.path.join(folder, INSTANCES_FILE)

    @cached_property
    def refs(self) -> dict[int, dict[str, Any]]:
        data, path = load_plain_pickle(self.refs_path), self.refs_path
        if not isinstance(data, list):
            raise DataFormatError(f"{path}: expected a list of refs, got {type(data).__name__}", path=path)
        for i, ref in enumerate(data):
            for key, kinds in (("ref_id", (int,)), ("ann_id", (int, str)), ("image_id", (int, str)), ("split", (str,))):
                record_field(path, i, ref, key, kinds)
        return {ref["ref_id"]: ref for ref in data}

    @cached_property
    def _instances(self) -> dict[str, Any]:
        data, path = load_json(self.instances_path, dict), self.instances_path
        for key in ("images", "annotations"):
            if not isinstance(data.get(key), list):
                raise DataFormatError(f"{path}: expected a list under {key!r}", path=path, field=key)
        return data

    @cached_property
    def boxes(self) -> dict[str, Any]:
        """Annotation id (as a string) -> its raw bbox, checked when used."""
        return {str(record_field(self.instances_path, i, a, "id", (int, str))): a.get("bbox")
                for i, a in enumerate(self._instances["annotations"])}

    @cached_property
    def sizes(self) -> dict[str, tuple[int, int]]:
        """Image id (as a string) -> (height, width)."""
        path, sizes = self.instances_path, {}
        for i, img in enumerate(self._instances["images"]):
            size = (record_field(path, i, img, "height", (int,)), record_field(path, i, img, "width", (int,)))
            sizes[str(record_field(path, i, img, "id", (int, str)))] = size
        return sizes

    def ref(self, path: str, index: int, ref_id: int) -> dict[str, Any]:
        if ref_id not in self.refs:
            raise _error(path, index, "ref_id", f"ref_id {ref_id} is not in {self.refs_path}")
        return self.refs[ref_id]

    def box(self, ref: dict[str, Any]) -> Box:
        ann_id, path = str(ref["ann_id"]), self.instances_path
        if ann_id not in self.boxes:
            raise DataFormatError(f"{path}: no annotation with id {ann_id} (ann_id of ref_id {ref['ref_id']})",
                                  path=path, record=ann_id, field="bbox")
        problem = _box_problem(self.boxes[ann_id], exact=True, positive=True)
        if problem:
            raise DataFormatError(f"{path}, annotation id {ann_id}, field 'bbox': {problem}", path=path,
                                  record=ann_id, field="bbox")
        return _as_box(self.boxes[ann_id])


def _size(path: str, index: int, obj: dict[str, Any]) -> tuple[int, int] | None:
    if "height" not in obj and "width" not in obj:
        return None
    height, width = (record_field(path, index, obj, key, (int,)) for key in ("height", "width"))
    if height <= 0 or width <= 0:
        raise _error(path, index, "height" if height <= 0 else "width", f"must be positive, got {height}x{width}")
    return height, width


def _ref_row(path: str, index: int, obj: Any) -> dict[str, Any]:
    """The record's own facts, checked; missing facts are left out for REFER to fill in."""
    row = {"image": _nonempty_str(path, index, obj, "image"), "text": record_field(path, index, obj, "text", (str,)),
           "ref_id": record_field(path, index, obj, "ref_id", (int,)), "size": _size(path, index, obj)}
    if "bbox" in obj:
        problem = _box_problem(obj["bbox"], exact=True, positive=True)
        if problem:
            raise _error(path, index, "bbox", problem)
        row["bbox"] = _as_box(obj["bbox"])
    if "split" in obj:
        row["split"] = _nonempty_str(path, index, obj, "split")
    if "image_id" in obj:
        row["image_id"] = str(record_field(path, index, obj, "image_id", (int, str)))
    return row


def _check_unique(path: str, rows: list[dict[str, Any]]) -> None:
    seen: dict[int, int] = {}
    for i, row in enumerate(rows):
        first = seen.setdefault(row["ref_id"], i)
        if first != i:
            raise _error(path, i, "ref_id", f"duplicate ref_id {row['ref_id']} (also record {first})")


def _complete(path: str, index: int, row: dict[str, Any], refer: _Refer | None, image_root: str | None) -> GroundingRef:
    missing = [key for key in FACTS if key not in row]
    if missing and refer is None:
        raise _error(path, index, missing[0], f"missing, and no REFER folder was given: pass refer_dir (a folder "
                     f"with {REFS_FILE} and {INSTANCES_FILE}) or add {missing[0]!r} to every record")
    ref = refer.ref(path, index, row["ref_id"]) if missing else {}
    box = row["bbox"] if "bbox" in row else refer.box(ref)
    image_id = row["image_id"] if "image_id" in row else str(ref["image_id"])
    size = row["size"] or (refer.sizes.get(image_id) if refer is not None else None)
    return GroundingRef(row["ref_id"], join_image_root(image_root, row["image"]), row["text"], image_id,
                        row["split"] if "split" in row else ref["split"], box, size)


def read_grounding_refs(path: str | os.PathLike, image_root: str | None = None,
                        refer_dir: str | os.PathLike | None = None) -> list[GroundingRef]:
    """Evaluation refs with their ground truth; everything is checked before any image is touched."""
    data, path = load_records(path), str(path)
    rows = [_ref_row(path, i, obj) for i, obj in enumerate(data)]
    _check_unique(path, rows)
    needs_refer = any(row["size"] is None or any(key not in row for key in FACTS) for row in rows)
    refer = _Refer(str(refer_dir)) if refer_dir is not None and needs_refer else None
    return [_complete(path, i, row, refer, image_root) for i, row in enumerate(rows)]


def read_detections(path: str | os.PathLike) -> dict[str, list[Box]]:
    """Proposals per image id: the first 4 numbers of each entry are the box; an image may have none."""
    path = str(path)
    detections = {}
    for image_id, boxes in load_json(path, dict).items():
        if not isinstance(boxes, list):
            raise DataFormatError(f"{path}, image {image_id!r}: expected a list of boxes, got {type(boxes).__name__}",
                                  path=path, record=image_id)
        for j, box in enumerate(boxes):
            problem = _box_problem(box, exact=False, positive=False)
            if problem:
                raise DataFormatError(f"{path}, image {image_id!r}, box {j}: {problem}", path=path, record=image_id,
                                      field=f"box {j}")
        detections[image_id] = [_as_box(box) for box in boxes]
    return detections
