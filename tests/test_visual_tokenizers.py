"""Tests for the visual tokenizers that produce SIMLA's MIM targets: k-means and DALL-E."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from simla.tokenizers.visual import (
    DalleTokenizer,
    KMeansTokenizer,
    UntrustedPickleError,
    VisualTokenizer,
    load_visual_tokenizer,
)

# ---- synthetic textures ----------------------------------------------------------------------------------------

PATCH = 4
SIDE = 32  # four 16x16 quadrants, each a 4x4 block of 4x4 patches
QUADRANT = SIDE // 2
TEXTURES = ("hstripes", "vstripes", "checker", "flat")


def _texture(name: str, base: float, amp: float) -> Tensor:
    """A (QUADRANT, QUADRANT) grey-level texture of period 2, so every aligned 4x4 patch has the same structure."""
    rows = torch.arange(QUADRANT).unsqueeze(1).expand(QUADRANT, QUADRANT)
    cols = torch.arange(QUADRANT).unsqueeze(0).expand(QUADRANT, QUADRANT)
    if name == "hstripes":
        sign = (rows % 2) * 2 - 1
    elif name == "vstripes":
        sign = (cols % 2) * 2 - 1
    elif name == "checker":
        sign = ((rows + cols) % 2) * 2 - 1
    else:
        sign = torch.zeros_like(rows)
    return base + amp * sign.float()


def texture_images(count: int, seed: int, noise: float = 0.01) -> tuple[Tensor, Tensor]:
    """Images whose quadrants are random textures at random brightness/contrast/colour, plus small noise.

    Returns (images (count, 3, SIDE, SIDE) in [0, 1], texture index per quadrant (count, 2, 2)).
    The varying brightness and contrast check that the patch normalisation makes ids depend on structure.
    """
    g = torch.Generator().manual_seed(seed)
    images = torch.empty(count, 3, SIDE, SIDE)
    labels = torch.randint(len(TEXTURES), (count, 2, 2), generator=g)
    for n in range(count):
        for qr in range(2):
            for qc in range(2):
                base = 0.35 + 0.3 * float(torch.rand((), generator=g))
                amp = 0.15 + 0.2 * float(torch.rand((), generator=g))
                tint = 0.9 + 0.1 * torch.rand(3, 1, 1, generator=g)  # mild colour cast, same structure
                tex = _texture(TEXTURES[int(labels[n, qr, qc])], base, amp)
                images[n, :, qr * QUADRANT : (qr + 1) * QUADRANT, qc * QUADRANT : (qc + 1) * QUADRANT] = tint * tex
    images += noise * torch.randn(images.shape, generator=g)
    return images.clamp(0.0, 1.0), labels


def quadrant_ids(ids: Tensor) -> Tensor:
    """(N, 64) row-major ids -> (N, 2, 2, 16): the 16 token ids inside each quadrant."""
    grid = SIDE // PATCH
    per = grid // 2
    return ids.reshape(-1, 2, per, 2, per).permute(0, 1, 3, 2, 4).reshape(-1, 2, 2, per * per)


@pytest.fixture(scope="module")
def fitted() -> KMeansTokenizer:
    images, _ = texture_images(120, seed=0)
    return KMeansTokenizer.fit(images, vocab_size=len(TEXTURES), patch_size=PATCH, iterations=20, seed=0)


# ---- k-means ---------------------------------------------------------------------------------------------------


def test_kmeans_fit_recovers_textures(fitted: KMeansTokenizer) -> None:
    images, labels = texture_images(40, seed=1)
    ids = quadrant_ids(fitted(images))
    # Every patch of a quadrant (one texture) gets the same id, whatever its brightness/contrast/tint.
    assert (ids == ids[..., :1]).all()
    # The id is a function of the texture, and different textures get different ids.
    texture_to_id: dict[int, int] = {}
    for label, token in zip(labels.flatten().tolist(), ids[..., 0].flatten().tolist()):
        assert texture_to_id.setdefault(label, token) == token
    assert sorted(texture_to_id) == list(range(len(TEXTURES)))
    assert len(set(texture_to_id.values())) == len(TEXTURES)


def test_kmeans_output_shape_dtype_range(fitted: KMeansTokenizer) -> None:
    assert isinstance(fitted, VisualTokenizer)
    sizes = (fitted.vocab_size, fitted.image_size, fitted.grid_size, fitted.patch_size)
    assert sizes == (4, SIDE, SIDE // PATCH, PATCH)
    assert fitted.centroids.shape == (4, 3 * PATCH * PATCH)
    ids = fitted(torch.rand(5, 3, SIDE, SIDE))
    assert ids.shape == (5, (SIDE // PATCH) ** 2)
    assert ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < fitted.vocab_size
    assert not ids.requires_grad


def test_kmeans_ids_are_row_major() -> None:
    # Two hand-made codes: 0 = flat (the origin), 1 = horizontal stripes (normalised).
    stripes = _texture("hstripes", 0.5, 0.3)[:PATCH, :PATCH].expand(3, PATCH, PATCH).reshape(-1)
    stripes = (stripes - stripes.mean()) / stripes.std(correction=0)
    tokenizer = KMeansTokenizer(torch.stack([torch.zeros_like(stripes), stripes]), patch_size=PATCH, image_size=16)
    image = torch.full((1, 3, 16, 16), 0.4)
    row, col = 1, 2
    patch = _texture("hstripes", 0.5, 0.3)[:PATCH, :PATCH]
    image[0, :, row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH] = patch
    ids = tokenizer(image)
    expected = torch.zeros(1, 16, dtype=torch.long)
    expected[0, row * 4 + col] = 1
    assert torch.equal(ids, expected)


def test_kmeans_save_load_round_trip(fitted: KMeansTokenizer, tmp_path: Path) -> None:
    path = tmp_path / "kmeans.safetensors"
    fitted.save(path)
    loaded = KMeansTokenizer.load(path)
    assert (loaded.vocab_size, loaded.patch_size, loaded.image_size, loaded.eps) == (
        fitted.vocab_size,
        fitted.patch_size,
        fitted.image_size,
        fitted.eps,
    )
    images = torch.rand(6, 3, SIDE, SIDE)
    assert torch.equal(loaded(images), fitted(images))
    # The stored image size can be overridden (the grid follows); it must stay a multiple of the patch size.
    bigger = KMeansTokenizer.load(path, image_size=2 * SIDE)
    assert bigger.grid_size == 2 * SIDE // PATCH
    with pytest.raises(ValueError, match="multiple of the patch size"):
        KMeansTokenizer.load(path, image_size=SIDE + 1)


def _write(path: Path, centroids: Tensor, metadata: dict[str, str]) -> Path:
    save_file({"centroids": centroids}, str(path), metadata=metadata)
    return path


def test_kmeans_load_rejects_bad_metadata(tmp_path: Path) -> None:
    good = {"kind": "kmeans", "vocab_size": "4", "patch_size": "4", "image_size": "32"}
    centroids = torch.randn(4, 48)
    cases = [
        ({**good, "kind": "dalle"}, centroids, "expected 'kmeans'"),
        ({k: v for k, v in good.items() if k != "patch_size"}, centroids, "lacks the field 'patch_size'"),
        ({**good, "vocab_size": "four"}, centroids, "must be an integer"),
        ({**good, "vocab_size": "8"}, centroids, r"requires \(8, 48\)"),
        ({**good, "image_size": "30"}, centroids, "not a multiple of patch_size"),
        ({**good, "format_version": "99"}, centroids, "format_version"),
    ]
    for index, (metadata, tensor, message) in enumerate(cases):
        path = _write(tmp_path / f"bad{index}.safetensors", tensor, metadata)
        with pytest.raises(ValueError, match=message) as info:
            KMeansTokenizer.load(path)
        assert path.name in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        KMeansTokenizer.load(tmp_path / "missing.safetensors")


def test_input_checks(fitted: KMeansTokenizer) -> None:
    with pytest.raises(ValueError, match=r"\('B', 3, 32, 32\).*got \(2, 3, 16, 16\)"):
        fitted(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="got \\(2, 1, 32, 32\\)"):
        fitted(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="float images"):
        fitted(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_frozen_eval_and_autocast_proof(fitted: KMeansTokenizer) -> None:
    container = nn.ModuleDict({"tokenizer": fitted, "head": nn.Linear(2, 2)})
    container.train()
    assert container["head"].training and not fitted.training
    assert all(not p.requires_grad for p in fitted.parameters())
    images = torch.rand(3, 3, SIDE, SIDE, requires_grad=True)
    plain = fitted(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = fitted(images)
    assert torch.equal(plain, under_autocast)
    assert torch.equal(fitted(images.double()), plain)


def test_kmeans_fit_is_seeded_and_accepts_batches() -> None:
    images, labels = texture_images(60, seed=3)
    a = KMeansTokenizer.fit(images, vocab_size=4, patch_size=PATCH, seed=7, max_patches=1000)
    b = KMeansTokenizer.fit(images, vocab_size=4, patch_size=PATCH, seed=7, max_patches=1000)
    assert torch.equal(a.centroids, b.centroids)
    # An iterable of batches (e.g. a DataLoader of tensors), with uniform subsampling across the stream.
    streamed = KMeansTokenizer.fit(iter(images.split(7)), vocab_size=4, patch_size=PATCH, seed=7, max_patches=1000)
    ids = quadrant_ids(streamed(images))
    assert (ids == ids[..., :1]).all()
    assert len(set(ids[..., 0].flatten().tolist())) == 4
    with pytest.raises(ValueError, match="only 10 patches"):
        KMeansTokenizer.fit(images, vocab_size=11, patch_size=PATCH, max_patches=10)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        KMeansTokenizer.fit(images, vocab_size=4, patch_size=5)


def test_kmeans_more_codes_than_structures() -> None:
    # Noise-free: only two distinct normalised patches exist, so most centroids are duplicates or re-seeded;
    # the fit must still finish and tokenisation stay consistent (ties go to the lowest index).
    images, labels = texture_images(20, seed=4, noise=0.0)
    images = images[(labels < 2).flatten(1).all(dim=1)]
    tokenizer = KMeansTokenizer.fit(images, vocab_size=6, patch_size=PATCH, init="random", seed=0)
    ids = quadrant_ids(tokenizer(images))
    assert (ids == ids[..., :1]).all()


# ---- DALL-E ----------------------------------------------------------------------------------------------------

DALLE_SIZE = 32


def tiny_encoder(n_blk_per_group: int = 1, seed: int = 0) -> nn.Module:
    """A small random `dall_e` Encoder whose argmax varies over positions (so id comparisons mean something).

    A freshly initialised encoder with zero biases gives nearly position-independent codes; random biases and
    zero-mean output rows make the codes depend on the local features.
    """
    dall_e_encoder = pytest.importorskip("dall_e.encoder")
    torch.manual_seed(seed)
    encoder = dall_e_encoder.Encoder(
        n_hid=16, n_blk_per_group=n_blk_per_group, vocab_size=64, use_mixed_precision=False
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if name.endswith(".b"):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=g))
        weight = encoder.blocks.output.conv.w
        weight -= weight.mean(dim=1, keepdim=True)
    return encoder


def blocky_images(count: int = 4, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, scale_factor=DALLE_SIZE // 4, mode="nearest")


def manual_ids(encoder: nn.Module, images: Tensor) -> Tensor:
    with torch.no_grad():
        return encoder(0.8 * images + 0.1).argmax(dim=1).flatten(1)


def test_dalle_applies_pixel_map_and_argmax() -> None:
    encoder = tiny_encoder()
    tokenizer = DalleTokenizer.from_module(encoder, image_size=DALLE_SIZE)
    assert (tokenizer.vocab_size, tokenizer.image_size, tokenizer.grid_size) == (64, DALLE_SIZE, DALLE_SIZE // 8)
    images = blocky_images()
    seen: list[Tensor] = []
    handle = encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    ids = tokenizer(images)
    handle.remove()
    torch.testing.assert_close(seen[0], 0.8 * images + 0.1, rtol=0, atol=1e-7)
    assert ids.shape == (4, (DALLE_SIZE // 8) ** 2) and ids.dtype == torch.long
    assert torch.equal(ids, manual_ids(encoder, images))
    assert ids.unique().numel() > 1  # the comparison above is not between constant maps
    assert not tokenizer.training and all(not p.requires_grad for p in tokenizer.parameters())
    with pytest.raises(ValueError, match="multiple of 8"):
        DalleTokenizer.from_module(encoder, image_size=36)
    with pytest.raises(ValueError, match=r"expects images of shape \('B', 3, 32, 32\)"):
        tokenizer(torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("n_blk_per_group", [1, 2])
def test_dalle_state_dict_round_trip(tmp_path: Path, suffix: str, n_blk_per_group: int) -> None:
    encoder = tiny_encoder(n_blk_per_group=n_blk_per_group)
    path = tmp_path / f"encoder{suffix}"
    state = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    tokenizer = DalleTokenizer.from_file(path, image_size=DALLE_SIZE)
    assert tokenizer.encoder.n_blk_per_group == n_blk_per_group and tokenizer.encoder.n_hid == 16
    images = blocky_images(seed=n_blk_per_group)
    assert torch.equal(tokenizer(images), manual_ids(encoder, images))


def test_dalle_tokenizer_save_and_prefixed_state_dict(tmp_path: Path) -> None:
    encoder = tiny_encoder()
    tokenizer = DalleTokenizer.from_module(encoder, image_size=DALLE_SIZE)
    images = blocky_images()
    # safetensors written by save() remembers the image size.
    path = tmp_path / "dalle.safetensors"
    tokenizer.save(path)
    assert set(load_file(str(path))) == set(encoder.state_dict())
    reloaded = DalleTokenizer.from_file(path)
    assert reloaded.image_size == DALLE_SIZE
    assert torch.equal(reloaded(images), tokenizer(images))
    # A state dict of the tokenizer module itself (keys "encoder.*") loads too.
    prefixed = tmp_path / "tokenizer.pth"
    torch.save(tokenizer.state_dict(), prefixed)
    assert torch.equal(DalleTokenizer.from_file(prefixed, image_size=DALLE_SIZE)(images), tokenizer(images))


def test_dalle_pickled_module_needs_trust(tmp_path: Path) -> None:
    encoder = tiny_encoder()
    path = tmp_path / "encoder.pkl"
    torch.save(encoder, path)  # like the released encoder.pkl: a whole pickled module
    with pytest.raises(UntrustedPickleError, match="trust_pickle=True") as info:
        DalleTokenizer.from_file(path, image_size=DALLE_SIZE)
    assert "encoder.pkl" in str(info.value) and "arbitrary" in str(info.value)
    with pytest.raises(UntrustedPickleError):
        load_visual_tokenizer(f"dalle:{path}", image_size=DALLE_SIZE)
    trusted = DalleTokenizer.from_file(path, image_size=DALLE_SIZE, trust_pickle=True)
    images = blocky_images()
    assert torch.equal(trusted(images), manual_ids(encoder, images))


def test_dalle_rejects_mismatched_state_dict(tmp_path: Path) -> None:
    state = tiny_encoder().state_dict()
    del state["blocks.group_2.block_1.res_path.conv_1.b"]
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"(?s)broken\.pt.*conv_1\.b"):
        DalleTokenizer.from_file(path, image_size=DALLE_SIZE)
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a DALL-E encoder state dict"):
        DalleTokenizer.from_file(tmp_path / "other.pt")


def test_dalle_missing_package_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "encoder.pt"
    torch.save({}, path)
    # A None entry in sys.modules makes the import raise ImportError, as if dall_e were not installed.
    monkeypatch.setitem(sys.modules, "dall_e", None)
    monkeypatch.setitem(sys.modules, "dall_e.encoder", None)
    with pytest.raises(ImportError, match=r'pip install "simla\[dall-e\]"'):
        DalleTokenizer.from_file(path)


# ---- factory ---------------------------------------------------------------------------------------------------


def test_load_visual_tokenizer_dispatch(fitted: KMeansTokenizer, tmp_path: Path) -> None:
    kmeans_path = tmp_path / "codes.safetensors"
    fitted.save(kmeans_path)
    for spec in (f"kmeans:{kmeans_path}", str(kmeans_path), kmeans_path):
        assert isinstance(load_visual_tokenizer(spec), KMeansTokenizer)

    encoder = tiny_encoder()
    state_path = tmp_path / "encoder.bin"
    torch.save(encoder.state_dict(), state_path)
    images = blocky_images()
    for spec in (f"dalle:{state_path}", str(state_path)):
        tokenizer = load_visual_tokenizer(spec, image_size=DALLE_SIZE)
        assert isinstance(tokenizer, DalleTokenizer)
        assert torch.equal(tokenizer(images), manual_ids(encoder, images))
    assert load_visual_tokenizer(f"dalle:{state_path}").image_size == 128  # the R/2 default

    dalle_safetensors = tmp_path / "dalle.safetensors"
    DalleTokenizer.from_module(encoder, image_size=DALLE_SIZE).save(dalle_safetensors)
    assert isinstance(load_visual_tokenizer(dalle_safetensors), DalleTokenizer)

    for spec in (str(tmp_path / "nope.pt"), f"kmeans:{tmp_path / 'nope.safetensors'}"):
        with pytest.raises(FileNotFoundError, match="nope"):
            load_visual_tokenizer(spec)
