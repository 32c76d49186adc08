"""`simla evaluate TASK`: one sub-command per task of the registry that has an evaluation.

Each task's options and evaluation function are declared beside its evaluator (`simla.eval.*`, an
`Evaluation`); this module only turns them into argparse sub-commands and prints what the evaluation says.
"""

from __future__ import annotations

import argparse
from typing import Any

from . import tasks
from .eval.command import Evaluation, Option


def cmd_evaluate(args: argparse.Namespace) -> int:
    evaluation: Evaluation = args.evaluation
    _, text = evaluation.run(**{option.dest: getattr(args, option.dest) for option in evaluation.options})
    if text:
        print(text)
    return 0


def _add_option(parser: argparse.ArgumentParser, option: Option) -> None:
    if option.switch:
        parser.add_argument(option.flag, action="store_true", help=option.help)
        return
    kwargs: dict[str, Any] = {"help": option.help, "type": option.type, "default": option.default,
                              "required": option.required, "metavar": option.metavar}
    if option.choices is not None:
        kwargs["choices"] = option.choices
    parser.add_argument(option.flag, action="append" if option.repeatable else "store", **kwargs)


def add_evaluate_commands(sub: Any) -> None:
    """`simla evaluate TASK` for every task with an evaluation (`simla tasks` lists them)."""
    evaluate = sub.add_parser("evaluate", help="evaluate a checkpoint")
    evaluate_tasks = evaluate.add_subparsers(dest="task", required=True)
    for spec in tasks.evaluation_tasks():
        parser = evaluate_tasks.add_parser(spec.name, help=spec.evaluation.help, description=spec.evaluation.help)
        for option in spec.evaluation.options:
            _add_option(parser, option)
        parser.set_defaults(func=cmd_evaluate, evaluation=spec.evaluation)
