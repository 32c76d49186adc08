"""Regional `torch.compile`: compile every ViT block and shared-encoder layer, not the whole model.

A SIMLA step is many passes of two kinds of block (12 ViT blocks, 12 encoder layers, each also in the
momentum teacher) with data-dependent Python around them (hard-negative draws, masked-position selection,
queues). Compiling the blocks leaves that Python eager and gives the compiler small, repeated graphs:
every block instance shares one compiled graph per call signature (text mode, multimodal, the MIM pass,
with or without gradients), so compiling costs the same for 2 layers as for 12. The first steps pay the
compilation (about two minutes for the paper model on a 2-core CPU); later steps run fused kernels
(dropout, residual adds, LayerNorm and GELU in one pass over memory). On a 2-core CPU a paper-size step
measured no faster (matrix products are two thirds of it and run at the same speed compiled or not); it
is meant for GPUs, where those element-wise passes are a larger share.

`nn.Module.compile()` compiles in place: parameter names, state dicts and checkpoints are unchanged.
"""

from __future__ import annotations

import logging

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ..models.bert import EncoderLayer


logger = logging.getLogger(__name__)

# Distinct call signatures of one block class in a pretraining step (modes, batch shapes, grad / no-grad,
# the PSL vote layer); torch's default limit of 8 would send the rest back to eager without a word.
_RECOMPILE_LIMIT = 64


def _is_vit_block(module: nn.Module) -> bool:
    return isinstance(module, Block)


def compile_blocks(model: nn.Module) -> int:
    """Compile every ViT block and encoder layer of `model` (teachers included) in place; return how many."""
    if not hasattr(torch, "compile"):
        raise RuntimeError(f"torch {torch.__version__} has no torch.compile")
    dynamo = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), _RECOMPILE_LIMIT))
    blocks = [m for m in model.modules() if isinstance(m, EncoderLayer) or _is_vit_block(m)]
    for block in blocks:
        block.compile()
    logger.info("torch.compile: %d blocks compiled (the first steps include compilation)", len(blocks))
    return len(blocks)
