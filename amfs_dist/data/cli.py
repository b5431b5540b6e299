"""`amfs data prepare NAME --src DIR --out DIR` and `amfs data info STORE`.

Heavy imports (torch, torchvision, pyarrow) happen inside the commands, so registering the
parser costs nothing for the other amfs commands.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from amfs_dist.locks import add_wait_flag, hold, wait_until_free

DATASETS = ("omniglot", "mini-imagenet", "cub", "fc100", "cifar-fs")


def register(subparsers) -> None:
    data = subparsers.add_parser(
        "data", help="convert few-shot benchmarks into a store; inspect a store",
        description="Convert few-shot benchmarks from their standard on-disk layouts into a "
                    "memory-mapped Arrow store (nothing is downloaded; see docs/datasets.md).")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    prepare = sub.add_parser(
        "prepare", help="convert a data set on disk into a store",
        description="Convert a data set on disk into a store at --out (written atomically).")
    prepare.add_argument("name", choices=DATASETS, metavar="NAME",
                         help="one of " + ", ".join(DATASETS))
    prepare.add_argument("--src", required=True, type=Path,
                         help="the data set's folder, in its standard layout")
    prepare.add_argument("--out", required=True, type=Path, help="the store folder to create")
    prepare.add_argument("--split", choices=("vinyals", "lake"),
                         help="omniglot only: character split of Vinyals et al. (default) or "
                              "the alphabet split of Lake et al.")
    prepare.add_argument("--rotations", action="store_true",
                         help="omniglot only: add 90/180/270 degree rotations as new classes")
    prepare.add_argument("--image-size", type=int, metavar="N",
                         help="resize to NxN (default: 28 omniglot, 84 mini-imagenet and cub, "
                              "32 fc100 and cifar-fs)")
    prepare.add_argument("--allow-pickle", action="store_true",
                         help="allow reading Python pickles (mini-imagenet cache files, "
                              "cifar-100-python); only for files you trust")
    prepare.add_argument("--bbox-crop", action="store_true",
                         help="cub only: crop every image to its bounding box")
    prepare.add_argument("--force", action="store_true",
                         help="replace an existing store at --out (never any other folder)")
    add_wait_flag(prepare)
    prepare.set_defaults(func=run_prepare)

    info = sub.add_parser("info", help="print the classes and images of a store per split",
                          description="Validate a store and print its classes and images "
                                      "per split.")
    info.add_argument("store", type=Path, help="a store folder made by `amfs data prepare`")
    info.add_argument("--verify", action="store_true",
                      help="also recompute the content hash (reads every image)")
    info.add_argument("--json", action="store_true", help="print one JSON object instead")
    info.set_defaults(func=run_info)


def run_prepare(args: argparse.Namespace) -> int:
    from amfs_dist.data import prepare
    from amfs_dist.data.prepare.common import PrepareOptions
    from amfs_dist.data.store import StoreError, check_out, open_store, write_store

    # refuse before a long conversion, not after
    src, out = args.src.resolve(), args.out.resolve()
    if out == src or src in out.parents:
        raise StoreError(f"--out {args.out} is the source folder --src {args.src} or inside "
                         f"it: a store there would become part of the source data; choose an "
                         f"--out outside it")
    if out in src.parents:
        raise StoreError(f"--src {args.src} is inside --out {args.out}; choose an --out "
                         f"outside the source data")
    check_out(args.out, args.force)
    wait_until_free(args.out, "store", args.wait_for_lock)  # a second prepare: refused or waits
    opts = PrepareOptions(image_size=args.image_size, split=args.split, rotations=args.rotations,
                          allow_pickle=args.allow_pickle, bbox_crop=args.bbox_crop)
    start = time.perf_counter()
    data, split_name = prepare.load(args.name, args.src, opts)
    options = {"image_size": int(data.image_shape[-1]), "rotations": args.rotations,
               "bbox_crop": args.bbox_crop, "src": str(args.src.resolve())}
    with hold(args.out, "store", args.wait_for_lock):  # checks --out again, then writes
        write_store(args.out, data, source=args.name, split_name=split_name, options=options,
                    force=args.force)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    print(summary_table(args.out, open_store(args.out)))
    return 0


def split_rows(data) -> list[dict]:
    import numpy as np
    counts = np.bincount(data.labels, minlength=len(data.class_names))
    rows = []
    for split, classes in data.splits.items():
        per_class = counts[classes]
        rows.append({"split": split, "classes": int(len(classes)),
                     "images": int(per_class.sum()),
                     "groups": len({data.groups[c] for c in classes}) if data.groups else 0,
                     "min_images_per_class": int(per_class.min()) if len(classes) else 0,
                     "max_images_per_class": int(per_class.max()) if len(classes) else 0})
    return rows


def summary_table(path: Path, data) -> str:
    from amfs_dist.data.store import read_manifest
    manifest = read_manifest(path)
    shape = "x".join(str(d) for d in data.image_shape)
    lines = [f"store {path}: {manifest['source']}, split {manifest['split']}, images {shape}, "
             f"sha256 {manifest['content_sha256'][:12]}",
             f"{'split':<6} {'classes':>8} {'images':>9} {'groups':>7} {'images/class':>13}"]
    rows = split_rows(data)
    for r in rows:
        span = f"{r['min_images_per_class']}-{r['max_images_per_class']}"
        lines.append(f"{r['split']:<6} {r['classes']:>8} {r['images']:>9} {r['groups']:>7} "
                     f"{span:>13}")
    lines.append(f"{'total':<6} {sum(r['classes'] for r in rows):>8} "
                 f"{sum(r['images'] for r in rows):>9}")
    return "\n".join(lines)


def run_info(args: argparse.Namespace) -> int:
    from amfs_dist.data.store import open_store, read_manifest

    data = open_store(args.store, verify=args.verify)
    if args.json:
        manifest = read_manifest(args.store)
        print(json.dumps({"store": str(args.store), "source": manifest["source"],
                          "split": manifest["split"], "image_shape": list(data.image_shape),
                          "content_sha256": manifest["content_sha256"],
                          "verified": bool(args.verify), "splits": split_rows(data)}))
    else:
        print(summary_table(args.store, data))
        if args.verify:
            print("content hash verified")
    return 0
