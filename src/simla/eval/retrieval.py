"""Zero-shot and fine-tuned image–text retrieval evaluation (the reference protocol).

1. Text features (and token ids) in chunks; image features and image token states in batches.
2. ITC cosine similarities for all pairs (a 5k x 25k matrix is 500 MB in fp32).
3. Unless `itc_only`: the top-k candidates of every query are re-scored by the ITM head (positive-class
   logit, as the reference), in batches of pairs that span queries; other entries get -100. Query rows
   are split across ranks under torchrun and gathered.
4. Reference recall rules and keys (see `simla.eval.metrics`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..data.images import load_image
from ..data.retrieval import RetrievalEvalSet
from ..data.transforms import EvalView
from ..distributed import get_rank, get_world_size
from ..models.simla import SimlaModel
from .metrics import retrieval_metrics, validate_retrieval_maps
from .rerank import gather_rows, rerank, shard_rows

logger = logging.getLogger(__name__)


class _Images(Dataset):
    def __init__(self, paths: list[str], view: EvalView) -> None:
        self.paths, self.view = paths, view

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        # A bad evaluation image is an error (BadSampleError names it): skipping would bias the metrics.
        return self.view(load_image(self.paths[index]))


@dataclass
class RetrievalFeatures:
    image_feat: Tensor  # (Ni, E)
    image_tokens: Tensor  # (Ni, N, D)
    text_feat: Tensor  # (Nt, E)
    text_ids: Tensor  # (Nt, L)
    text_mask: Tensor  # (Nt, L)


@torch.no_grad()
def compute_features(model: SimlaModel, data: RetrievalEvalSet, *, tokenizer=None, max_length: int = 30,
                     batch_size: int = 64, text_chunk: int = 256, num_workers: int = 2,
                     progress: bool = False) -> RetrievalFeatures:
    device = model.device
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
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="images", unit="batch")
    image_feats, image_tokens = [], []
    for pixels in loader:
        tokens = model.visual_encoder(pixels.to(device))
        image_tokens.append(tokens)
        image_feats.append(model.image_features(tokens))
    return RetrievalFeatures(torch.cat(image_feats), torch.cat(image_tokens), torch.cat(text_feats),
                             text.input_ids.to(device), text.attention_mask.to(device))


@torch.no_grad()
def score_matrices(model: SimlaModel, features: RetrievalFeatures, *, k: int = 256, itc_only: bool = False,
                   batch_size: int = 128, progress: bool = False) -> tuple[Tensor, Tensor]:
    """(i2t (Ni, Nt), t2i (Nt, Ni)) scores: ITC similarities, or ITM re-scores of the ITC top-k."""
    sim_i2t = features.image_feat @ features.text_feat.t()
    if itc_only:
        return sim_i2t, sim_i2t.t().contiguous()
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


def evaluate_retrieval(model: SimlaModel, data: RetrievalEvalSet, *, k: int = 256, itc_only: bool = False,
                       tokenizer=None, batch_size: int = 64, rerank_batch_size: int = 128, num_workers: int = 2,
                       progress: bool = False, return_scores: bool = False):
    """Reference metrics (percent) for `data` under `model` (put in eval mode here).

    With `return_scores`, returns (metrics, i2t scores, t2i scores) for further analysis.
    """
    validate_retrieval_maps(len(data.images), len(data.texts), data.txt2img, data.img2txt, image_names=data.images)
    was_training = model.training
    model.eval()
    try:
        features = compute_features(model, data, tokenizer=tokenizer, batch_size=batch_size,
                                    num_workers=num_workers, progress=progress)
        i2t, t2i = score_matrices(model, features, k=k, itc_only=itc_only, batch_size=rerank_batch_size,
                                  progress=progress)
    finally:
        model.train(was_training)
    i2t, t2i = i2t.float().cpu(), t2i.float().cpu()
    metrics = retrieval_metrics(i2t, t2i, data.txt2img, data.img2txt)
    return (metrics, i2t, t2i) if return_scores else metrics
