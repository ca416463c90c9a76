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
import os
import sys
from collections import Counter
from typing import List, Optional

from .writers import ON_CORRUPT, WRITE_MODES

_SPLITS = ("train", "val", "validation", "test")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``data`` command (with ``write`` and ``inspect``) to an argparse subparsers object."""
    data = subparsers.add_parser("data", help="write and inspect FFCV .beton datasets")
    sub = data.add_subparsers(dest="data_command", required=True)
    write = sub.add_parser("write", help="write a dataset to .beton")
    kinds = write.add_subparsers(dest="kind", required=True)

    folder = kinds.add_parser("imagefolder", help="ImageFolder tree (ROOT/<class>/<image>)")
    folder.add_argument("root", help="ImageFolder root, or a folder of split folders (train/, val/)")
    folder.add_argument("out", help="FILE.beton, or a directory for one file per split")
    folder.add_argument("--max-resolution", type=int, default=None,
                        help="shrink so the longest side is at most this (e.g. 512); default: keep")
    folder.add_argument("--write-mode", choices=WRITE_MODES, default="proportion",
                        help="raw pixels, jpg, smart, or proportion (JPEG with --compress-probability)")
    folder.add_argument("--jpeg-quality", type=int, default=90)
    folder.add_argument("--compress-probability", type=float, default=0.5)
    folder.add_argument("--smart-threshold", type=int, default=None,
                        help="smart mode: JPEG when the raw image exceeds this many bytes")
    folder.add_argument("--on-corrupt", choices=ON_CORRUPT, default="skip",
                        help="skip unreadable images (counted and named) or stop at the first")
    _common(folder)
    folder.set_defaults(func=_write_imagefolder)

    fmnist = kinds.add_parser("fashion-mnist", help="Fashion-MNIST IDX files -> train.beton, test.beton")
    fmnist.add_argument("out", help="output directory")
    fmnist.add_argument("--source-dir", default=None, help="directory with the four .gz IDX files "
                        "(default: the Debian package, the cache, else a verified download)")
    fmnist.add_argument("--cache-dir", default=None, help="download cache (default ~/.cache/fastkd)")
    _common(fmnist)
    fmnist.set_defaults(func=_write_fashion_mnist)

    cs = kinds.add_parser("cityscapes", help="Cityscapes (leftImg8bit + gtFine) -> train.beton, val.beton "
                          "(image + label map in the 19 train ids)")
    cs.add_argument("root", help="Cityscapes root holding leftImg8bit/ and gtFine/")
    cs.add_argument("out", help="output directory")
    cs.add_argument("--splits", nargs="+", default=["train", "val"], help="splits to write (default train val)")
    cs.add_argument("--image-format", choices=("png", "jpg"), default="png",
                    help="png: the original files byte for byte (lossless); jpg: re-encoded (smaller)")
    cs.add_argument("--jpeg-quality", type=int, default=95)
    _common(cs)
    cs.set_defaults(func=_write_cityscapes)
    scenes = kinds.add_parser("fashion-scenes", help="detection scenes of Fashion-MNIST garments (COCO JSON + JPEG)")
    scenes.add_argument("out", help="output directory")
    scenes.add_argument("--train", type=int, default=512, help="training scenes (default 512)")
    scenes.add_argument("--val", type=int, default=128, help="validation scenes (default 128)")
    scenes.add_argument("--seed", type=int, default=0)
    scenes.add_argument("--max-garments", type=int, default=8, help="garments per scene: 1..this")
    scenes.add_argument("--jpeg-quality", type=int, default=90)
    scenes.add_argument("--masks", action="store_true", help="also write per-pixel label PNGs (class 1..10, 0 = background)")
    scenes.add_argument("--scale", type=float, default=1.0,
                        help="canvas and garment sizes times this (default 1: canvases 160x320 .. 320x240)")
    scenes.add_argument("--garment-sizes", type=int, nargs=2, default=[24, 96], metavar=("MIN", "MAX"),
                        help="smallest and largest garment side in px before --scale (default 24 96)")
    scenes.add_argument("--source-dir", default=None, help="Fashion-MNIST IDX directory (default: located)")
    scenes.add_argument("--force", action="store_true", help="replace an existing output directory")
    scenes.set_defaults(func=_write_fashion_scenes)

    coco = kinds.add_parser("coco", help="COCO images + instances JSON -> .beton (detection)")
    coco.add_argument("--images", required=True, help="directory the JSON's file_name entries are relative to")
    coco.add_argument("--annotations", required=True, help="instances_*.json")
    coco.add_argument("out", help="FILE.beton (the category map goes to FILE.beton.json)")
    coco.add_argument("--jpeg-quality", type=int, default=90)
    coco.add_argument("--max-side", type=int, default=None, help="shrink images whose longest side exceeds this")
    coco.add_argument("--max-boxes", type=int, default=None, help="boxes per image (default: the most in the file)")
    _common(coco)
    coco.set_defaults(func=_write_coco)

    inspect = sub.add_parser("inspect", help="print what a .beton holds")
    inspect.add_argument("file")
    inspect.set_defaults(func=_inspect)
    return data


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-workers", type=int, default=None, help="writer processes (default: all CPUs)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _print_report(report) -> None:
    print(f"wrote {report.path}: {report.num_samples} images, {len(report.classes)} classes, "
          f"{report.seconds:.1f} s")
    if report.skipped:
        print(f"skipped {len(report.skipped)} unreadable image(s):", file=sys.stderr)
        for path, reason in report.skipped:
            print(f"  {path}: {reason}", file=sys.stderr)


def _write_imagefolder(args) -> int:
    from .imagefolder import scan
    from .writers import ImageFolderSource, write_beton

    opts = dict(write_mode=args.write_mode, max_resolution=args.max_resolution,
                jpeg_quality=args.jpeg_quality, compress_probability=args.compress_probability,
                smart_threshold=args.smart_threshold, num_workers=args.num_workers, force=args.force,
                on_corrupt=args.on_corrupt, progress=args.progress)
    if args.out.endswith(".beton"):
        jobs = [(args.root, args.out)]
    else:
        splits = [s for s in _SPLITS if os.path.isdir(os.path.join(args.root, s))]
        if not splits:
            raise SystemExit(f"{args.root} has no split folders {_SPLITS}; give OUT as FILE.beton to "
                             "write the whole tree as one split")
        jobs = [(os.path.join(args.root, s), os.path.join(args.out, f"{s}.beton")) for s in splits]
    existing = [out for _, out in jobs if os.path.exists(out)]
    if existing and not args.force:
        raise SystemExit(f"refusing to overwrite {', '.join(existing)} (use --force)")
    for root, out in jobs:
        index = scan(root)
        print(f"{root}: {len(index)} files in {len(index.classes)} classes -> {out}")
        _print_report(write_beton(ImageFolderSource(index), out, **opts))
    return 0


def _write_fashion_mnist(args) -> int:
    from .fashion_mnist import write_fashion_mnist_beton

    paths = write_fashion_mnist_beton(args.out, source_dir=args.source_dir, cache_dir=args.cache_dir,
                                      force=args.force, num_workers=args.num_workers,
                                      progress=args.progress)
    for split, path in paths.items():
        print(f"wrote {path} ({split})")
    return 0


def _write_cityscapes(args) -> int:
    from ..config import ConfigError
    from . import cityscapes
    from .seg_sources import SegDataError, write_seg_beton

    try:  # every split is scanned and checked (pairs, sizes) before anything is written
        sources = {split: cityscapes.source(args.root, split) for split in args.splits}
        outs = {split: os.path.join(args.out, f"{split}.beton") for split in args.splits}
        existing = [o for o in outs.values() if os.path.exists(o)]
        if existing and not args.force:
            raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (use --force)")
        for split, src in sources.items():
            n = write_seg_beton(src, outs[split], image_format=args.image_format, jpeg_quality=args.jpeg_quality,
                                num_workers=args.num_workers, force=args.force, progress=args.progress)
            print(f"wrote {outs[split]}: {n} images + label maps ({split})")
    except (SegDataError, FileExistsError) as exc:
        raise ConfigError(str(exc)) from None
    return 0


def _user_error(e: Exception) -> int:
    print(f"fastkd data: error: {e}", file=sys.stderr)
    return 2


def _write_fashion_scenes(args) -> int:
    from .scenes import ScenesConfig, write_fashion_scenes

    try:
        cfg = ScenesConfig(train=args.train, val=args.val, seed=args.seed, max_garments=args.max_garments,
                           jpeg_quality=args.jpeg_quality, masks=args.masks, scale=args.scale,
                           garment_sizes=tuple(args.garment_sizes))
        paths = write_fashion_scenes(args.out, cfg, source_dir=args.source_dir, force=args.force)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        return _user_error(e)
    for split, path in paths.items():
        print(f"wrote {split}: {path}")
    return 0


def _write_coco(args) -> int:
    from .coco import write_coco_beton

    if not args.out.endswith(".beton"):
        return _user_error(ValueError(f"OUT must be a FILE.beton, got {args.out!r}"))
    try:
        r = write_coco_beton(args.images, args.annotations, args.out, jpeg_quality=args.jpeg_quality,
                             max_side=args.max_side, max_boxes=args.max_boxes, num_workers=args.num_workers,
                             force=args.force, progress=args.progress)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        return _user_error(e)
    print(f"wrote {r.path}: {r.num_images} images ({r.empty_images} without boxes), {r.num_boxes} boxes, "
          f"{r.seconds:.1f} s; category map in {r.path}.json")
    if r.clipped:
        print(f"clipped {len(r.clipped)} box(es) to their image (annotation ids {r.clipped[:10]}"
              f"{' ...' if len(r.clipped) > 10 else ''})", file=sys.stderr)
    if r.skipped:
        print(f"skipped {len(r.skipped)} empty box(es) (annotation id, why: {r.skipped[:10]}"
              f"{' ...' if len(r.skipped) > 10 else ''})", file=sys.stderr)
    return 0


def _inspect(args) -> int:
    from .base import ffcv_import

    ffcv_import()
    from ffcv.reader import Reader

    from .ffcv_loader import sidecar

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
