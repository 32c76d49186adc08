"""ITM scores of many (image, text) pairs, grouped by image so that each image's work is done once.

An ITM pass over a pair runs the text's tokens through the shared encoder, cross-attending in every layer
to the image's tokens. The keys and values of those image tokens do not depend on the text, yet a
pair-by-pair scorer recomputes them for every pair, and with the paper model they are the largest share
of the pass (577 image tokens at 384 px against at most 30 text tokens). Here the pairs are sorted by
image; each image's per-layer keys and values are computed once and every text paired with it attends to
them (`SharedEncoder.forward_image_cached`). Each chunk of texts is also cut to its longest real caption,
since trailing padding changes no real token's state.

The result equals scoring each pair alone up to float rounding (tested).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..models.quantize import INT8, is_int8

__all__ = ["itm_pair_scores"]


@torch.no_grad()
def itm_pair_scores(model, image_tokens: Tensor | Callable[[Tensor], Tensor], text_ids: Tensor, text_mask: Tensor,
                    images: Tensor, texts: Tensor, *, max_texts: int = 256, precision: str = "fp32",
                    progress: bool = False) -> Tensor:
    """The ITM positive-class logit of each pair (images[p], texts[p]), shape (P,), float32.

    Args:
        model: a SimlaModel (its `text_encoder` and `itm_head`), in eval mode.
        image_tokens: the ViT outputs of all images, (Ni, N, W), or a function mapping a 1-element index
            tensor to that image's (1, N, W) tokens (to stream images instead of holding all their tokens).
        text_ids, text_mask: (Nt, L) token ids and attention mask of all texts.
        images, texts: (P,) int64 indices of the pairs; the order of the result follows them.
        max_texts: texts per forward pass for one image.
        precision: "fp32", "bf16" (autocast; faster on GPUs, scores rounded to bf16 precision), or "int8":
            ``model`` is an int8 copy (`simla.models.quantize.quantize_int8`; CPU), run without autocast.
    """
    if images.shape != texts.shape or images.dim() != 1:
        raise ValueError(f"images and texts must be two 1-D index tensors of one length, got "
                         f"{tuple(images.shape)} and {tuple(texts.shape)}")
    if precision not in ("fp32", "bf16", INT8):
        raise ValueError(f"precision must be fp32, bf16 or int8, got {precision!r}")
    if (precision == INT8) != is_int8(model):
        raise ValueError(f"precision {precision!r} does not match the model, which is "
                         f"{'an int8 copy' if is_int8(model) else 'a float model'} (int8 needs quantize_int8's copy)")
    tokens_of = image_tokens if callable(image_tokens) else (lambda i: image_tokens[i])
    device = text_ids.device
    out = torch.empty(images.numel(), dtype=torch.float32, device=device)
    if images.numel() == 0:
        return out
    order = torch.argsort(images * text_ids.shape[0] + texts)  # by image, then text
    sorted_images = images[order]
    starts = torch.cat([torch.zeros(1, dtype=torch.long, device=sorted_images.device),
                        (sorted_images[1:] != sorted_images[:-1]).nonzero().squeeze(1) + 1])
    bounds = torch.cat([starts, torch.tensor([images.numel()], device=starts.device)]).tolist()
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    encoder = model.text_encoder
    with autocast, tqdm(total=images.numel(), desc="itm pairs", unit="pair", disable=not progress) as bar:
        for first, stop in zip(bounds[:-1], bounds[1:]):
            image = sorted_images[first:first + 1]
            keys_values = encoder.image_keys_values(tokens_of(image).to(device))
            for start in range(first, stop, max_texts):
                positions = order[start:min(stop, start + max_texts)]
                chosen = texts[positions]
                mask = text_mask[chosen]
                length = int(mask.any(0).nonzero().max()) + 1  # trailing padding changes no real token's state
                hidden = encoder.forward_image_cached(text_ids[chosen, :length], mask[:, :length], keys_values)
                out[positions] = model.itm_head(hidden[:, 0])[:, 1].float()
                bar.update(positions.numel())
    return out
