"""The segmentation demo: fashion-scenes label maps, a PSPNet teacher, one student three ways, one table.

    python -m fastkd.demos.segmentation                  (add --threads 1 on a loaded CPU)
    python -m fastkd.demos.segmentation --seeds 3        (every student for seeds 0, 1, 2: mean, spread and a verdict)

1. write small fashion-scenes with per-pixel labels (``--scale 0.4``: 64x128 .. 128x96 canvases; 400
   train / 100 val scenes) to ``--data-dir`` unless its label maps are there, and their two ``.beton`` files,
   which every run reads (``data.source: ffcv``);
2. train the teacher (``configs/demo_seg/teacher.yaml``: PSPNet-R18 D8 at half width) and export it to
   ``OUT/teacher.pt``;
3. train the same student (PSPNet-R18 D8 at quarter width) three ways, for each student seed (``--seeds N``:
   the config's seed, +1, ...; run directories ``OUT/<run>``, then ``OUT/<run>_seed<k>``): ``baseline``,
   ``mgd`` (spatial mask on layer4, 1x1 align, + MGD's channel-wise logit loss) and ``ct`` (layer4),
   each reading the exported teacher;
4. print one table (mIoU, pixel accuracy, mean class accuracy of the whole val set, each the mean over seeds,
   with mIoU's min-max; training images/s, wall time), also written to ``OUT/results.md`` / ``.json``; with
   several seeds, whether every method is above the baseline by more than the seed spread; draw
   ``OUT/compare.png`` (mIoU and the task loss over steps, every student on the same axes) and
   ``OUT/masks.png``: a few val images, their label maps and the first seed's runs' predicted masks.

Every ``KEY=VALUE`` overrides all four runs, ``--teacher KEY=VALUE ...`` / ``--students KEY=VALUE ...``
one side (put these list options after the plain overrides), e.g.

    python -m fastkd.demos.segmentation --device cuda --students train.max_steps=2000

Runs happen in this one process, one after the other.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence

from ..resources import configs_dir
from .common import (demo_parser, draw_compare, finished_run, group, machine, markdown_table, replace_run_dir, run,
                          run_cells, run_plan, seed_cells, seed_plan, seed_run_dir, seeded, select_device, threads,
                          verdict, write_report)

CONFIGS = "demo_seg"
"""The folder of the shipped configs (:mod:`fastkd.resources`) that holds this demo's configs."""


def config_dir() -> str:
    return os.path.join(configs_dir(), CONFIGS)
STUDENTS = ("baseline", "mgd", "ct")
RUNS = ("teacher",) + STUDENTS
DESCRIPTIONS = {
    "teacher": "teacher, trained from scratch",
    "baseline": "student, no distillation",
    "mgd": "student + MGD (layer4, spatial mask) + channel-wise logit KD",
    "ct": "student + CT (layer4)",
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = demo_parser("fastkd demo seg", __doc__.split("\n")[0], runs=RUNS, out="runs/demo_seg",
                    config_dir=config_dir())
    p.add_argument("--data-dir", default="data/fashion-scenes-small",
                   help="the fashion-scenes root (written there when its label maps are absent)")
    p.add_argument("--train-scenes", type=int, default=400, help="training scenes to write (default 400)")
    p.add_argument("--val-scenes", type=int, default=100, help="validation scenes to write (default 100)")
    p.add_argument("--scale", type=float, default=0.4, help="scene size factor (default 0.4: 64..128 px canvases)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for the runs (default: torch's own; 1 is faster on a loaded CPU)")
    p.add_argument("--images", type=int, default=4, help="val images in masks.png (default 4)")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.images < 1:
        p.error(f"--images must be >= 1, got {args.images}")
    return args


# ---------------------------------------------------------------------------------------------------------
# Steps


def prepare_data(args: argparse.Namespace) -> str:
    """Write the scenes with label maps unless both splits' label maps are there, and their two segmentation
    ``.beton`` files (``--data-dir``/train.beton, val.beton: PNG, lossless) unless they are there and not older
    than the scenes; returns a log line. The runs read the ``.beton`` files (``data.source: ffcv``)."""
    from ..data.segmentation.sources import fashion_scenes, write_seg_beton
    from ..data.sources.scenes import ScenesConfig, write_fashion_scenes

    masks = [os.path.join(args.data_dir, "masks", s) for s in ("train", "val")]
    t0 = time.time()
    if all(os.path.isdir(m) for m in masks):
        counts = [len(os.listdir(m)) for m in masks]
        line = f"fashion-scenes with label maps present in {args.data_dir} ({counts[0]} train / {counts[1]} val)"
    else:
        cfg = ScenesConfig(train=args.train_scenes, val=args.val_scenes, masks=True, scale=args.scale)
        write_fashion_scenes(args.data_dir, cfg, force=True)
        line = (f"wrote {cfg.train} train / {cfg.val} val fashion-scenes (scale {cfg.scale}, label maps) to "
                f"{args.data_dir}")
    written = []
    for split, mask_dir in zip(("train", "val"), masks):
        beton = os.path.join(args.data_dir, f"{split}.beton")
        if os.path.isfile(beton) and os.path.getmtime(beton) >= os.path.getmtime(mask_dir):
            continue
        write_seg_beton(fashion_scenes(args.data_dir, split), beton, image_format="png", force=True, progress=False)
        written.append(beton)
    if written:
        line += f"; wrote {', '.join(written)}"
    return line + f" in {time.time() - t0:.0f} s"


def run_config(name: str, args: argparse.Namespace, teacher_pt: str, seed_index: int = 0):
    """The run's YAML + the demo's paths (run directory, data, the exported teacher) + the user's overrides;
    the k-th further seed adds k to the configured seed."""
    from ..config import load_config

    side = args.teacher if name == "teacher" else args.students
    uses_teacher = name not in ("teacher", "baseline")
    overrides = [f"run_dir={seed_run_dir(args.out, name, seed_index)}", f"data.path={args.data_dir}",
                 *([f"teacher.checkpoint={teacher_pt}"] if uses_teacher else []), *args.overrides, *side]
    return seeded(load_config(os.path.join(args.config_dir, f"{name}.yaml"), overrides), seed_index)


def train_one(name: str, cfg) -> Dict[str, object]:
    """Train one run from scratch (an earlier run directory of the same name is replaced)."""
    from ..engine.trainer import train

    replace_run_dir(cfg.run_dir)
    print(f"\n=== {name} (seed {cfg.seed}): {DESCRIPTIONS[name]} -> {cfg.run_dir}", flush=True)
    t0 = time.time()
    train(cfg)
    return summarize(name, cfg.run_dir, time.time() - t0)


def _parameters(model_cfg: Dict[str, object]) -> int:
    from ..models import build
    from ..tasks.segmentation.models import MODELS

    model = build(model_cfg["name"], model_cfg["num_classes"], zoo=MODELS, **model_cfg.get("kwargs", {}))
    return sum(p.numel() for p in model.parameters())


def summarize(name: str, run_dir: str, wall: Optional[float] = None) -> Dict[str, object]:
    """mIoU, accuracies and throughput of a finished run from its metrics.jsonl and config.json."""
    summary, last, cfg = finished_run(name, run_dir, "val/mIoU", wall)
    return {**summary, "seed": cfg["seed"], "width": cfg["student"].get("kwargs", {}).get("base_channels", 64),
            "params": _parameters(cfg["student"]), "mIoU": last["val/mIoU"], "aAcc": last["val/aAcc"],
            "mAcc": last["val/mAcc"], "val_pixels": int(last["val/pixels"])}


# ---------------------------------------------------------------------------------------------------------
# Report


def table(results: List[Dict[str, object]]) -> str:
    runs = group(results)
    base = runs.get("baseline")
    head = ["run", "model", "params", "seeds", "mIoU %", "min-max", "vs baseline", "pixel acc %", "mean class acc %",
            "train images", "images/s", "wall s", "run dir"]
    return markdown_table(head, [[name, f"{rs[0]['model']} (base {rs[0]['width']})", f"{rs[0]['params'] / 1e6:.2f} M",
                                  *seed_cells(rs, "mIoU", None if name in ("teacher", "baseline") else base),
                                  *(f"{sum(r[k] for r in rs) / len(rs):.2f}" for k in ("aAcc", "mAcc")),
                                  *run_cells(rs, 1)] for name, rs in runs.items()])


def report(results: List[Dict[str, object]], command: str, total_s: float, pictures: List[str], n_val: int,
           torch_threads: int) -> str:
    import torch

    alphas = "; ".join(f"{r['name']} seed {r['seed']}: " + ", ".join(f"{k} {v:.3g}" for k, v in r["alphas"].items())
                       for r in results if r["alphas"])
    seeds = max(len(rs) for rs in group(results).values())
    return "\n".join([
        f"Segmentation demo (fashion-scenes), {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"machine: {machine()}; torch {torch.__version__}, python {platform.python_version()}, "
        f"torch threads {torch_threads}",
        f"command: `{command}`; total {total_s:.0f} s",
        f"mIoU / pixel acc / mean class acc over the {n_val} val scenes ({results[0]['val_pixels']} pixels, "
        "11 classes with background)" + (f"; students: mean over {seeds} seeds, min-max = the spread of mIoU"
                                         if seeds > 1 else "")
        + "; images/s = median training throughput (teacher forward included for distilled students); wall s = "
        "all seeds together",
        "",
        table(results),
        "",
        verdict(results, STUDENTS, "mIoU"),
        f"alpha: auto chose: {alphas}" if alphas else "",
        f"pictures: {', '.join(pictures)}",
    ])


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    problem = select_device(args.device)
    if problem:
        print(f"fastkd demo_seg: {problem}", file=sys.stderr)
        return 2
    import torch

    from ..config import ConfigError
    from ..data.segmentation.sources import SegDataError
    from ..engine.export import student_state_dict
    from ..tasks.segmentation.picture import draw_masks

    t_start = time.time()
    teacher_pt = os.path.join(args.out, "teacher.pt")
    plan = seed_plan(STUDENTS, args.seeds)
    try:
        configs = {(n, k): run_config(n, args, teacher_pt, k) for n, k in plan}  # all validated before anything runs
        chosen = {key: cfg for key, cfg in configs.items() if args.only is None or key[0] in args.only}
        print(prepare_data(args), flush=True)
        with threads(args.threads):
            results = run_plan(plan, chosen, args.out, teacher_pt, train_one, summarize)
            os.makedirs(args.out, exist_ok=True)
            first = {r["name"] for r in results if r["run_dir"] == configs[r["name"], 0].run_dir}  # seed index 0
            picture = draw_masks({n: configs[n, 0] for n in RUNS if n in first}, args.data_dir,
                                 os.path.join(args.out, "masks.png"), args.images, weights=student_state_dict)
            compare = draw_compare(results, os.path.join(args.out, "compare.png"), "mIoU", metric="val/mIoU",
                                   title="validation mIoU (%)")
            used_threads = torch.get_num_threads()
    except (ConfigError, SegDataError, FileNotFoundError) as exc:  # the last: Fashion-MNIST is not installed
        print(f"fastkd demo_seg: error: {exc}", file=sys.stderr)
        return 2
    command = "python -m fastkd.demos.segmentation " + " ".join(sys.argv[1:] if argv is None else argv)
    n_val = len(os.listdir(os.path.join(args.data_dir, "masks", "val")))
    text = report(results, command.strip(), time.time() - t_start, [compare] * bool(compare) + [picture], n_val,
                  used_threads)
    write_report(args.out, text, results)
    return 0


def cli() -> int:
    """``python -m fastkd.demos.segmentation``: main, then leave the process group."""
    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
