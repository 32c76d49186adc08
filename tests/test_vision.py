"""Tests for the SIMLA image encoder, position-embedding resampling and weight loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from simla.models.vision import LoadReport, VisionEncoder, load_vision_weights, resample_pos_embed
from simla.errors import CheckpointError

IMAGE, PATCH, WIDTH, DEPTH, HEADS = 32, 8, 64, 2, 2
GRID = IMAGE // PATCH


def tiny(image_size: int = IMAGE, **kwargs: object) -> VisionEncoder:
    torch.manual_seed(0)
    return VisionEncoder(image_size=image_size, patch_size=PATCH, width=WIDTH, depth=DEPTH, num_heads=HEADS, **kwargs)


def reference_vit(image_size: int, num_classes: int = 10) -> VisionTransformer:
    """A plain timm ViT of the tiny dims, standing in for a DeiT checkpoint."""
    torch.manual_seed(1)
    return VisionTransformer(
        img_size=image_size, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=num_classes
    )


def pixels(batch: int = 2, image_size: int = IMAGE) -> Tensor:
    return torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(2))


def block_input(encoder: VisionEncoder, x: Tensor, patch_mask: Tensor | None = None) -> Tensor:
    """Capture what enters the first transformer block."""
    seen: list[Tensor] = []
    handle = encoder.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        encoder(x, patch_mask)
    finally:
        handle.remove()
    return seen[0]


# --------------------------------------------------------------------------------------------------- structure


def test_state_dict_keys_are_exactly_the_reference_keys() -> None:
    leaves = [
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    ]  # fmt: skip
    base = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    base |= {f"blocks.{i}.{leaf}" for i in range(DEPTH) for leaf in leaves}
    assert set(tiny().state_dict()) == base | {"mask_token"}
    assert set(tiny(use_mask_token=False).state_dict()) == base


def test_shapes_config_and_properties() -> None:
    enc = tiny()
    sd = enc.state_dict()
    assert sd["cls_token"].shape == (1, 1, WIDTH)
    assert sd["pos_embed"].shape == (1, 1 + GRID**2, WIDTH)
    assert sd["mask_token"].shape == (1, 1, WIDTH)
    assert torch.count_nonzero(sd["mask_token"]) == 0
    assert sd["patch_embed.proj.weight"].shape == (WIDTH, 3, PATCH, PATCH)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (4 * WIDTH, WIDTH)
    assert (enc.grid_size, enc.num_patches, enc.width) == (GRID, GRID**2, WIDTH)
    assert all(blk.attn.fused_attn for blk in enc.blocks)
    assert all(isinstance(m.act, nn.GELU) and m.act.approximate == "none" for m in (b.mlp for b in enc.blocks))
    assert all(m.eps == 1e-6 for m in enc.modules() if isinstance(m, nn.LayerNorm))
    assert "mask_token" in enc.no_weight_decay()
    assert tiny(ln_eps=1e-12).norm.eps == 1e-12


def test_fused_attention_forced_on_even_if_timm_disabled() -> None:
    from timm.layers import set_fused_attn, use_fused_attn

    was_on = use_fused_attn()
    set_fused_attn(False)
    try:
        enc = tiny()
    finally:
        set_fused_attn(was_on)
    assert all(blk.attn.fused_attn for blk in enc.blocks)


def test_output_shape() -> None:
    enc = tiny().eval()
    assert enc(pixels(3)).shape == (3, 1 + GRID**2, WIDTH)


def test_matches_timm_forward_features() -> None:
    """Same weights as a stock timm ViT -> identical token states (no hidden deviation in our forward)."""
    ref = reference_vit(IMAGE).eval()
    enc = tiny().eval()
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("head.")}
    enc.load_state_dict(sd, strict=False)
    x = pixels()
    torch.testing.assert_close(enc(x), ref.forward_features(x))


def test_wrong_resolution_is_rejected() -> None:
    enc = tiny()
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\).*\(2, 3, 48, 48\)"):
        enc(pixels(image_size=48))


# --------------------------------------------------------------------------------------------------- masking


def test_all_false_mask_equals_unmasked() -> None:
    enc = tiny().eval()
    with torch.no_grad():
        enc.mask_token.normal_()  # a non-zero token, so a wrongly applied mask would show
    x = pixels()
    mask = torch.zeros(2, GRID**2, dtype=torch.bool)
    torch.testing.assert_close(enc(x, mask), enc(x), rtol=0, atol=0)


def test_masked_positions_replaced_before_pos_embed() -> None:
    enc = tiny().eval()
    with torch.no_grad():
        enc.mask_token.normal_()
    x = pixels()
    mask = torch.zeros(2, GRID**2, dtype=torch.bool)
    mask[0, [0, 5, 15]] = True
    mask[1, [3]] = True
    masked_in = block_input(enc, x, mask)
    plain_in = block_input(enc, x)
    pos = enc.pos_embed.detach()[0]
    token = enc.mask_token.detach()[0, 0]
    for b in range(2):
        # CLS is never masked: cls_token + pos_embed[0] in both passes.
        torch.testing.assert_close(masked_in[b, 0], enc.cls_token.detach()[0, 0] + pos[0])
        torch.testing.assert_close(masked_in[b, 0], plain_in[b, 0])
        for idx in range(GRID**2):
            if mask[b, idx]:
                torch.testing.assert_close(masked_in[b, 1 + idx], token + pos[1 + idx])
            else:
                torch.testing.assert_close(masked_in[b, 1 + idx], plain_in[b, 1 + idx])


def test_grid_shaped_mask_is_flattened_row_major() -> None:
    enc = tiny().eval()
    with torch.no_grad():
        enc.mask_token.normal_()
    x = pixels()
    grid_mask = torch.zeros(2, GRID, GRID, dtype=torch.bool)
    grid_mask[0, 1, 2] = True  # row 1, column 2 -> flat index 1 * GRID + 2
    flat = torch.zeros(2, GRID**2, dtype=torch.bool)
    flat[0, 1 * GRID + 2] = True
    torch.testing.assert_close(enc(x, grid_mask), enc(x, flat), rtol=0, atol=0)


def test_mask_errors() -> None:
    x = pixels()
    with pytest.raises(ValueError, match="use_mask_token=False"):
        tiny(use_mask_token=False)(x, torch.zeros(2, GRID**2, dtype=torch.bool))
    enc = tiny()
    with pytest.raises(ValueError, match="patch_mask must have shape"):
        enc(x, torch.zeros(2, GRID**2 + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        enc(x, torch.zeros(2, GRID**2))


def test_mask_token_receives_gradient() -> None:
    enc = tiny().train()
    mask = torch.zeros(2, GRID**2, dtype=torch.bool)
    mask[:, :4] = True
    enc(pixels(), mask).sum().backward()
    assert enc.mask_token.grad is not None and enc.mask_token.grad.abs().sum() > 0


def test_gradient_checkpointing_matches() -> None:
    enc = tiny().train()
    mask = torch.zeros(2, GRID**2, dtype=torch.bool)
    mask[:, ::3] = True
    x = pixels()
    out = enc(x, mask)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in enc.named_parameters()}
    enc.zero_grad()
    enc.set_grad_checkpointing(True)
    assert enc.grad_checkpointing
    out_ckpt = enc(x, mask)
    out_ckpt.square().sum().backward()
    torch.testing.assert_close(out_ckpt, out)
    for name, param in enc.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], msg=name)


# ------------------------------------------------------------------------------------------ resample_pos_embed


def test_resample_identity_when_grid_matches() -> None:
    pe = torch.randn(1, 1 + 16, 8)
    assert resample_pos_embed(pe, 4) is pe


def test_resample_14_to_16_matches_manual_interpolation() -> None:
    pe = torch.randn(1, 1 + 14 * 14, 12)
    out = resample_pos_embed(pe, 16)
    assert out.shape == (1, 1 + 16 * 16, 12)
    torch.testing.assert_close(out[:, :1], pe[:, :1], rtol=0, atol=0)
    image = pe[:, 1:].reshape(1, 14, 14, 12).permute(0, 3, 1, 2)
    manual = F.interpolate(image, size=(16, 16), mode="bicubic", align_corners=False, antialias=False)
    manual = manual.permute(0, 2, 3, 1).reshape(1, 256, 12)
    torch.testing.assert_close(out[:, 1:], manual, rtol=0, atol=0)


def test_resample_preserves_row_major_layout() -> None:
    """A function of the row only stays a function of the row after resizing (no row/column swap)."""
    rows = torch.arange(4.0).repeat_interleave(4)  # value = row index, row-major
    pe = torch.cat([torch.full((1,), -7.0), rows]).reshape(1, 17, 1)
    out = resample_pos_embed(pe, 6)
    assert out[0, 0, 0] == -7.0
    grid = out[0, 1:, 0].reshape(6, 6)
    torch.testing.assert_close(grid, grid[:, :1].expand(6, 6))
    assert bool((grid[1:, 0] > grid[:-1, 0]).all())


def test_resample_rejects_non_square() -> None:
    with pytest.raises(ValueError, match="square"):
        resample_pos_embed(torch.randn(1, 1 + 15, 8), 4)


# ------------------------------------------------------------------------------------------------ loading


def deit_like_checkpoint(tmp_path: Path, image_size: int = IMAGE) -> tuple[Path, dict[str, Tensor]]:
    """Save a DeiT-style {"model": state_dict} file, head included, at `image_size`."""
    sd = reference_vit(image_size).state_dict()
    assert {"head.weight", "head.bias"} <= set(sd)
    path = tmp_path / "deit.pth"
    torch.save({"model": sd}, path)
    return path, sd


def test_load_deit_style_checkpoint_resamples_and_ignores_head(tmp_path: Path) -> None:
    path, sd = deit_like_checkpoint(tmp_path, image_size=IMAGE)  # grid 4
    enc = tiny(image_size=48)  # grid 6
    report = load_vision_weights(enc, str(path))
    assert isinstance(report, LoadReport)
    assert report.ignored == ["head.bias", "head.weight"]
    assert report.resampled == ["pos_embed"]
    assert report.missing == ["mask_token"]
    assert report.unexpected == []
    assert "head.weight" in str(report) and "pos_embed" in str(report)
    loaded = enc.state_dict()
    torch.testing.assert_close(loaded["pos_embed"], resample_pos_embed(sd["pos_embed"], 6))
    torch.testing.assert_close(loaded["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(loaded["cls_token"], sd["cls_token"])
    assert torch.count_nonzero(loaded["mask_token"]) == 0


def test_load_state_dict_wrapper_and_safetensors(tmp_path: Path) -> None:
    sd = {k: v for k, v in reference_vit(IMAGE).state_dict().items()}
    wrapped = tmp_path / "w.pt"
    torch.save({"state_dict": sd, "epoch": 3}, wrapped)
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    for source in (wrapped, st):
        enc = tiny()
        report = load_vision_weights(enc, str(source))
        assert report.resampled == []
        torch.testing.assert_close(enc.state_dict()["pos_embed"], sd["pos_embed"])
        torch.testing.assert_close(enc.state_dict()["norm.weight"], sd["norm.weight"])


def test_roundtrip_of_own_weights_keeps_mask_token(tmp_path: Path) -> None:
    src = tiny()
    with torch.no_grad():
        src.mask_token.fill_(0.5)
    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = tiny()
    assert load_vision_weights(dst, str(path)).missing == []
    torch.testing.assert_close(dst.mask_token, src.mask_token)
    # A downstream encoder has no mask token: it is reported as ignored, not an error.
    down = tiny(use_mask_token=False)
    assert load_vision_weights(down, str(path)).ignored == ["mask_token"]


def test_shape_mismatch_raises_and_leaves_encoder_untouched(tmp_path: Path) -> None:
    sd = {k: v for k, v in reference_vit(IMAGE).state_dict().items()}
    sd["blocks.0.mlp.fc1.weight"] = torch.randn(3 * WIDTH, WIDTH)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    enc = tiny()
    before = enc.state_dict()["cls_token"].clone()
    with pytest.raises(RuntimeError, match=r"blocks\.0\.mlp\.fc1\.weight.*\(192, 64\).*\(256, 64\)"):
        load_vision_weights(enc, str(path), strict=False)
    torch.testing.assert_close(enc.state_dict()["cls_token"], before)


def test_strict_missing_and_unexpected(tmp_path: Path) -> None:
    sd = {k: v for k, v in reference_vit(IMAGE).state_dict().items() if k != "norm.bias"}
    sd["dist_token"] = torch.zeros(1, 1, WIDTH)
    path = tmp_path / "odd.pth"
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match=r"norm\.bias.*dist_token"):
        load_vision_weights(tiny(), str(path))
    report = load_vision_weights(tiny(), str(path), strict=False)
    assert report.missing == ["mask_token", "norm.bias"]
    assert report.unexpected == ["dist_token"]


def test_nonexistent_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "weights.pth"
    with pytest.raises(FileNotFoundError, match="weights.pth"):
        load_vision_weights(tiny(), str(missing))


class PickledConfig:
    """Stands in for the reference's pickled OmegaConf config."""


def test_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"model": reference_vit(IMAGE).state_dict(), "config": PickledConfig()}, path)
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        load_vision_weights(tiny(), str(path))


def test_timm_name_and_url_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    ref = reference_vit(IMAGE, num_classes=0)
    names: list[str] = []

    def fake_create_model(name: str, pretrained: bool = False, **kwargs: object) -> nn.Module:
        assert pretrained and kwargs.get("num_classes") == 0
        names.append(name)
        return ref

    monkeypatch.setattr(timm, "create_model", fake_create_model)
    enc = tiny()
    load_vision_weights(enc, "deit_base_patch16_224")
    load_vision_weights(enc, "timm/deit_base_patch16_224.fb_in1k")
    assert names == ["deit_base_patch16_224", "deit_base_patch16_224.fb_in1k"]
    torch.testing.assert_close(enc.state_dict()["norm.weight"], ref.state_dict()["norm.weight"])

    urls: list[str] = []

    def fake_from_url(url: str, **kwargs: object) -> dict[str, object]:
        assert kwargs.get("weights_only") is True and kwargs.get("map_location") == "cpu"
        urls.append(url)
        return {"model": reference_vit(IMAGE).state_dict()}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_from_url)
    url = "https://example.invalid/deit_base_patch16_224-b5f2ef4d.pth"
    report = load_vision_weights(tiny(), url)
    assert urls == [url] and report.ignored == ["head.bias", "head.weight"]


def test_offline_sources_raise_clear_oserror(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*_args: object, **_kwargs: object) -> None:
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(timm, "create_model", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    for source in ("deit_base_patch16_224", "https://example.invalid/deit.pth"):
        with pytest.raises(OSError, match="could not be downloaded.*local file path") as info:
            load_vision_weights(tiny(), source)
        assert source in str(info.value)
