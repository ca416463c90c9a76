"""``fastkd data write coco`` (mounted by :mod:`fastkd.data.cli`)."""
from __future__ import annotations

import sys

from ..cli import common_options, user_error


def add_commands(kinds) -> None:
    """Add the COCO writer to the ``fastkd data write`` subparsers."""
    coco = kinds.add_parser("coco", help="COCO images + instances JSON -> .beton (detection)")
    coco.add_argument("--images", required=True, help="directory the JSON's file_name entries are relative to")
    coco.add_argument("--annotations", required=True, help="instances_*.json")
    coco.add_argument("out", help="FILE.beton (the category map goes to FILE.beton.json)")
    coco.add_argument("--jpeg-quality", type=int, default=90)
    coco.add_argument("--max-side", type=int, default=None, help="shrink images whose longest side exceeds this")
    coco.add_argument("--max-boxes", type=int, default=None, help="boxes per image (default: the most in the file)")
    common_options(coco)
    coco.set_defaults(func=_write_coco)


def _write_coco(args) -> int:
    from .coco import write_coco_beton

    if not args.out.endswith(".beton"):
        return user_error(ValueError(f"OUT must be a FILE.beton, got {args.out!r}"))
    try:
        r = write_coco_beton(args.images, args.annotations, args.out, jpeg_quality=args.jpeg_quality,
                             max_side=args.max_side, max_boxes=args.max_boxes, num_workers=args.num_workers,
                             force=args.force, progress=args.progress)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        return user_error(e)
    print(f"wrote {r.path}: {r.num_images} images ({r.empty_images} without boxes), {r.num_boxes} boxes, "
          f"{r.seconds:.1f} s; category map in {r.path}.json")
    if r.clipped:
        print(f"clipped {len(r.clipped)} box(es) to their image (annotation ids {r.clipped[:10]}"
              f"{' ...' if len(r.clipped) > 10 else ''})", file=sys.stderr)
    if r.skipped:
        print(f"skipped {len(r.skipped)} empty box(es) (annotation id, why: {r.skipped[:10]}"
              f"{' ...' if len(r.skipped) > 10 else ''})", file=sys.stderr)
    return 0
