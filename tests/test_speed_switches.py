"""The speed switches a recipe can set: regional compilation and the CPU allocator policy."""

from __future__ import annotations

import platform

import pytest
import torch

import simla
from simla.train.compile import compile_blocks
from simla.train.cpu_allocator import configure_cpu_allocator, resolve_cpu_allocator


def test_compile_blocks_compiles_every_block_in_place_and_keeps_the_state_dict():
    torch.manual_seed(0)
    model = simla.create_model("simla_tiny", queue_size=16)
    keys = list(model.state_dict())
    v, t = model.config.vision, model.config.text
    # online and momentum copies of every ViT block and every encoder layer
    assert compile_blocks(model) == 2 * (v.depth + t.num_layers)
    assert list(model.state_dict()) == keys  # checkpoints are unchanged by compilation


def test_auto_allocator_policy_follows_gradient_checkpointing():
    assert resolve_cpu_allocator("auto", grad_checkpointing=True) == "release"
    assert resolve_cpu_allocator("auto", grad_checkpointing=False) == "keep"
    assert resolve_cpu_allocator("system", grad_checkpointing=True) == "system"


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_allocator_policies_apply_on_glibc():
    assert configure_cpu_allocator("release") is True
    assert configure_cpu_allocator("keep") is True  # the process continues with simla's training default
    assert configure_cpu_allocator("system") is False
    with pytest.raises(ValueError, match="cpu_allocator"):
        configure_cpu_allocator("jemalloc")
