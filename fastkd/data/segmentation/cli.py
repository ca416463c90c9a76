"""``fastkd data write cityscapes`` (mounted by :mod:`fastkd.data.cli`)."""
from __future__ import annotations

import os

from ..cli import common_options


def add_commands(kinds) -> None:
    """Add the segmentation writers to the ``fastkd data write`` subparsers."""
    cs = kinds.add_parser("cityscapes", help="Cityscapes (leftImg8bit + gtFine) -> train.beton, val.beton "
                          "(image + label map in the 19 train ids)")
    cs.add_argument("root", help="Cityscapes root holding leftImg8bit/ and gtFine/")
    cs.add_argument("out", help="output directory")
    cs.add_argument("--splits", nargs="+", default=["train", "val"], help="splits to write (default train val)")
    cs.add_argument("--image-format", choices=("png", "jpg"), default="png",
                    help="png: the original files byte for byte (lossless); jpg: re-encoded (smaller)")
    cs.add_argument("--jpeg-quality", type=int, default=95)
    common_options(cs)
    cs.set_defaults(func=_write_cityscapes)


def _write_cityscapes(args) -> int:
    from ...config import ConfigError
    from . import cityscapes
    from .sources import SegDataError, write_seg_beton

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
