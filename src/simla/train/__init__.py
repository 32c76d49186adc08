"""Training: the loop every task shares and what each task plugs into it.

- `engine`: the training loop (AMP, gradient accumulation, logging to log.jsonl and TensorBoard, atomic
  checkpoints, exact resume); it calls a module that returns a dict of named losses and knows nothing of
  SIMLA's objectives.
- `recipe`: typed recipes loaded from YAML + `key=value` (`TrainingRecipe`, the shared fields;
  `PretrainRecipe`); `task_recipe.FinetuneRecipe`, the base of every fine-tuning recipe.
- `runner`: a recipe's optimisation fields -> optimizer, schedules, DistributedDataParallel and the engine;
  the steps every fine-tuning task takes (`start_task_run`, `load_task_model`, `train_task`).
- `pretrain`: `simla pretrain` (data, visual tokenizer, model, resume); `finetune_<task>`: one module per
  downstream task (its recipe and training function).
- `optim`, `schedule`: AdamW parameter groups, learning-rate and distillation-alpha schedules; `compile`:
  regional torch.compile; `cpu_allocator`: the malloc policies that the `simla` command applies.
"""
