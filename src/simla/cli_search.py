"""`simla index build | update | info`, `simla search` and `simla serve`: argument parsing only; the work is
in :mod:`simla.search`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .data.images import load_image
from .distributed import evaluation_group, get_rank
from .models.quantize import INT8, int8_device
from .search import Index, SearchError
from .search.check import check_index, repair_index
from .search.html import render_results_page
from .search.index import jpeg_thumbnail
from .search.guard import allowed_hosts
from .search.server import INCOMPLETE_WARNING, serve


def _embedding_device(args: argparse.Namespace, recorded: str | None = None) -> str:
    """--device for embedding: int8 (asked, or "auto" on an int8 index) runs on the CPU, which "auto" then
    picks; a GPU is refused with one line before any model is loaded."""
    int8 = args.precision == INT8 or (args.precision == "auto" and recorded == INT8)
    return int8_device(args.device) if int8 else args.device


def cmd_index_build(args: argparse.Namespace) -> int:
    with evaluation_group(_embedding_device(args)) as device:
        index = Index.build(args.source, args.output, checkpoint=args.checkpoint, image_root=args.image_root,
                            batch_size=args.batch_size, num_workers=args.num_workers, precision=args.precision,
                            device=device, progress=not args.quiet, allow_empty=False)
        if get_rank() == 0:
            print(index.last_summary.describe())
            print(f"index: {index.path}")
    return 0


def cmd_index_update(args: argparse.Namespace) -> int:
    recorded = Index.open(args.index)
    try:
        chosen = _embedding_device(args, recorded.precision)
    finally:
        recorded.close()
    with evaluation_group(chosen) as device:
        index = Index.open(args.index, checkpoint=args.checkpoint, device=device)
        summary = index.update(batch_size=args.batch_size, num_workers=args.num_workers, precision=args.precision,
                               progress=not args.quiet)
        if get_rank() == 0:
            print(summary.describe())
            if summary.items == 0:
                print(f"warning: {index.path} now holds no images: {_no_images(index)}", file=sys.stderr)
    return 0


def _no_images(index: Index) -> str:
    """Why an index is empty, and the way out (for `update`'s warning and `search`'s error)."""
    info = index.info()
    errors = (f"; its {info['errors']:,} unusable files are listed by `simla index info {index.path} --errors`"
              if info["errors"] else "")
    return (f"its source {info['source']} had none it could read at the last update{errors}; add images there and "
            f"run `simla index update {index.path}`")


def cmd_index_info(args: argparse.Namespace) -> int:
    index = Index.open(args.index)
    info = index.info()
    errors = [e.__dict__ for e in index.errors()] if args.errors else None
    if args.json:
        print(json.dumps({**info, **({"error_list": errors} if errors is not None else {})}, indent=2))
        return 0
    for key in ("path", "items", "errors", "source_kind", "source", "model", "checkpoint", "fingerprint", "dim",
                "precision", "complete", "created", "updated"):
        print(f"{key:>12}: {info[key]}")
    for error in errors or []:
        print(f"  {error['key']}: [{error['kind']}] {error['reason']}")
    return 0


def cmd_index_check(args: argparse.Namespace) -> int:
    if args.repair:
        with evaluation_group(_embedding_device(args)) as device:
            report = repair_index(args.index, checkpoint=args.checkpoint, device=device, batch_size=args.batch_size,
                                  num_workers=args.num_workers, precision=args.precision, progress=not args.quiet)
    else:
        report = check_index(args.index)
    print(report.describe())
    return 0 if report.healthy else 1


def _print_table(hits) -> None:
    print(f"{'rank':>4}  {'score':>7}  {'itc':>7}  {'itm':>6}  key / caption")
    for hit in hits:
        itm = f"{hit.itm:6.3f}" if hit.itm is not None else f"{'-':>6}"
        caption = (hit.caption or "").split("\n")[0]
        caption = caption if len(caption) <= 60 else caption[:57] + "..."
        dupes = f"  (+{len(hit.duplicates)} near-duplicates)" if hit.duplicates else ""
        print(f"{hit.rank:>4}  {hit.score:7.4f}  {hit.itc:7.4f}  {itm}  {hit.key}{dupes}"
              + (f"\n{'':>32}{caption}" if caption else ""))


def _warn_if_incomplete(index: Index) -> None:
    if index.info().get("complete") is False:
        print(f"warning: {index.path}: {INCOMPLETE_WARNING}", file=sys.stderr)


def cmd_search(args: argparse.Namespace) -> int:
    index = Index.open(args.index, checkpoint=args.checkpoint, device=args.device, backend=args.backend)
    if len(index) == 0:  # not a bare table header: nothing can ever match
        raise SearchError(f"{index.path} holds no images: {_no_images(index)}")
    _warn_if_incomplete(index)
    dedup = args.dedup
    hits = index.search(args.text, args.image, k=args.k, rerank=args.rerank, offset=args.offset, dedup=dedup,
                        itc_weight=args.itc_weight, batch_size=args.batch_size)
    if args.json:
        for hit in hits:
            print(json.dumps(hit.to_dict()))
    else:
        _print_table(hits)
    if args.html:
        query = {"text": args.text, "k": args.k, "rerank": args.rerank, "offset": args.offset, "dedup": dedup,
                 "itc_weight": args.itc_weight}
        if args.image:
            query["image_thumbnail"] = jpeg_thumbnail(load_image(args.image))  # the page embeds it
        overlays = index.explain(args.text, [h.item_id for h in hits]) if args.explain and args.text else None
        page = render_results_page(query, hits, lambda hit: index.thumbnail(hit.item_id), overlays)
        out = Path(args.html)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
        print(f"wrote {out}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    allowed_hosts(args.host, args.allow_host)  # a bad --allow-host is refused before the model is loaded
    index = Index.open(args.index, checkpoint=args.checkpoint, device=args.device, backend=args.backend)
    _warn_if_incomplete(index)
    if len(index) == 0:  # the page refreshes after an update, so serving an empty index can make sense
        print(f"warning: {index.path} holds no images yet: {_no_images(index)}", file=sys.stderr)
    index.search("warm-up", k=1, dedup=None)  # load the model and the features before the first visitor
    print(f"serving {index.path} ({len(index):,} images) on http://{args.host}:{args.port}  (Ctrl-C to stop)")
    serve(index, host=args.host, port=args.port, allow_hosts=args.allow_host)
    return 0


def _add_embedding_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--num-workers", type=int, default=2, help="image reading/decoding workers (default 2)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", INT8), default="auto",
                        help="ViT precision: auto = bf16 autocast on a GPU, fp32 on a CPU (bf16 is slower on CPUs "
                             "without bf16 instructions), or the index's own if it is int8; int8 = a dynamically "
                             "quantized model, CPU only (faster there, features move slightly: an index keeps "
                             "int8 or float features, never both, and its queries use the same); features are "
                             "stored in float16 either way")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (under torchrun: this rank's GPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_query_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="the index's model if its recorded checkpoint moved (same weights only)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--backend", choices=("auto", "exact", "faiss"), default="auto",
                        help="nearest-neighbour search: exact matrix product, or faiss (optional extra "
                             "simla[faiss]); auto picks faiss for very large indexes when it is installed")


def _add_check_command(index_sub) -> None:
    """`simla index check INDEX [--repair]`."""
    check = index_sub.add_parser(
        "check", help="verify the manifest and every feature file; --repair fixes what it can",
        description="Checks the manifest (SQLite integrity, tables, meta) and every feature chunk (present, inside "
        "the index, float16, the registered shape, finite). Exit status 0: healthy, 1: damaged. With --repair "
        "(under the index's write lock) damaged chunks and their items are dropped and embedded again by an "
        "update; an unreadable manifest is set aside and the index rebuilt from its recorded source.")
    check.add_argument("index", help="the index folder")
    check.add_argument("--repair", action="store_true", help="repair what the check finds, and say what was done")
    check.add_argument("--checkpoint", help="the index's model for re-embedding, if its recorded checkpoint moved")
    _add_embedding_options(check)
    check.set_defaults(func=cmd_index_check)


def add_search_commands(sub) -> None:
    """Register `index`, `search` and `serve` on the top-level sub-parsers."""
    index = sub.add_parser("index", help="build or update a search index of a folder, annotation file or shards")
    index_sub = index.add_subparsers(dest="index_command", required=True)
    build = index_sub.add_parser(
        "build", help="embed every image of a source into a new index folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="simla index build photos/ --checkpoint C --output photos.idx\n"
        "simla index build pairs.json --checkpoint C --output pairs.idx     (captions are kept)\n"
        "simla index build 'shards/{00000..00099}.tar' --checkpoint C --output shards.idx\n"
        "torchrun --nproc_per_node 8 -m simla.cli index build photos/ --checkpoint C --output photos.idx\n\n"
        "Unreadable, corrupt or empty files are skipped and listed (simla index info --errors). An interrupted "
        "build resumes when run again with the same arguments.")
    build.add_argument("source", help="a folder (recursive), a .json/.jsonl/.csv/.tsv annotation file, or .tar shards")
    build.add_argument("--checkpoint", required=True, help="ours (.pt), an export directory, or a reference .pth")
    build.add_argument("--output", required=True, help="the index folder to create")
    build.add_argument("--image-root", help="annotation files: folder relative image paths are joined to "
                       "(default: the annotation file's folder)")
    _add_embedding_options(build)
    build.set_defaults(func=cmd_index_build)

    update = index_sub.add_parser("update", help="embed new and changed files, drop deleted ones; resume a build",
                                  description="Re-scan the index's source. Files whose size and time are unchanged "
                                  "are not read; others are hashed and re-embedded only when their bytes changed.")
    update.add_argument("index", help="the index folder")
    update.add_argument("--checkpoint", help="the index's model if its recorded checkpoint moved (same weights only)")
    _add_embedding_options(update)
    update.set_defaults(func=cmd_index_update)

    info = index_sub.add_parser("info", help="what an index holds: counts, source, model, errors")
    info.add_argument("index", help="the index folder")
    info.add_argument("--errors", action="store_true", help="list the files that could not be indexed")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_index_info)

    _add_check_command(index_sub)

    search = sub.add_parser(
        "search", help="query an index by text and/or image, optionally re-ranked by the ITM head",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="simla search photos.idx \"a dog on a beach\" --k 20 --rerank 100\n"
        "simla search photos.idx --image query.jpg --k 20\n"
        "simla search photos.idx \"a red circle\" --rerank 50 --html results.html --explain\n\n"
        "Ranking: cosine of the ITC features; with --rerank R the R best are re-scored by the ITM head "
        "(text queries), score = ITM match probability + ITC_WEIGHT x cosine, and come first.")
    search.add_argument("index", help="the index folder")
    search.add_argument("text", nargs="?", help="the query text")
    search.add_argument("--image", help="a query image (image-to-image search; with a text, both are combined)")
    search.add_argument("--k", type=int, default=20, help="results to return (default 20)")
    search.add_argument("--offset", type=int, default=0, help="skip this many results (paging)")
    search.add_argument("--rerank", type=int, default=0,
                        help="ITC candidates re-scored by ITM (text queries; e.g. 100; default 0 = ITC only)")
    search.add_argument("--itc-weight", type=float, default=0.0,
                        help="fused score = ITM probability + W x ITC cosine (default 0: ITM alone)")
    search.add_argument("--dedup", type=float, metavar="COSINE",
                        help="fold results whose features have cosine >= COSINE with a better result into it "
                             "(e.g. 0.99; default off: the right threshold depends on the model)")
    search.add_argument("--batch-size", type=int, default=32, help="pairs per ITM forward when re-ranking")
    search.add_argument("--json", action="store_true", help="print one JSON object per hit (JSON lines)")
    search.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page of thumbnails")
    search.add_argument("--explain", action="store_true", help="with --html and a text: Grad-CAM overlay per hit")
    _add_query_model_options(search)
    search.set_defaults(func=cmd_search)

    serve = sub.add_parser("serve", help="a local web page to search an index (needs simla[serve])",
                           description="simla serve photos.idx --port 8000, then open http://127.0.0.1:8000")
    serve.add_argument("index", help="the index folder")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; any other address shows "
                            "the index to the network, with a warning)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="also answer requests addressed to NAME (a host name or address other machines use "
                            "to reach this one; repeatable). localhost, 127.0.0.1, [::1] and --host are always "
                            "allowed; requests for any other Host get HTTP 400 (protection against DNS rebinding)")
    _add_query_model_options(serve)
    serve.set_defaults(func=cmd_serve)
