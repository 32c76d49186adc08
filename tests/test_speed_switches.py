"""The speed switches a recipe can set: regional compilation and the CPU allocator policy."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import simla
from simla.errors import ConfigError
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


def _c_compiler() -> str | None:
    """The C compiler torch.compile's CPU backend (inductor) builds its kernels with."""
    import shutil

    return next((path for name in (os.environ.get("CXX"), "c++", "g++", "clang++", "gcc", "cc")
                 if name and (path := shutil.which(name))), None)


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="this torch has no torch.compile")
@pytest.mark.skipif(_c_compiler() is None, reason="torch.compile on CPU builds C++ kernels: no compiler found")
def test_compiled_blocks_compute_what_the_eager_blocks_compute():
    """The compiled model (every ViT block and encoder layer through inductor) gives the eager model's image
    features, text features and ITM logits on the same input: ViT, text-only and multimodal passes.

    Forward only, without gradients: compiling the backward graphs too would double the ~40 s (2 busy cores,
    cold inductor cache) this takes."""
    import copy

    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = simla.create_model("simla_tiny", task="base").eval()
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled) == eager.config.vision.depth + eager.config.text.num_layers  # no teachers
    size = eager.config.vision.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    texts = ["a red square", "two small blue dots on a white background"]
    frames_before = counters["frames"]["ok"]
    outputs = []
    for model in (eager, compiled):
        ids, mask = model.tokenize(texts)
        with torch.no_grad():
            tokens = model.visual_encoder(pixels)
            outputs.append({"image": model.image_features(tokens), "text": model.encode_text(texts),
                            "itm": model.itm_logits(tokens, ids, mask)})
    assert counters["frames"]["ok"] > frames_before, "the compiled model ran its blocks eagerly"
    for name in ("image", "text", "itm"):
        torch.testing.assert_close(outputs[1][name], outputs[0][name], atol=1e-5, rtol=1e-5,
                                   msg=lambda message, name=name: f"{name}: {message}")
    assert not torch.allclose(outputs[0]["itm"][0], outputs[0]["itm"][1])  # the two pairs differ: a real check


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
        configure_cpu_allocator("ptmalloc")


# ------------------------------------------------------------------------------------ preloaded mallocs
_ON_GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _installed_malloc() -> tuple[str, str] | None:
    """A malloc library installed here (mimalloc comes with the dev extra), as (name, path)."""
    from simla.train.cpu_allocator import PRELOADED_ALLOCATORS, find_allocator_library

    for name in PRELOADED_ALLOCATORS:
        if (library := find_allocator_library(name)) is not None:
            return name, str(library)
    return None


def _python(code: str, **environment: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "SIMLA_MALLOC_RESTARTED")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**env, **environment})


@pytest.mark.skipif(not _ON_GLIBC, reason="glibc only")
def test_the_test_process_runs_on_glibc_and_named_mallocs_need_a_preload():
    from simla.train.cpu_allocator import active_allocator

    assert active_allocator() == "glibc"
    installed = _installed_malloc()
    assert installed is not None, "the dev extra installs mimalloc"
    name, library = installed
    with pytest.raises(ConfigError, match=f"LD_PRELOAD={library}"):
        configure_cpu_allocator(name)


def test_a_missing_malloc_library_is_a_config_error_with_the_install_command(monkeypatch):
    from simla.train import cpu_allocator

    monkeypatch.setattr(cpu_allocator, "find_allocator_library", lambda name: None)
    monkeypatch.setattr(cpu_allocator, "active_allocator", lambda: "glibc")
    with pytest.raises(ConfigError, match="apt install libtcmalloc-minimal4"):
        cpu_allocator.restart_under_allocator("tcmalloc")
    with pytest.raises(ConfigError, match="not found"):
        configure_cpu_allocator("jemalloc")


def test_find_allocator_library_looks_in_the_python_environment(tmp_path, monkeypatch):
    from simla.train.cpu_allocator import find_allocator_library

    library = tmp_path / "cmeel.prefix" / "lib" / "libmimalloc.so.3"
    library.parent.mkdir(parents=True)
    library.write_bytes(b"")
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    assert find_allocator_library("mimalloc") == library
    with pytest.raises(ValueError, match="unknown malloc"):
        find_allocator_library("ptmalloc")


@pytest.mark.skipif(not _ON_GLIBC, reason="glibc only")
def test_a_preloaded_malloc_is_detected_and_auto_leaves_it_alone():
    name, library = _installed_malloc()
    done = _python("from simla.train.cpu_allocator import *\n"
                   "print(active_allocator(), resolve_cpu_allocator('auto', True), configure_cpu_allocator('keep'),\n"
                   f"      configure_cpu_allocator('{name}'))", LD_PRELOAD=library)
    assert done.returncode == 0, done.stderr
    # mallopt would change glibc's unused heap: keep/release leave a preloaded malloc alone
    assert done.stdout.split() == [name, name, "False", "True"]


@pytest.mark.skipif(not _ON_GLIBC, reason="glibc only")
def test_restart_under_allocator_replaces_the_process_once():
    name, _ = _installed_malloc()
    done = _python("import sys\nfrom simla.train.cpu_allocator import active_allocator, restart_under_allocator\n"
                   "print(active_allocator(), sys.argv[1:], flush=True)\n"
                   f"restart_under_allocator('{name}')\n"
                   "print('after', active_allocator())")
    assert done.returncode == 0, done.stderr
    # the first process prints, then becomes the second, which finds the malloc in place and goes on
    assert done.stdout.splitlines() == ["glibc []", f"{name} []", f"after {name}"]


def test_a_restart_that_does_not_take_stops_with_an_error(monkeypatch):
    from simla.train import cpu_allocator

    installed = _installed_malloc()
    name = installed[0] if installed else "tcmalloc"
    monkeypatch.setattr(cpu_allocator, "find_allocator_library", lambda _: Path("/usr/lib/libnothing.so"))
    monkeypatch.setattr(cpu_allocator, "active_allocator", lambda: "glibc")
    monkeypatch.setenv("SIMLA_MALLOC_RESTARTED", name)
    with pytest.raises(ConfigError, match="malloc still comes from glibc"):
        cpu_allocator.restart_under_allocator(name)
