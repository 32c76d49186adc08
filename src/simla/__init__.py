"""simla: SIMLA (Single-Stream Multi-Level Alignment) vision-language pretraining.

Public API:
    create_model(name, pretrained=None, text_encoder=None, vision_encoder=None, task="pretrain", **overrides)
    list_models()
    get_config(name, **overrides)
    load_checkpoint(path, task=None, trust_pickle=False, strict=True)
    save_checkpoint(model, path) / save_pretrained(model, directory)
    get_tokenizer(name_or_path)
    quantize_int8(model): an int8 inference copy for faster CPU embedding and ITM scoring (docs/precision.md)
    SimlaForVQA.answer(images, questions, answer_list, top=5)
    tasks: the task registry (`simla.tasks.all_tasks()`, `register_task(TaskSpec(...))`)

Importing simla registers the built-in tasks (`simla.tasks`), so every task name resolves everywhere.
"""

from . import tasks
from .checkpoint import ImportReport, load_checkpoint, save_checkpoint, save_pretrained
from .config import ObjectiveConfig, SimlaConfig, TextConfig, VisionConfig, VQAConfig, get_config, list_models
from .factory import build_model, create_model
from .load_report import LoadReport
from .models.pretrain import LOSS_NAMES, PretrainOutput, SimlaForPretraining
from .models.quantize import quantize_int8
from .models.retrieval import SimlaForRetrieval
from .models.simla import SimlaBackbone, SimlaModel
from .models.vqa import SimlaForVQA
from .tasks import TaskSpec, register_task
from .tokenizers import get_tokenizer
from .version import __version__

__all__ = [
    "__version__",
    "LOSS_NAMES",
    "ImportReport",
    "LoadReport",
    "ObjectiveConfig",
    "PretrainOutput",
    "SimlaConfig",
    "SimlaForPretraining",
    "SimlaBackbone",
    "SimlaForRetrieval",
    "SimlaForVQA",
    "SimlaModel",
    "TaskSpec",
    "TextConfig",
    "VQAConfig",
    "VisionConfig",
    "build_model",
    "create_model",
    "get_config",
    "get_tokenizer",
    "list_models",
    "load_checkpoint",
    "quantize_int8",
    "save_checkpoint",
    "register_task",
    "save_pretrained",
    "tasks",
]
