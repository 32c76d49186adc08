"""The built-in k-means visual tokenizer: nearest centroid of each contrast-normalised pixel patch.

It needs no download, so that MIM also works on a fresh offline install. Fit it once with
`KMeansTokenizer.fit` and keep it with `save`/`load` (safetensors).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .base import FORMAT_VERSION, KIND_KMEANS, PathLike, VisualTokenizer, _check_path, _is_safetensors, _metadata_int


logger = logging.getLogger(__name__)

# Elements of one (rows x K) distance block in nearest-centroid search: bounds the temporary to 128 MiB of
# fp32 whatever the batch size and codebook size.
_DIST_BLOCK_ELEMENTS = 1 << 25
# k-means++ seeding looks at no more than this many candidate points per centroid (see `_kmeans_plus_plus`).
_KMEANSPP_POINTS_PER_CENTROID = 32


# --------------------------------------------------------------------------------------------------------------
# Built-in k-means patch tokenizer
# --------------------------------------------------------------------------------------------------------------


def _patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, S, S) -> (B, (S/p)**2, C*p*p): non-overlapping patches, row-major over the grid.

    Each patch vector is laid out channel-major (C, p, p), the same layout at fit and at tokenize time.
    """
    batch, channels, height, width = images.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    patches = patches.permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, grid_h * grid_w, channels * patch_size * patch_size)


def _normalise_patches(patches: Tensor, eps: float) -> Tensor:
    """Subtract each patch's mean and divide by (its std + eps).

    Removing the mean and scale makes the code describe local structure (edges, texture) rather than
    brightness or contrast. The additive eps is a floor, not just a guard against 0/0: a nearly flat patch
    keeps a small norm instead of having its sensor/JPEG noise blown up to unit scale, so flat regions share a
    few codes near the origin rather than scattering over random ones.
    """
    centred = patches - patches.mean(dim=-1, keepdim=True)
    std = centred.square().mean(dim=-1, keepdim=True).sqrt()
    return centred / (std + eps)


def _nearest_centroid(
    points: Tensor, centroids: Tensor, points_sq: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Index of, and squared Euclidean distance to, the nearest centroid of every point (ties -> lowest index).

    Uses ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, i.e. one matmul per block of rows, with rows processed in
    blocks so the (rows x K) temporary stays bounded for any batch or codebook size. `points_sq` (the
    ||x||^2 of every point) may be passed in by callers that search the same points many times (k-means).
    """
    num_points = points.shape[0]
    num_centroids = centroids.shape[0]
    centroid_sq = centroids.square().sum(dim=1).unsqueeze(0)
    if points_sq is None:
        points_sq = points.square().sum(dim=1)
    rows_per_block = max(1, _DIST_BLOCK_ELEMENTS // max(1, num_centroids))
    indices = torch.empty(num_points, dtype=torch.long, device=points.device)
    distances = torch.empty(num_points, dtype=points.dtype, device=points.device)
    for start in range(0, num_points, rows_per_block):
        stop = min(start + rows_per_block, num_points)
        # ||c||^2 - 2 x.c in one fused addmm; ||x||^2 does not change the argmin, so it is added afterwards.
        partial = torch.addmm(centroid_sq, points[start:stop], centroids.t(), beta=1.0, alpha=-2.0)
        best, best_index = partial.min(dim=1)
        indices[start:stop] = best_index
        distances[start:stop] = best + points_sq[start:stop]
    # Clamp: rounding in the expansion can make a true zero slightly negative.
    return indices, distances.clamp_min_(0.0)


def _iter_image_batches(images: Tensor | Iterable[Tensor], chunk: int = 1024) -> Iterator[Tensor]:
    """Yield image batches from a tensor (split into chunks to bound memory) or an iterable of tensors."""
    if isinstance(images, Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        yield from images.split(chunk)
        return
    for index, batch in enumerate(images):
        if not isinstance(batch, Tensor):
            raise TypeError(
                f"KMeansTokenizer.fit expects image tensors (N, 3, S, S); item {index} is {type(batch).__name__}"
            )
        yield batch


class KMeansTokenizer(VisualTokenizer):
    """Built-in visual tokenizer: nearest k-means centroid of each contrast-normalised pixel patch.

    The image is cut into non-overlapping patch_size x patch_size patches (grid = image_size / patch_size),
    each patch vector (3 * patch_size**2 values, channel-major) is normalised by its own mean and
    (std + eps), and its id is the nearest centroid in squared Euclidean distance. It needs no download, so
    MIM works offline; fit it once on training images with `fit` and keep it with `save`/`load`.

    The centroids are a registered buffer of shape (vocab_size, 3 * patch_size**2), so `.to(device)` moves them.
    """

    centroids: Tensor

    def __init__(self, centroids: Tensor, patch_size: int, image_size: int, eps: float = 0.1) -> None:
        if centroids.dim() != 2:
            raise ValueError(f"centroids must be 2-d (vocab_size, 3 * patch_size**2), got {tuple(centroids.shape)}")
        if patch_size < 1 or image_size % patch_size != 0:
            raise ValueError(f"image_size {image_size} must be a positive multiple of patch_size {patch_size}")
        dim = 3 * patch_size * patch_size
        if centroids.shape[1] != dim:
            raise ValueError(
                f"centroids have {centroids.shape[1]} features, expected 3 * patch_size**2 = {dim} "
                f"for patch_size {patch_size}"
            )
        if not centroids.is_floating_point():
            raise ValueError(f"centroids must be floating point, got {centroids.dtype}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        super().__init__(vocab_size=centroids.shape[0], image_size=image_size, grid_size=image_size // patch_size)
        self.patch_size = int(patch_size)
        self.eps = float(eps)
        self.register_buffer("centroids", centroids.detach().float().clone())
        self._freeze()

    def _encode(self, images: Tensor) -> Tensor:
        patches = _normalise_patches(_patchify(images, self.patch_size), self.eps)
        batch, tokens, dim = patches.shape
        indices, _ = _nearest_centroid(patches.reshape(batch * tokens, dim), self.centroids.float())
        return indices.reshape(batch, tokens)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, patch_size={self.patch_size}, eps={self.eps}"

    # ---- fitting -------------------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        images: Tensor | Iterable[Tensor],
        vocab_size: int,
        patch_size: int,
        image_size: int | None = None,
        iterations: int = 20,
        seed: int = 0,
        max_patches: int = 200_000,
        eps: float = 0.1,
        init: str = "kmeans++",
        device: str | torch.device | None = None,
        tol: float = 1e-4,
    ) -> KMeansTokenizer:
        """Fit a codebook of `vocab_size` centroids to normalised patches of `images` (Lloyd's k-means).

        Args:
            images: float images (N, 3, S, S) in [0, 1], or an iterable of such batches (read once).
            vocab_size: number of centroids K.
            patch_size: patch side p in pixels; S must be a multiple of p.
            image_size: side the tokenizer will expect; defaults to the S of the data.
            iterations: maximum Lloyd iterations (stops early once no assignment changes).
            seed: seeds the patch sample and the initialisation (a private torch.Generator).
            max_patches: patches are sampled uniformly without replacement over the whole input, up to this
                many, so memory and time are bounded however many images are given.
            eps: contrast floor of the patch normalisation (see `_normalise_patches`).
            init: "kmeans++" (D^2 sampling, seeded) or "random" (K distinct sampled patches).
            device: where to run k-means; default the device of the first batch.
            tol: stop early once at most this fraction of the patches change cluster in an iteration.
        """
        if vocab_size < 1 or patch_size < 1 or iterations < 0 or max_patches < 1:
            raise ValueError(
                f"need vocab_size, patch_size, max_patches >= 1 and iterations >= 0; got {vocab_size}, "
                f"{patch_size}, {max_patches}, {iterations}"
            )
        if init not in ("kmeans++", "random"):
            raise ValueError(f"init must be 'kmeans++' or 'random', got {init!r}")
        started = time.perf_counter()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        points, data_size, seen = _sample_patches(images, patch_size, max_patches, eps, generator, device)
        if image_size is None:
            image_size = data_size
        elif image_size != data_size:
            logger.warning(
                "k-means fitted on %d px images but the tokenizer will expect %d px: the same patch size then "
                "covers a different fraction of the scene",
                data_size,
                image_size,
            )
        if points.shape[0] < vocab_size:
            raise ValueError(f"only {points.shape[0]} patches to fit {vocab_size} centroids; give more images")
        logger.info(
            "k-means visual tokenizer: K=%d, patch %dx%d, %d of %d patches sampled, on %s",
            vocab_size,
            patch_size,
            patch_size,
            points.shape[0],
            seen,
            points.device,
        )
        if init == "kmeans++":
            centroids = _kmeans_plus_plus(points, vocab_size, generator)
        else:
            pick = torch.randperm(points.shape[0], generator=generator)[:vocab_size].to(points.device)
            centroids = points[pick].clone()
        centroids = _lloyd(points, centroids, iterations, tol)
        logger.info("k-means visual tokenizer fitted in %.2f s", time.perf_counter() - started)
        return cls(centroids.cpu(), patch_size=patch_size, image_size=image_size, eps=eps)

    # ---- persistence ---------------------------------------------------------------------------------------

    def save(self, path: PathLike) -> None:
        """Write the centroids and their metadata to a `.safetensors` file."""
        target = Path(path)
        if not _is_safetensors(target):
            raise ValueError(f"KMeansTokenizer.save writes safetensors: path must end in .safetensors, not {target}")
        metadata = {
            "kind": KIND_KMEANS,
            "format_version": FORMAT_VERSION,
            "vocab_size": str(self.vocab_size),
            "patch_size": str(self.patch_size),
            "image_size": str(self.image_size),
            # repr() round-trips a float exactly.
            "eps": repr(self.eps),
        }
        save_file({"centroids": self.centroids.detach().float().cpu().contiguous()}, str(target), metadata=metadata)
        logger.info("saved k-means visual tokenizer (K=%d, patch %d) to %s", self.vocab_size, self.patch_size, target)

    @classmethod
    def load(cls, path: PathLike, image_size: int | None = None) -> KMeansTokenizer:
        """Load a tokenizer written by `save`, validating its metadata and shapes.

        `image_size` overrides the stored input side (it must stay a multiple of the patch size; the grid
        then changes accordingly).
        """
        file = _check_path(path)
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                metadata = dict(handle.metadata() or {})
                names = list(handle.keys())
                centroids = handle.get_tensor("centroids") if "centroids" in names else None
        except SafetensorError as exc:
            raise ValueError(f"{file}: not a readable safetensors file: {exc}") from exc
        kind = metadata.get("kind")
        if kind != KIND_KMEANS:
            raise ValueError(
                f"{file}: metadata kind is {kind!r}, expected {KIND_KMEANS!r} (not a k-means tokenizer file)"
            )
        version = metadata.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{file}: unsupported k-means tokenizer format_version {version!r} "
                f"(this simla reads {FORMAT_VERSION!r})"
            )
        vocab_size = _metadata_int(metadata, "vocab_size", file)
        patch_size = _metadata_int(metadata, "patch_size", file)
        stored_image_size = _metadata_int(metadata, "image_size", file)
        try:
            eps = float(metadata.get("eps", "0.1"))
        except ValueError:
            raise ValueError(f"{file}: metadata field 'eps' must be a float, got {metadata['eps']!r}") from None
        if centroids is None:
            raise ValueError(f"{file}: no 'centroids' tensor (tensors: {names})")
        expected = (vocab_size, 3 * patch_size * patch_size)
        if tuple(centroids.shape) != expected:
            raise ValueError(
                f"{file}: centroids have shape {tuple(centroids.shape)}, but the metadata (vocab_size={vocab_size}, "
                f"patch_size={patch_size}) requires {expected}"
            )
        if stored_image_size % patch_size != 0:
            raise ValueError(f"{file}: image_size {stored_image_size} is not a multiple of patch_size {patch_size}")
        size = stored_image_size if image_size is None else image_size
        if size % patch_size != 0:
            raise ValueError(f"image_size {size} is not a multiple of the patch size {patch_size} stored in {file}")
        return cls(centroids, patch_size=patch_size, image_size=size, eps=eps)


def _sample_patches(
    images: Tensor | Iterable[Tensor],
    patch_size: int,
    max_patches: int,
    eps: float,
    generator: torch.Generator,
    device: str | torch.device | None,
) -> tuple[Tensor, int, int]:
    """Uniform sample (without replacement) of up to `max_patches` normalised patches from a stream of batches.

    Each patch gets a random key and the `max_patches` smallest keys are kept (a bottom-k reservoir), so the
    sample is uniform over the whole stream and memory stays bounded even for an iterable of unknown length.
    Returns (points, image side, patches seen).
    """
    kept: Tensor | None = None
    kept_keys: Tensor | None = None
    image_side: int | None = None
    seen = 0
    target: torch.device | None = torch.device(device) if device is not None else None
    for batch in _iter_image_batches(images):
        if batch.dim() != 4 or batch.shape[1] != 3 or batch.shape[2] != batch.shape[3]:
            raise ValueError(
                f"KMeansTokenizer.fit expects (N, 3, S, S) images, got a batch of shape {tuple(batch.shape)}"
            )
        if not batch.is_floating_point():
            raise ValueError(f"KMeansTokenizer.fit expects float images in [0, 1], got dtype {batch.dtype}")
        side = int(batch.shape[2])
        if image_side is None:
            if side % patch_size != 0:
                raise ValueError(f"image side {side} is not a multiple of patch_size {patch_size}")
            image_side = side
            # One check on the first batch (fitting is offline, so the host sync is harmless): mean/std
            # normalised inputs would give a codebook that mismatches the [0, 1] images seen at tokenize time.
            low, high = float(batch.min()), float(batch.max())
            if low < -0.01 or high > 1.01:
                logger.warning(
                    "KMeansTokenizer.fit: pixel values span [%.3f, %.3f]; expected float images in [0, 1] "
                    "without mean/std normalisation",
                    low,
                    high,
                )
        elif side != image_side:
            raise ValueError(f"all images must have the same size; got {side} after {image_side}")
        if target is None:
            target = batch.device
        patches = _normalise_patches(_patchify(batch.to(target, torch.float32), patch_size), eps)
        patches = patches.reshape(-1, patches.shape[-1])
        if patches.shape[0] == 0:
            continue
        seen += patches.shape[0]
        keys = torch.rand(patches.shape[0], generator=generator).to(target)
        if kept is None or kept_keys is None:
            kept, kept_keys = patches, keys
        else:
            kept, kept_keys = torch.cat([kept, patches]), torch.cat([kept_keys, keys])
        if kept.shape[0] > max_patches:
            chosen = torch.topk(kept_keys, max_patches, largest=False).indices
            kept, kept_keys = kept[chosen], kept_keys[chosen]
    if kept is None or image_side is None:
        raise ValueError("KMeansTokenizer.fit got no images")
    return kept.contiguous(), image_side, seen


def _weighted_sample(weights: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """`count` distinct indices drawn with probability proportional to `weights` (CPU, float64), seeded.

    Uses exponential keys (the smallest E_i / w_i win), which is O(N) and much cheaper than
    torch.multinomial for large N. If fewer than `count` weights are positive, the rest are uniform draws.
    """
    keys = torch.empty(weights.shape[0], dtype=torch.float64).exponential_(generator=generator)
    keys = keys / weights  # w = 0 gives +inf: never chosen while positive weights remain
    positive = int((weights > 0).sum())
    if positive >= count:
        return torch.topk(keys, count, largest=False).indices
    # Every point already coincides with a centre, so any choice duplicates one; Lloyd's empty-cluster
    # handling (and argmin's lowest-index ties) cope with duplicates.
    taken = torch.topk(keys, positive, largest=False).indices
    extra = torch.randint(weights.shape[0], (count - positive,), generator=generator)
    return torch.cat([taken, extra])


def _kmeans_plus_plus(points: Tensor, num_centroids: int, generator: torch.Generator) -> Tensor:
    """Seeded k-means++ initialisation (D^2 sampling) on a subsample, drawing a few centres per round.

    Two bounds keep it cheap on a CPU, both only affecting the starting point of Lloyd's iterations:
    - it runs on at most `_KMEANSPP_POINTS_PER_CENTROID * K` randomly chosen points;
    - exact k-means++ is K sequential passes over them; drawing ceil(K / 256) centres per round from the same
      D^2 distribution (in the spirit of k-means||) bounds the passes to about 256. For K <= 256 it is exact.
    """
    num_points = points.shape[0]
    pool_size = min(num_points, _KMEANSPP_POINTS_PER_CENTROID * num_centroids)
    if pool_size < num_points:
        pool = points[torch.randperm(num_points, generator=generator)[:pool_size].to(points.device)]
    else:
        pool = points
    pool_sq = pool.square().sum(dim=1)
    per_round = max(1, math.ceil(num_centroids / 256))
    first = int(torch.randint(pool_size, (1,), generator=generator))
    chosen = [first]
    min_dist = (pool - pool[first]).square().sum(dim=1)
    while len(chosen) < num_centroids:
        take = min(per_round, num_centroids - len(chosen))
        picks = _weighted_sample(min_dist.double().cpu(), take, generator)
        chosen.extend(int(i) for i in picks)
        _, dist_new = _nearest_centroid(pool, pool[picks.to(points.device)], pool_sq)
        min_dist = torch.minimum(min_dist, dist_new)
    return pool[torch.tensor(chosen, device=points.device)].clone()


def _lloyd(points: Tensor, centroids: Tensor, iterations: int, tol: float) -> Tensor:
    """Lloyd iterations: assign to nearest centroid, move centroids to their cluster means.

    A centroid that loses all its points is re-seeded at one of the points farthest from their own centroid
    (the worst-represented data), so no codebook entry is wasted. Stops early once at most `tol` of the
    assignments change in an iteration (and no cluster was empty).
    """
    num_points = points.shape[0]
    num_centroids, dim = centroids.shape
    points_sq = points.square().sum(dim=1)
    assignment: Tensor | None = None
    for iteration in range(1, iterations + 1):
        new_assignment, dist = _nearest_centroid(points, centroids, points_sq)
        changed = num_points if assignment is None else int((new_assignment != assignment).sum())
        assignment = new_assignment
        counts = torch.bincount(assignment, minlength=num_centroids)
        sums = torch.zeros(num_centroids, dim, dtype=points.dtype, device=points.device)
        sums.index_add_(0, assignment, points)
        non_empty = counts > 0
        centroids = centroids.clone()
        centroids[non_empty] = sums[non_empty] / counts[non_empty].unsqueeze(1).to(points.dtype)
        empty = torch.nonzero(~non_empty).flatten()
        if empty.numel() > 0:
            farthest = torch.topk(dist, min(empty.numel(), num_points)).indices
            centroids[empty[: farthest.numel()]] = points[farthest]
        logger.info(
            "k-means iteration %d/%d: mean squared distance %.4f, %d assignments changed, %d empty clusters re-seeded",
            iteration,
            iterations,
            float(dist.mean()),
            changed,
            empty.numel(),
        )
        if changed <= tol * num_points and empty.numel() == 0:
            break
    return centroids


__all__ = ["KMeansTokenizer"]
