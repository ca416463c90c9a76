"""``fastkd data ...``: write and inspect .beton files.

The engine's CLI mounts it with ``fastkd.data.cli.add_parser(subparsers)``; the parsed namespace's
``func(args) -> int`` runs the command.  Standalone: ``python -m fastkd.data.cli write ...``.

  fastkd data write imagefolder ROOT OUT [--max-resolution 512] [--write-mode proportion]
                    [--jpeg-quality 90] [--compress-probability 0.5] [--on-corrupt skip|error]
                    [--num-workers N] [--force]
      OUT ending in .beton: ROOT is one split.  Otherwise OUT is a directory and every split
      folder of ROOT (train, val, ...) that holds class folders becomes OUT/<split>.beton.
  fastkd data write fashion-mnist OUT_DIR [--source-dir DIR] [--cache-dir DIR] [--force]
  fastkd data write cityscapes ROOT OUT_DIR [--image-format png|jpg] [--splits train val] [--force]
      leftImg8bit + gtFine labelIds -> OUT_DIR/<split>.beton (19 train ids, 255 ignored)
  fastkd data write fashion-scenes OUT_DIR [--train 512] [--val 128] [--seed 0] [--max-garments 8]
                    [--masks] [--jpeg-quality 90] [--scale 1.0] [--garment-sizes 24 96]
                    [--source-dir DIR] [--force]
      COCO-style detection scenes of Fashion-MNIST garments: OUT_DIR/{train,val}/*.jpg,
      OUT_DIR/annotations/instances_{train,val}.json (and masks/{train,val}/*.png with --masks).
  fastkd data write coco --images DIR --annotations instances_x.json OUT.beton [--jpeg-quality 90]
                    [--max-side N] [--max-boxes K] [--num-workers N] [--force]
      COCO detection -> .beton + OUT.beton.json (category map).  Bad input: exit status 2 and one
      message naming the file and the entry; clipped / skipped boxes are counted and listed.
  fastkd data inspect FILE.beton
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections import Counter
from typing import List, Optional

WRITE_COMMANDS = ("classification", "segmentation", "sources", "detection")
"""The folders whose ``cli.add_commands(kinds)`` adds ``fastkd data write`` kinds (imported by name: the core
imports no task's folder)."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``data`` command (with ``write`` and ``inspect``) to an argparse subparsers object."""
    data = subparsers.add_parser("data", help="write and inspect FFCV .beton datasets")
    sub = data.add_subparsers(dest="data_command", required=True)
    write = sub.add_parser("write", help="write a dataset to .beton")
    kinds = write.add_subparsers(dest="kind", required=True)

    for name in WRITE_COMMANDS:  # each task folder adds its own writers
        importlib.import_module(f"fastkd.data.{name}.cli").add_commands(kinds)

    inspect = sub.add_parser("inspect", help="print what a .beton holds")
    inspect.add_argument("file")
    inspect.set_defaults(func=_inspect)
    return data


def common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-workers", type=int, default=None, help="writer processes (default: all CPUs)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def user_error(e: Exception) -> int:
    print(f"fastkd data: error: {e}", file=sys.stderr)
    return 2


def _inspect(args) -> int:
    from .base import ffcv_import

    ffcv_import()
    from ffcv.reader import Reader

    from .format import sidecar

    reader = Reader(args.file)
    names = dict(zip(reader.field_names, reader.metadata.dtype.names))
    print(f"{args.file}: {reader.num_samples} samples, fields {reader.field_names}")
    meta = sidecar(args.file)
    if meta.get("task") == "segmentation":  # images and label maps stored as encoded bytes
        sizes = {f: reader.metadata[names[f]] for f in ("height", "width") if f in names}
        shape = " x ".join(f"{f} {v.min()}-{v.max()}" for f, v in sizes.items())
        print(f"  segmentation: {meta.get('num_classes')} classes, ignore {meta.get('ignore_index')}, images "
              f"{meta.get('image_format')}, {shape}")
        return 0

    if meta.get("kind") == "coco-detection":
        print(f"  COCO detection from {meta['annotations']}: {meta['num_boxes']} boxes (at most "
              f"{meta['max_boxes']} per image), {meta['empty_images']} image(s) without boxes, "
              f"{len(meta['categories'])} categories (label: COCO id) "
              + ", ".join(f"{c['label']}: {c['id']}" for c in meta["categories"][:12])
              + (" ..." if len(meta["categories"]) > 12 else ""))
    if "image" in names:
        img = reader.metadata[names["image"]]
        modes = Counter(int(m) for m in img["mode"])
        print(f"  image: height {img['height'].min()}-{img['height'].max()}, width "
              f"{img['width'].min()}-{img['width'].max()}, jpeg {modes.get(0, 0)}, raw {modes.get(1, 0)}")
    if "label" in names:
        counts = Counter(int(v) for v in reader.metadata[names["label"]])
        print(f"  label: {len(counts)} classes, per class min {min(counts.values())} max {max(counts.values())}")
    if meta and "write_mode" in meta:
        print(f"  written with write_mode={meta.get('write_mode')} max_resolution={meta.get('max_resolution')}"
              f", {len(meta.get('skipped', []))} file(s) skipped")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastkd")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"fastkd data: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
