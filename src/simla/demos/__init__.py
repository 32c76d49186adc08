"""`simla demo TASK`: offline end-to-end demos on the easy-VQA images, one module per task.

The easy-VQA labelling (shape and colour recovered from the dataset's own questions and answers) is shared
by every demo (`simla.demos.easy_vqa`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import MissingExtraError


def _retrieval(**kwargs: Any) -> dict[str, Any]:
    from .retrieval import run_retrieval_demo

    return run_retrieval_demo(**kwargs)


def _vqa(**kwargs: Any) -> dict[str, Any]:
    from .vqa import run_vqa_demo

    return run_vqa_demo(**kwargs)


def _nlvr(**kwargs: Any) -> dict[str, Any]:
    from .classify import run_classify_demo

    return run_classify_demo("nlvr", **kwargs)


def _ve(**kwargs: Any) -> dict[str, Any]:
    from .classify import run_classify_demo

    return run_classify_demo("ve", **kwargs)


def _grounding(**kwargs: Any) -> dict[str, Any]:
    from .grounding import run_grounding_demo

    return run_grounding_demo(**kwargs)


def _search(**kwargs: Any) -> dict[str, Any]:
    from .search import run_search_demo

    return run_search_demo(**kwargs)


#: Task name -> runner(output=..., quick=..., steps=..., [ablation=... | source=...]) returning the report dict.
DEMOS: dict[str, Callable[..., dict[str, Any]]] = {"retrieval": _retrieval, "vqa": _vqa, "nlvr": _nlvr, "ve": _ve, "grounding": _grounding,
                                                      "search": _search}


def run_demo(task: str = "retrieval", **kwargs: Any) -> dict[str, Any]:
    """Run the demo of `task` (see `DEMOS`) and return its report (report["summary"] is printable)."""
    if task not in DEMOS:
        raise ValueError(f"unknown demo {task!r}; available: {sorted(DEMOS)}")
    try:
        import easy_vqa  # noqa: F401  - the demos' images
    except ImportError as err:
        raise MissingExtraError('the demos need the easy-VQA images: pip install "simla[demo]"') from err
    return DEMOS[task](**kwargs)
