"""The detection demo: a RetinaNet teacher on Fashion-MNIST scenes, then one student three ways, one table.

    python -m fastkd.demos.detection
    python -m fastkd.demos.detection --seeds 3        (every student for seeds 0, 1, 2: mean, spread and a verdict)

1. write the Fashion-MNIST scenes (``fastkd data write fashion-scenes``; small canvases, 24-48 px garments:
   ``--scale``, ``--garment-sizes``) and their two COCO ``.beton`` files (``fastkd data write coco``) under
   ``--data-dir`` (skipped when both files are there, written with the same scene options);
2. train the teacher (``configs/demo_det/teacher.yaml``: a RetinaNet with a wider backbone, from scratch)
   and export it to ``OUT/teacher.pt`` (a whole detector; the students' runs load its backbone + FPN);
3. train the same student three ways, for each student seed (``--seeds N``: the config's seed, +1, ...; run
   directories ``OUT/<run>``, then ``OUT/<run>_seed<k>``): ``baseline`` (no distillation), ``mgd`` (one
   spatial-mask MGD module per FPN level P3-P7) and ``ct`` (one CT module per level);
4. print one table: box AP and AP50 (pycocotools, the whole val split) of the teacher and each student (mean
   and min-max over seeds), training images/s, wall time (also ``OUT/results.md`` / ``.json``); with several
   seeds, whether every method is above the baseline by more than the seed spread; draw ``OUT/compare.png``
   (box AP and the task loss over steps, every student on the same axes) and the first seed's MGD student's
   boxes on a few val images into ``OUT/boxes.png``.

Every ``KEY=VALUE`` overrides all four runs, ``--teacher KEY=VALUE ...`` / ``--students KEY=VALUE ...``
one side (put these list options after the plain overrides), e.g.

    python -m fastkd.demos.detection --teacher train.max_steps=1000 --students train.max_steps=1000

Runs happen one after the other in this one process (one DeepSpeed process group of one).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from ..resources import configs_dir
from .common import (demo_parser, draw_compare, finished_run, group, hide_numba_finalizer_noise, load_average,
                          machine_name as machine, markdown_table, replace_run_dir, run, run_cells, run_plan,
                          seed_cells, seed_plan, seed_run_dir, seeded, select_device, threads, verdict,
                          write_report)

CONFIGS = "demo_det"
"""The folder of the shipped configs (:mod:`fastkd.resources`) that holds this demo's configs."""


def config_dir() -> str:
    return os.path.join(configs_dir(), CONFIGS)
STUDENTS = ("baseline", "mgd", "ct")
DESCRIPTIONS = {
    "teacher": "teacher, trained from scratch",
    "baseline": "student, no distillation",
    "mgd": "student + MGD (spatial mask) on P3-P7",
    "ct": "student + CT on P3-P7",
}
SCORE_THRESHOLD = 0.3
"""Detections drawn in the picture score at least this."""
SCENE_SCALE = 0.5
"""Scenes are written at this scale: canvases 80x160 .. 160x120 px, at about the configs' input size."""
GARMENT_SIZES = (48, 96)
"""Garment sides before the scale: 24-48 px garments (Fashion-MNIST's own are 28 px), instead of the
scenes' default 12-48 px at this scale, which a RetinaNet from scratch barely learns in minutes on a CPU."""
TASK_LOSS = ("loss/classification", "loss/bbox_regression")
"""RetinaNet's task loss in the metrics rows (focal classification + box regression), summed in compare.png."""
SCENES_STAMP = "scenes.json"
"""In ``--data-dir``: the scene options its .beton files were written with (other options: written again)."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = demo_parser("fastkd demo det", __doc__.split("\n")[0], runs=("teacher",) + STUDENTS,
                    out="runs/demo_det", config_dir=config_dir())
    p.add_argument("--data-dir", default="data/fashion-scenes",
                   help="where train.beton / val.beton are (written there with the scenes when absent)")
    p.add_argument("--train-scenes", type=int, default=1024, help="training scenes written (default 1024)")
    p.add_argument("--val-scenes", type=int, default=64, help="val scenes written (default 64)")
    p.add_argument("--max-garments", type=int, default=4, help="garments per scene: 1..this (default 4)")
    p.add_argument("--scale", type=float, default=SCENE_SCALE,
                   help=f"scene canvas and garment size factor (default {SCENE_SCALE}: canvases 80x160 .. 160x120)")
    p.add_argument("--garment-sizes", type=int, nargs=2, default=list(GARMENT_SIZES), metavar=("MIN", "MAX"),
                   help="garment sides in px before --scale (default %(default)s: 24-48 px garments at scale 0.5)")
    p.add_argument("--pictures", type=int, default=4, help="val images drawn in boxes.png (default 4)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for the runs (default: torch's own; 1 is faster on a loaded CPU)")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return args


# ---------------------------------------------------------------------------------------------------------
# Steps


def prepare_data(args: argparse.Namespace) -> str:
    """Write the scenes and the two .beton files unless both files are there; returns what happened."""
    from ..config import ConfigError
    from ..data.detection.coco import write_coco_beton
    from ..data.sources.scenes import ScenesConfig, write_fashion_scenes

    betons = {s: os.path.join(args.data_dir, f"{s}.beton") for s in ("train", "val")}
    wanted = scene_options(args)
    stamp = os.path.join(args.data_dir, SCENES_STAMP)
    if all(os.path.isfile(f) for f in betons.values()) and _read_stamp(stamp) == wanted:
        return f"fashion-scenes .beton files present in {args.data_dir}"
    t0 = time.time()
    scenes = os.path.join(args.data_dir, "scenes")
    try:
        if os.path.isfile(stamp):
            os.remove(stamp)  # written again below once the .beton files are complete
        write_fashion_scenes(scenes, ScenesConfig(train=args.train_scenes, val=args.val_scenes,
                                                  max_garments=args.max_garments, scale=args.scale,
                                                  garment_sizes=tuple(args.garment_sizes)), force=True)
        for split, beton in betons.items():
            write_coco_beton(os.path.join(scenes, split),
                             os.path.join(scenes, "annotations", f"instances_{split}.json"), beton, force=True)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"writing the scenes into {args.data_dir}: {exc}") from None
    with open(stamp, "w") as f:
        json.dump(wanted, f)
    return (f"wrote {args.train_scenes} + {args.val_scenes} scenes (scale {args.scale}, garments "
            f"{args.garment_sizes[0]}-{args.garment_sizes[1]} px before it) and {', '.join(betons.values())} "
            f"in {time.time() - t0:.0f} s")


def scene_options(args: argparse.Namespace) -> Dict[str, object]:
    """What the scenes in ``--data-dir`` must have been written with (the stamp's content)."""
    return {"train": args.train_scenes, "val": args.val_scenes, "max_garments": args.max_garments,
            "scale": args.scale, "garment_sizes": list(args.garment_sizes)}


def _read_stamp(path: str) -> Optional[Dict[str, object]]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_config(name: str, args: argparse.Namespace, teacher_pt: str, seed_index: int = 0):
    """The run's YAML + the demo's paths (run directory, data, the exported teacher) + the user's overrides;
    the k-th further seed adds k to the configured seed."""
    from ..config import load_config

    side = args.teacher if name == "teacher" else args.students
    uses_teacher = name not in ("teacher", "baseline")
    overrides = [f"run_dir={seed_run_dir(args.out, name, seed_index)}",
                 f"data.path={os.path.join(args.data_dir, 'train.beton')}",
                 f"data.val_path={os.path.join(args.data_dir, 'val.beton')}",
                 *([f"teacher.checkpoint={teacher_pt}"] if uses_teacher else []), *args.overrides, *side]
    return seeded(load_config(os.path.join(args.config_dir, f"{name}.yaml"), overrides), seed_index)


def train_one(name: str, cfg) -> Dict[str, object]:
    """Train one run from scratch (an earlier run directory of the same name is replaced)."""
    from ..engine.trainer import train

    replace_run_dir(cfg.run_dir)  # the demo always starts over: resume: auto would pick up old runs
    print(f"\n=== {name} (seed {cfg.seed}): {DESCRIPTIONS[name]} -> {cfg.run_dir}", flush=True)
    t0 = time.time()
    train(cfg)
    return summarize(name, cfg.run_dir, time.time() - t0)


def summarize(name: str, run_dir: str, wall: Optional[float] = None) -> Dict[str, object]:
    """Box AP / AP50 and throughput of a finished run from its metrics.jsonl."""
    summary, last, cfg = finished_run(name, run_dir, "val/bbox_AP", wall)
    return {**summary, "seed": cfg["seed"], "fpn_channels": cfg["student"]["kwargs"].get("fpn_channels"),
            "AP": last["val/bbox_AP"], "AP50": last["val/bbox_AP50"]}


# ---------------------------------------------------------------------------------------------------------
# The picture


def draw_boxes(cfg, out: str, count: int) -> str:
    """The first ``count`` val images with the student of run ``cfg`` (its final weights): its detections
    scoring >= SCORE_THRESHOLD in red with class and score, the ground truth in dashed green."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from ..engine.export import student_state_dict
    from ..tasks.detection import DetectionTask
    from ..tasks.detection.forward import predict

    task = DetectionTask(cfg)
    model = task.build_model(cfg.student, "student")
    model.load_state_dict(student_state_dict(cfg.run_dir), strict=True)
    model.eval()
    _, val = task.build_loaders(micro=count, grad_accum=1, rank=0, world=1, seed=cfg.seed,
                                device=torch.device("cpu"), dtype=torch.float32, channels_last=False)
    names = _category_names(val)
    batch = next(iter(val))
    raw = batch.images[:count]
    with torch.no_grad():
        dev = task.to_device(batch, torch.device("cpu"), torch.float32, channels_last=False)
        detections = predict(model, dev.images, [tuple(t["size"]) for t in dev.targets])
    fig, axes = plt.subplots(1, len(raw), figsize=(4 * len(raw), 4), squeeze=False)
    for ax, img, det, tgt in zip(axes[0], raw, detections, batch.targets):
        h, w = tgt["size"]
        ax.imshow(img[:, :h, :w].permute(1, 2, 0).numpy())
        for box in tgt["boxes"].tolist():
            ax.add_patch(_rect(plt, box, "lime", "--"))
        for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
            if score >= SCORE_THRESHOLD:
                ax.add_patch(_rect(plt, box, "red", "-"))
                ax.text(box[0], box[1], f"{names.get(label, label)} {score:.2f}", color="white", fontsize=7,
                        va="bottom", bbox={"facecolor": "red", "alpha": 0.7, "pad": 1, "linewidth": 0})
        ax.set_axis_off()
    fig.suptitle(f"{cfg.student.name} ({os.path.basename(cfg.run_dir)}): red = detections >= {SCORE_THRESHOLD}, "
                 "dashed green = ground truth", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _rect(plt, box, color: str, style: str):
    x0, y0, x1, y1 = box
    return plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linestyle=style, linewidth=1.5)


def _category_names(loader) -> Dict[int, str]:
    """Contiguous label -> category name, from the .beton's sidecar."""
    by_id = {c["id"]: c["name"] for c in loader.meta["categories"]}
    return {label: by_id.get(cat, str(cat)) for label, cat in enumerate(loader.label_to_category) if label}


# ---------------------------------------------------------------------------------------------------------
# Report


def table(results: List[Dict[str, object]]) -> str:
    runs = group(results)
    base = runs.get("baseline")
    head = ["run", "model (FPN ch)", "seeds", "box AP %", "min-max", "AP vs baseline", "AP50 %", "train images",
            "images/s", "wall s", "run dir"]
    return markdown_table(head, [[name, f"{rs[0]['model']} ({rs[0]['fpn_channels']})",
                                  *seed_cells(rs, "AP", None if name in ("teacher", "baseline") else base, 100.0),
                                  f"{sum(100 * r['AP50'] for r in rs) / len(rs):.2f}", *run_cells(rs, 1)]
                                 for name, rs in runs.items()])


def report(results: List[Dict[str, object]], command: str, total_s: float, loads: List[str], pictures: List[str],
           torch_threads: int) -> str:
    import torch

    alphas = "; ".join(f"{r['name']} seed {r['seed']}: " + ", ".join(f"{k} {v:.3g}" for k, v in r["alphas"].items())
                       for r in results if r["alphas"])
    seeds = max(len(rs) for rs in group(results).values())
    return "\n".join(line for line in [
        f"Fashion-scenes detection demo, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"machine: {machine()}; load average (1/5/15 min) at the start {loads[0]}, at the end {loads[-1]}; "
        f"torch {torch.__version__}, python {platform.python_version()}, torch threads {torch_threads}",
        f"command: `{command}`; total {total_s:.0f} s",
        "box AP / AP50: pycocotools on the whole val split" + (
            f"; students: mean over {seeds} seeds, min-max = the spread of box AP" if seeds > 1 else "")
        + "; images/s = median training throughput (teacher backbone + FPN forward included for distilled "
        "students); wall s = all seeds together",
        "",
        table(results),
        "",
        verdict(results, STUDENTS, "AP", 100.0),
        f"alpha: auto chose: {alphas}" if alphas else "",
        f"pictures: {', '.join(pictures)}",
    ])


def run_all(args: argparse.Namespace) -> Tuple[List[Dict[str, object]], Dict[Tuple[str, int], object]]:
    """Validate every config, write the data, train the runs ``--only`` names (the teacher exported), summarise
    earlier runs of the others; returns the results and every run's config, by (name, seed index)."""
    teacher_pt = os.path.join(args.out, "teacher.pt")
    plan = seed_plan(STUDENTS, args.seeds)
    configs = {(n, k): run_config(n, args, teacher_pt, k) for n, k in plan}  # all validated first
    print(prepare_data(args), flush=True)
    chosen = {key: cfg for key, cfg in configs.items() if args.only is None or key[0] in args.only}
    return run_plan(plan, chosen, args.out, teacher_pt, train_one, summarize), configs


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    sys.unraisablehook = hide_numba_finalizer_noise
    problem = select_device(args.device)
    if problem:
        print(f"fastkd demo_det: {problem}", file=sys.stderr)
        return 2
    import torch

    from ..config import ConfigError

    if args.pictures < 1:
        print(f"fastkd demo_det: --pictures must be >= 1, got {args.pictures}", file=sys.stderr)
        return 2
    t_start, loads = time.time(), [load_average()]
    try:
        with threads(args.threads):
            results, configs = run_all(args)
            first = {r["name"] for r in results if r["run_dir"] == configs[r["name"], 0].run_dir}  # seed index 0
            pictured = next((n for n in ("mgd", "ct", "baseline") if n in first), None)
            picture = (draw_boxes(configs[pictured, 0], os.path.join(args.out, "boxes.png"), args.pictures)
                       if pictured else "none (no student run of the first seed)")
            compare = draw_compare(results, os.path.join(args.out, "compare.png"), "AP", metric="val/bbox_AP",
                                   title="validation box AP (%)", scale=100.0, loss=TASK_LOSS)
            used_threads = torch.get_num_threads()
    except ConfigError as exc:
        print(f"fastkd demo_det: error: {exc}", file=sys.stderr)
        return 2
    loads.append(load_average())
    command = "python -m fastkd.demos.detection " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report(results, command.strip(), time.time() - t_start, loads, [compare] * bool(compare) + [picture],
                  used_threads)
    write_report(args.out, text, results)
    return 0


def cli() -> int:
    """``python -m fastkd.demos.detection``: main, then leave the process group."""
    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
