"""Zero-shot and fine-tuned image–text retrieval evaluation (the reference protocol).

1. Text features (and token ids) in chunks; image features and image token states in batches (the token
   states are held only while they fit `TOKEN_MEMORY_BUDGET`; beyond it each image is encoded again when
   its pairs are scored, so a 5k-image COCO evaluation at 384 px needs no 8.9 GB of token states).
2. ITC cosine similarities for all pairs (a 5k x 25k matrix is 500 MB in fp32).
3. Unless `itc_only`: the top-k candidates of every query are re-scored by the ITM head (positive-class
   logit, as the reference); other entries get -100. By default every distinct (image, text) pair of
   both directions is scored once, grouped by image so that each image's cross-attention keys and values
   are computed once (`simla.eval.pair_scores`); under torchrun the images are split across ranks and the
   scores gathered. Same scores as the reference's one-query-at-a-time loop up to float rounding.
4. Reference recall rules and keys (see `simla.eval.metrics`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..checkpoint import load_checkpoint
from ..data.images import load_image
from ..data.retrieval import RetrievalEvalSet, read_retrieval_eval
from ..data.transforms import EvalView
from ..distributed import all_gather_objects, evaluation_group, get_rank, get_world_size
from ..models.quantize import INT8, int8_device, is_int8, quantize_int8
from ..models.simla import SimlaModel
from ..tokenizers.text import get_tokenizer
from .command import Evaluation, Option, checkpoint_options, size_override
from .metrics import format_table, retrieval_metrics, validate_retrieval_maps
from .pair_scores import itm_pair_scores
from .rerank import gather_rows, rerank, shard_rows, topk_candidates


logger = logging.getLogger(__name__)


class _Images(Dataset):
    def __init__(self, paths: list[str], view: EvalView) -> None:
        self.paths, self.view = paths, view

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        # A bad evaluation image is an error (BadSampleError names it): skipping would bias the metrics.
        return self.view(load_image(self.paths[index]))


#: Image token states held in memory for the re-ranking at most (bytes, float32); above it they are
#: recomputed image by image when scored (5k COCO images at 384 px with the paper model would need 8.9 GB).
TOKEN_MEMORY_BUDGET = 2 * 1024**3


class _StreamedTokens:
    """An image's ViT token states on demand: read, view and encode it again (one image in memory)."""

    def __init__(self, model: SimlaModel, paths: list[str], view: EvalView) -> None:
        self.model, self.images = model, _Images(paths, view)

    def __call__(self, index: Tensor) -> Tensor:
        pixels = torch.stack([self.images[i] for i in index.tolist()]).to(self.model.device)
        return self.model.visual_encoder(pixels)


@dataclass
class RetrievalFeatures:
    image_feat: Tensor  # (Ni, E)
    image_tokens: Tensor | Callable[[Tensor], Tensor]  # (Ni, N, D), or image indices -> their token states
    text_feat: Tensor  # (Nt, E)
    text_ids: Tensor  # (Nt, L)
    text_mask: Tensor  # (Nt, L)


@torch.no_grad()
def compute_features(model: SimlaModel, data: RetrievalEvalSet, *, tokenizer=None, max_length: int = 30,
                     batch_size: int = 64, text_chunk: int = 256, num_workers: int = 2,
                     progress: bool = False, keep_image_tokens: bool | None = None) -> RetrievalFeatures:
    """ITC features of every text and image, and the image token states the ITM re-ranking needs.

    ``keep_image_tokens``: hold every image's token states in memory (the reference does), or recompute
    them image by image when its pairs are scored (a second ViT pass per image, memory for one image);
    default: keep them when they take at most :data:`TOKEN_MEMORY_BUDGET` bytes.
    """
    device = model.device
    grid = model.config.grid_size
    token_bytes = len(data.images) * (1 + grid * grid) * model.config.vision.width * 4
    if keep_image_tokens is None:
        keep_image_tokens = token_bytes <= TOKEN_MEMORY_BUDGET
    if not keep_image_tokens:
        logger.info("image token states (%.1f GB) are recomputed per image when scored, not held", token_bytes / 1e9)
    tokenizer = tokenizer or model.tokenizer
    text = tokenizer(data.texts, max_length=max_length, padding="max_length", clean=False)
    text_feats = []
    for start in range(0, len(data.texts), text_chunk):
        ids = text.input_ids[start:start + text_chunk].to(device)
        mask = text.attention_mask[start:start + text_chunk].to(device)
        text_feats.append(model.text_features(model.text_encoder(ids, mask, mode="text")))
    view = EvalView(model.config.vision.image_size)
    loader = DataLoader(_Images(data.images, view), batch_size=batch_size, num_workers=num_workers)
    if progress:
        loader = tqdm(loader, desc="images", unit="batch")
    image_feats, image_tokens = [], []
    for pixels in loader:
        tokens = model.visual_encoder(pixels.to(device))
        if keep_image_tokens:
            image_tokens.append(tokens)
        image_feats.append(model.image_features(tokens))
    tokens = torch.cat(image_tokens) if keep_image_tokens else _StreamedTokens(model, data.images, view)
    return RetrievalFeatures(torch.cat(image_feats), tokens, torch.cat(text_feats), text.input_ids.to(device),
                             text.attention_mask.to(device))


@torch.no_grad()
def score_matrices(model: SimlaModel, features: RetrievalFeatures, *, k: int = 256, itc_only: bool = False,
                   batch_size: int = 128, progress: bool = False, method: str = "grouped",
                   precision: str = "fp32") -> tuple[Tensor, Tensor]:
    """(i2t (Ni, Nt), t2i (Nt, Ni)) scores: ITC similarities, or ITM re-scores of the ITC top-k.

    method "grouped" (default): every distinct (image, text) pair of either direction's top-k is scored
    once, grouped by image with its cross-attention keys/values computed once (`simla.eval.pair_scores`);
    images are split across ranks. "batched": each direction's pairs in fixed-size batches of pairs, each
    pair recomputing its image's keys/values (the previous method; same scores up to float rounding).
    """
    if method not in ("grouped", "batched"):
        raise ValueError(f"method must be 'grouped' or 'batched', got {method!r}")
    sim_i2t = features.image_feat @ features.text_feat.t()
    if itc_only:
        return sim_i2t, sim_i2t.t().contiguous()
    if method == "grouped":
        return _grouped_scores(model, features, sim_i2t, k, precision, progress)
    if callable(features.image_tokens):
        raise ValueError("method='batched' needs the image token states in memory (keep_image_tokens=True)")
    f = features

    def image_queries(images: Tensor, texts: Tensor) -> Tensor:
        return model.itm_logits(f.image_tokens[images], f.text_ids[texts], f.text_mask[texts])[:, 1]

    def text_queries(texts: Tensor, images: Tensor) -> Tensor:
        return image_queries(images, texts)

    rank, world = get_rank(), get_world_size()
    rows_i = shard_rows(sim_i2t.shape[0], rank, world)
    rows_t = shard_rows(sim_i2t.shape[1], rank, world)
    logger.info("rank %d of %d re-ranks image rows %d-%d and text rows %d-%d (k=%d)", rank, world,
                rows_i.start, rows_i.stop, rows_t.start, rows_t.stop, k)
    i2t = rerank(sim_i2t, k, image_queries, batch_size=batch_size, rows=rows_i, progress=progress)
    t2i = rerank(sim_i2t.t().contiguous(), k, text_queries, batch_size=batch_size, rows=rows_t, progress=progress)
    return gather_rows(i2t, rows_i), gather_rows(t2i, rows_t)


def _grouped_scores(model: SimlaModel, f: RetrievalFeatures, sim_i2t: Tensor, k: int, precision: str,
                    progress: bool) -> tuple[Tensor, Tensor]:
    num_images, num_texts = sim_i2t.shape
    i2t_texts = topk_candidates(sim_i2t, k)  # (Ni, k)
    t2i_images = topk_candidates(sim_i2t.t(), k)  # (Nt, k)
    i2t_keys = torch.arange(num_images, device=sim_i2t.device)[:, None] * num_texts + i2t_texts
    t2i_keys = t2i_images * num_texts + torch.arange(num_texts, device=sim_i2t.device)[:, None]
    # A pair in both directions' top-k is scored once.
    keys = torch.unique(torch.cat([i2t_keys.reshape(-1), t2i_keys.reshape(-1)]))
    images, texts = keys // num_texts, keys % num_texts
    rank, world = get_rank(), get_world_size()
    mine = (images % world == rank).nonzero().squeeze(1)  # whole images per rank: their keys/values once
    logger.info("rank %d of %d scores %d of %d distinct pairs (%d would be scored per direction)", rank, world,
                mine.numel(), keys.numel(), i2t_keys.numel() + t2i_keys.numel())
    scores = torch.empty(keys.numel(), dtype=torch.float32, device=sim_i2t.device)
    for positions, values in all_gather_objects(
            (mine.cpu(), itm_pair_scores(model, f.image_tokens, f.text_ids, f.text_mask, images[mine], texts[mine],
                                         precision=precision, progress=progress).cpu())):
        scores[positions.to(scores.device)] = values.to(scores.device)
    dtype = sim_i2t.dtype if sim_i2t.dtype in (torch.float32, torch.float64) else torch.float32
    i2t = torch.full((num_images, num_texts), -100.0, dtype=dtype, device=sim_i2t.device)
    t2i = torch.full((num_texts, num_images), -100.0, dtype=dtype, device=sim_i2t.device)
    i2t.scatter_(1, i2t_texts, scores[torch.searchsorted(keys, i2t_keys)].to(dtype))
    t2i.scatter_(1, t2i_images, scores[torch.searchsorted(keys, t2i_keys)].to(dtype))
    return i2t, t2i


def evaluate_retrieval(model: SimlaModel, data: RetrievalEvalSet, *, k: int = 256, itc_only: bool = False,
                       tokenizer=None, batch_size: int = 64, rerank_batch_size: int = 128, num_workers: int = 2,
                       progress: bool = False, return_scores: bool = False, keep_image_tokens: bool | None = None,
                       method: str = "grouped", precision: str = "fp32"):
    """Reference metrics (percent) for `data` under `model` (put in eval mode here).

    `precision`: "fp32"; "bf16" (the ITM re-scoring under bf16 autocast); or "int8": features and ITM scores
    by an int8 copy of `model` (`quantize_int8`, made here unless `model` is one; CPU only).
    With `return_scores`, returns (metrics, i2t scores, t2i scores) for further analysis.
    """
    validate_retrieval_maps(len(data.images), len(data.texts), data.txt2img, data.img2txt, image_names=data.images)
    if precision not in ("fp32", "bf16", INT8):
        raise ValueError(f"precision must be fp32, bf16 or int8, got {precision!r}")
    if is_int8(model) and precision != INT8:
        raise ValueError(f"an int8 model is evaluated with precision='int8', not {precision!r}")
    scorer = quantize_int8(model) if precision == INT8 else model
    was_training = model.training
    model.eval()
    try:
        features = compute_features(scorer, data, tokenizer=tokenizer, batch_size=batch_size,
                                    num_workers=num_workers, progress=progress,
                                    keep_image_tokens=keep_image_tokens if not itc_only else False)
        i2t, t2i = score_matrices(scorer, features, k=k, itc_only=itc_only, batch_size=rerank_batch_size,
                                  progress=progress, method=method, precision=precision)
    finally:
        model.train(was_training)
    i2t, t2i = i2t.float().cpu(), t2i.float().cpu()
    metrics = retrieval_metrics(i2t, t2i, data.txt2img, data.img2txt)
    return (metrics, i2t, t2i) if return_scores else metrics


def evaluate_retrieval_checkpoint(*, checkpoint: str, data: str, output: str, image_root: str | None = None,
                                  k: int = 256, itc_only: bool = False, precision: str = "fp32",
                                  image_size: int | None = None, tokenizer: str | None = None, batch_size: int = 64,
                                  num_workers: int = 2, device: str = "auto",
                                  trust_pickle: bool = False) -> tuple[dict[str, Any], str]:
    """`simla evaluate retrieval`: recall of any checkpoint's encoders (zero-shot or fine-tuned), written to
    `output`/results.json. Under torchrun the ITM re-ranking rows are split across the processes.
    `precision` int8 runs on the CPU ("auto" picks it; a GPU is refused before the checkpoint is read)."""
    if precision == INT8:
        device = int8_device(device)
    with evaluation_group(device) as chosen:
        rank0 = get_rank() == 0
        model = load_checkpoint(checkpoint, task="base", trust_pickle=trust_pickle, **size_override(image_size))
        text_tokenizer = get_tokenizer(tokenizer) if tokenizer else model.tokenizer
        model.to(chosen)
        records = read_retrieval_eval(data, image_root)
        metrics = evaluate_retrieval(model, records, k=k, itc_only=itc_only, tokenizer=text_tokenizer,
                                     batch_size=batch_size, num_workers=num_workers, progress=rank0, precision=precision)
        if not rank0:  # every rank holds the gathered scores and the same metrics; one writes them
            return metrics, ""
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics, f"{format_table(metrics)}\nwrote {out / 'results.json'}"


RETRIEVAL_EVALUATION = Evaluation(
    help="image-text retrieval recall (zero-shot or fine-tuned)",
    run=evaluate_retrieval_checkpoint,
    options=(
        Option("--data", "eval JSON: [{image, caption: [str, ...]}]", required=True),
        Option("--output", "folder for results.json", required=True),
        Option("--k", "ITC candidates re-scored by ITM (COCO 256, Flickr 128)", type=int, default=256),
        Option("--itc-only", "rank by ITC similarity only (fast)", switch=True),
        Option("--precision", "bf16: ITM re-scoring under bf16 autocast (faster on GPUs; scores rounded to "
               "bf16); int8: features and ITM scores by a dynamically quantized copy of the model (CPU only; "
               "faster there, recall may move slightly)", choices=("fp32", "bf16", INT8), default="fp32"),
        *checkpoint_options("a checkpoint", batch_size=64, per="images",
                            image_size="evaluation resolution (default: the checkpoint's; paper: 384)"),
    ))
