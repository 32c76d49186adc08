"""Offline end-to-end demos on the easy-VQA images, one module per task (`simla demo TASK`).

The easy-VQA labelling (shape and colour recovered from the dataset's own questions and answers) is shared
by every demo (`simla.demos.easy_vqa`). Which demo belongs to which task is declared in the task registry
(`simla.tasks`), which also runs them (`simla.tasks.run_demo`).
"""
