"""Evaluation: one module per task, each with its evaluator and the entry point `simla evaluate` calls.

- `retrieval` (+ `metrics`, `rerank`, `pair_scores`): recall of image-text retrieval, ITC ranking then ITM
  re-scoring, the reference protocol and metric keys;
- `vqa` (+ `vqa_accuracy`): answer ranking, the EvalAI result file, the official VQA accuracy;
- `classification`: NLVR2 and SNLI-VE accuracy, per class, with the confusion matrix;
- `grounding` (+ `grounding_boxes`): weakly supervised grounding from Grad-CAM, accuracy per split;
- `sharding`: splitting examples across torchrun processes without padding, gathering them in order;
- `command`: how an evaluation describes its command-line options (`Evaluation`, `Option`).
"""
