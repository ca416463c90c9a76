"""``fastkd data write imagefolder | fashion-mnist`` (mounted by :mod:`fastkd.data.cli`)."""
from __future__ import annotations

import os
import sys

from ..cli import common_options
from .writers import ON_CORRUPT, WRITE_MODES

_SPLITS = ("train", "val", "validation", "test")


def add_commands(kinds) -> None:
    """Add the classification writers to the ``fastkd data write`` subparsers."""
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
    common_options(folder)
    folder.set_defaults(func=_write_imagefolder)

    fmnist = kinds.add_parser("fashion-mnist", help="Fashion-MNIST IDX files -> train.beton, test.beton")
    fmnist.add_argument("out", help="output directory")
    fmnist.add_argument("--source-dir", default=None, help="directory with the four .gz IDX files "
                        "(default: the Debian package, the cache, else a verified download)")
    fmnist.add_argument("--cache-dir", default=None, help="download cache (default ~/.cache/fastkd)")
    common_options(fmnist)
    fmnist.set_defaults(func=_write_fashion_mnist)


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
    from .writers import write_fashion_mnist_beton

    paths = write_fashion_mnist_beton(args.out, source_dir=args.source_dir, cache_dir=args.cache_dir,
                                      force=args.force, num_workers=args.num_workers,
                                      progress=args.progress)
    for split, path in paths.items():
        print(f"wrote {path} ({split})")
    return 0
