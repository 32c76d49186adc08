"""Which model class answers to which task name, and `build_model`.

The task registry (`simla.tasks`) fills this table when simla is imported: each task names its model class
there, once. It lives down here, below `simla.checkpoint` and `simla.factory`, because those build models
by task name (a checkpoint stores the name of its model's task) and must not import the layers above them.
"""

from __future__ import annotations

from ..config import SimlaConfig
from ..errors import ConfigError
from .simla import SimlaBackbone

#: Task names that older checkpoints carry, and the name each one has now.
LEGACY_TASK_NAMES = {"nlvr_ta": "nlvr-ta"}

_MODEL_CLASSES: dict[str, type[SimlaBackbone]] = {}
#: A task's step in the authors' execution, where it is a class of its own (`objectives.execution`).
_REFERENCE_CLASSES: dict[str, type[SimlaBackbone]] = {}


def register_model(task: str, cls: type[SimlaBackbone], reference: type[SimlaBackbone] | None = None) -> None:
    """Make `cls` the model of `task` (done by `simla.tasks.register_task`); `reference`, when given, is
    built instead for a config whose `objectives.execution` is "reference"."""
    existing = _MODEL_CLASSES.get(task)
    if existing is not None and existing is not cls:
        raise ValueError(f"task {task!r} already has the model class {existing.__qualname__}; "
                         f"cannot register {cls.__qualname__} for it too")
    _MODEL_CLASSES[task] = cls
    if reference is not None:
        _REFERENCE_CLASSES[task] = reference


def canonical_task(task: str) -> str:
    """The current name of `task` (older checkpoints may carry a former spelling)."""
    return LEGACY_TASK_NAMES.get(task, task)


def model_tasks() -> list[str]:
    """The task names that have a model class."""
    return sorted(_MODEL_CLASSES)


def model_class(task: str) -> type[SimlaBackbone]:
    try:
        return _MODEL_CLASSES[canonical_task(task)]
    except KeyError:
        raise ConfigError(f"unknown task {task!r}; allowed: {model_tasks()}") from None


def build_model(config: SimlaConfig, task: str = "pretrain") -> SimlaBackbone:
    """The model of `task` with random weights (no file or network access); `config` is not changed (the
    model keeps its own copy, as its task uses it: see `config_for_task`)."""
    cls = model_class(task)
    if config.objectives.execution == "reference":
        cls = _REFERENCE_CLASSES.get(canonical_task(task), cls)
    return cls(config)


def unregister_model(task: str) -> None:
    """Forget the model class of `task` (for a task registered only for a while, as tests do)."""
    _MODEL_CLASSES.pop(task, None)
    _REFERENCE_CLASSES.pop(task, None)
