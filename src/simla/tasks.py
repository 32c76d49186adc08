"""The task registry: every task simla pretrains, fine-tunes, evaluates or demonstrates, declared once.

A `TaskSpec` names a task's model class, its recipe and training function, its evaluation, its demo and
its help; everything that lists tasks is generated from this registry: `create_model(task=...)` and
`load_checkpoint` (through `simla.models.registry`, which `register_task` fills), the `simla finetune`,
`simla evaluate`, `simla demo` and `simla convert` commands with their `--help`, and `simla tasks`.

Adding a task: one module per layer (a model in `simla/models/`, a reader in `simla/data/`, a recipe and
training function in `simla/train/`, an `Evaluation` in `simla/eval/`, optionally a demo in
`simla/demos/`), then one `register_task(TaskSpec(...))`, here for a built-in task or in the user's own
code for a task of theirs.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .demos.classification import run_classification_demo
from .demos.clipart import run_clipart_demo
from .demos.common import require_finished_demo
from .demos.grounding import run_grounding_demo
from .demos.retrieval import run_retrieval_demo
from .demos.search import run_search_demo
from .demos.vqa import run_vqa_demo
from .errors import ConfigError, MissingExtraError
from .eval.classification import NLVR_EVALUATION, VE_EVALUATION
from .eval.command import Evaluation
from .eval.grounding import GROUNDING_EVALUATION
from .eval.retrieval import RETRIEVAL_EVALUATION
from .eval.vqa import VQA_EVALUATION
from .models.classification import SimlaForVE
from .models.nlvr import SimlaForNLVR, SimlaForNLVRTextAssignment
from .models.pretrain import SimlaForPretraining
from .models.pretrain_reference import ReferencePretraining
from .models.registry import register_model, unregister_model
from .models.retrieval import SimlaForRetrieval
from .models.simla import SimlaBackbone, SimlaModel
from .models.vqa import SimlaForVQA
from .train.finetune_classification import NLVRRecipe, VERecipe, run_classification_finetune
from .train.finetune_grounding import GroundingRecipe, run_grounding_finetune
from .train.finetune_nlvr_text_assignment import NLVRTextAssignmentRecipe, run_nlvr_text_assignment
from .train.finetune_retrieval import RetrievalRecipe, run_retrieval_finetune
from .train.finetune_vqa import VQARecipe, run_vqa_finetune
from .train.pretrain import run_pretraining
from .train.recipe import PretrainRecipe, TrainingRecipe

#: The task whose training is `simla pretrain`; every other trainable task is `simla finetune NAME`.
PRETRAIN = "pretrain"


@dataclass(frozen=True)
class TaskSpec:
    """One task: its name (as the command line spells it) and the piece of each layer that serves it."""

    name: str
    model: type[SimlaBackbone]
    help: str
    recipe: type[TrainingRecipe] | None = None
    train: Callable[[Any], Any] | None = None  # train(recipe) runs the whole training (and evaluation) run
    example: str = ""  # a command line that trains it
    evaluation: Evaluation | None = None
    demo: Callable[..., dict[str, Any]] | None = None  # demo(output=..., quick=..., steps=..., ...) -> report
    reference_model: type[SimlaBackbone] | None = None  # the authors' execution (objectives.execution=reference)

    @property
    def seed_stream(self) -> int | None:
        """The stream of the training data's random order (see `TrainingRecipe.SEED_STREAM`)."""
        return self.recipe.SEED_STREAM if self.recipe is not None else None

    def check(self) -> None:
        if (self.recipe is None) != (self.train is None):
            raise ValueError(f"task {self.name!r}: a recipe and a train function go together")
        if self.recipe is not None and self.recipe.TASK != self.name:
            raise ValueError(f"task {self.name!r}: its recipe {self.recipe.__name__} trains {self.recipe.TASK!r}")


_TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add `spec` to the registry (and its model class to `simla.models.registry`); names are unique."""
    spec.check()
    if spec.name in _TASKS:
        raise ValueError(f"task {spec.name!r} is already registered")
    _check_seed_stream(spec)
    register_model(spec.name, spec.model, spec.reference_model)
    _TASKS[spec.name] = spec
    return spec


def unregister_task(name: str) -> None:
    """Remove task `name` (and its model class) from the registries; built-in tasks can be removed too."""
    if _TASKS.pop(name, None) is not None:
        unregister_model(name)


def _check_seed_stream(spec: TaskSpec) -> None:
    """Two tasks draw the same data order only when their recipes share the class that chose the stream."""
    if spec.recipe is None:
        return
    owner = _stream_owner(spec.recipe)
    for other in _TASKS.values():
        if other.recipe is not None and other.seed_stream == spec.seed_stream and _stream_owner(other.recipe) is not owner:
            raise ValueError(f"task {spec.name!r}: seed stream {spec.seed_stream} is already task {other.name!r}'s")


def _stream_owner(recipe: type[TrainingRecipe]) -> type:
    return next(cls for cls in recipe.__mro__ if "SEED_STREAM" in vars(cls))


def get_task(name: str) -> TaskSpec:
    try:
        return _TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; tasks: {sorted(_TASKS)}") from None


def all_tasks() -> list[TaskSpec]:
    """Every registered task, in registration order."""
    return list(_TASKS.values())


def finetune_tasks() -> list[TaskSpec]:
    return [spec for spec in _TASKS.values() if spec.train is not None and spec.name != PRETRAIN]


def evaluation_tasks() -> list[TaskSpec]:
    return [spec for spec in _TASKS.values() if spec.evaluation is not None]


#: Demos of a feature rather than of a task.
FEATURE_DEMOS: dict[str, Callable[..., dict[str, Any]]] = {"search": run_search_demo, "clipart": run_clipart_demo}
#: Demos that bring their own pictures (the others draw on the easy-VQA images).
_OWN_PICTURES = frozenset({"clipart"})


def demos() -> dict[str, Callable[..., dict[str, Any]]]:
    """Demo name -> runner: every task's demo, then the feature demos."""
    return {**{spec.name: spec.demo for spec in _TASKS.values() if spec.demo is not None}, **FEATURE_DEMOS}


def run_demo(name: str = "retrieval", **options: Any) -> dict[str, Any]:
    """Run the demo `name` (see `demos()`) and return its report (report["summary"] is printable)."""
    available = demos()
    if name not in available:
        raise ConfigError(f"unknown demo {name!r}; available: {sorted(available)}")
    if name not in _OWN_PICTURES and importlib.util.find_spec("easy_vqa") is None:
        raise MissingExtraError('the demos need the easy-VQA images: pip install "simla[demo]"')
    if options.get("source") is not None:
        # Checked once, here, before any demo writes its data files into the output folder.
        require_finished_demo(options["source"])
    return available[name](**options)


def train(name: str, recipe: TrainingRecipe) -> Any:
    """Train task `name` with `recipe` (what `simla finetune NAME` and `simla pretrain` run)."""
    spec = get_task(name)
    if spec.train is None or not isinstance(recipe, spec.recipe):
        raise ConfigError(f"task {name!r} trains from a {spec.recipe.__name__ if spec.recipe else 'no'} recipe")
    return spec.train(recipe)


# ------------------------------------------------------------------------------------ built-in tasks
_PRETRAINED = "checkpoint=runs/pretrain/checkpoints/last.pt"

for _spec in (
    TaskSpec("base", SimlaModel, "encoders, projections and ITM head: embedding, matching, search, zero-shot "
             "retrieval and grounding"),
    TaskSpec(PRETRAIN, SimlaForPretraining, "pretraining with ITC, ITM, MLM, MIM and PSL (simla pretrain)",
             recipe=PretrainRecipe, train=run_pretraining, reference_model=ReferencePretraining,
             example="simla pretrain --config configs/pretrain_tiny.yaml train_file=pairs.json image_root=images/"),
    TaskSpec("retrieval", SimlaForRetrieval, "image-text retrieval (ITC + ITM with image-id-aware targets)",
             recipe=RetrievalRecipe, train=run_retrieval_finetune,
             example=f"simla finetune retrieval --config configs/retrieval_coco.yaml {_PRETRAINED}",
             evaluation=RETRIEVAL_EVALUATION, demo=run_retrieval_demo),
    TaskSpec("vqa", SimlaForVQA, "visual question answering (answer decoder; ranking over an answer list)",
             recipe=VQARecipe, train=run_vqa_finetune,
             example=f"simla finetune vqa --config configs/vqa.yaml {_PRETRAINED}",
             evaluation=VQA_EVALUATION, demo=run_vqa_demo),
    TaskSpec("nlvr-ta", SimlaForNLVRTextAssignment, "NLVR2 stage 1: text assignment on image-caption pairs",
             recipe=NLVRTextAssignmentRecipe, train=run_nlvr_text_assignment,
             example=f"simla finetune nlvr-ta --config configs/nlvr_ta.yaml {_PRETRAINED}"),
    TaskSpec("nlvr", SimlaForNLVR, "NLVR2: is the sentence true of the image pair (deepened, tied encoder)",
             recipe=NLVRRecipe, train=run_classification_finetune,
             example="simla finetune nlvr --config configs/nlvr.yaml checkpoint=runs/nlvr_ta/checkpoints/last.pt",
             evaluation=NLVR_EVALUATION, demo=functools.partial(run_classification_demo, "nlvr")),
    TaskSpec("ve", SimlaForVE, "SNLI-VE: does the image entail, contradict or not decide the sentence",
             recipe=VERecipe, train=run_classification_finetune,
             example=f"simla finetune ve --config configs/ve.yaml {_PRETRAINED}",
             evaluation=VE_EVALUATION, demo=functools.partial(run_classification_demo, "ve")),
    TaskSpec("grounding", SimlaForRetrieval, "weakly supervised grounding (RefCOCO+): ITC + ITM on referring "
             "expressions", recipe=GroundingRecipe, train=run_grounding_finetune,
             example=f"simla finetune grounding --config configs/grounding.yaml {_PRETRAINED}",
             evaluation=GROUNDING_EVALUATION, demo=run_grounding_demo),
):
    register_task(_spec)
