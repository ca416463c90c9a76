"""``fastkd data write fashion-scenes`` (mounted by :mod:`fastkd.data.cli`)."""
from __future__ import annotations

from ..cli import user_error


def add_commands(kinds) -> None:
    """Add the fashion-scenes writer to the ``fastkd data write`` subparsers."""
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


def _write_fashion_scenes(args) -> int:
    from .scenes import ScenesConfig, write_fashion_scenes

    try:
        cfg = ScenesConfig(train=args.train, val=args.val, seed=args.seed, max_garments=args.max_garments,
                           jpeg_quality=args.jpeg_quality, masks=args.masks, scale=args.scale,
                           garment_sizes=tuple(args.garment_sizes))
        paths = write_fashion_scenes(args.out, cfg, source_dir=args.source_dir, force=args.force)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        return user_error(e)
    for split, path in paths.items():
        print(f"wrote {split}: {path}")
    return 0
