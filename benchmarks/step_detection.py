"""The detection training step of ``bench_step.py --task detection``: the real detection task's forwards and
the engine's Distiller on synthetic images and boxes (a :class:`fastkd.data.detection.batch.DetectionBatch`).

The recipe is ``configs/coco/retinanet_x101_r50_mgd.yaml`` (RetinaNet, MGD with a spatial mask on every FPN
level P3-P7), with the model names and the image size of a :data:`SHAPES` entry and no checkpoints (random
weights time the same work). Variants (:data:`VARIANTS`):

    student      student forward (torchvision's losses) + backward + SGD step, no teacher
    kd-ref       + teacher backbone+FPN forward + MGD on P3-P7, pure-PyTorch reference, eager
    kd-auto      + the same with backend auto (measured: fastest of csrc / triton / reference here), eager
    kd-fused     + backend auto, the task's compiled dense part (train.compile) and a compiled teacher

and, per distilled variant, the teacher forward alone and the five MGD losses alone (forward + backward
on the step's own FPN levels), so that the overhead over the student can be read as teacher + losses.
On the CPU every variant is built first and timed round-robin (medians over rounds: the machine is shared).
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "coco", "retinanet_x101_r50_mgd.yaml")

# name -> (student, teacher, image (h, w) before padding, batch, extra model kwargs of both)
SHAPES: Dict[str, Tuple[str, str, Tuple[int, int], int, dict]] = {
    "gpu": ("retinanet_resnet50_fpn", "retinanet_resnext101_64x4d_fpn", (800, 1333), 2, {}),
    "cpu": ("retinanet_resnet18_fpn", "retinanet_resnet50_fpn", (320, 320), 2, {}),
    "tiny": ("retinanet_resnet18_fpn", "retinanet_resnet18_fpn", (64, 64), 2, {"fpn_channels": 32}),
}
# the variants run by default at each shape (on the CPU, compilation would take minutes)
DEFAULT_VARIANTS = {"gpu": ["student", "kd-ref", "kd-auto", "kd-fused"], "cpu": ["student", "kd-ref", "kd-auto"],
                    "tiny": ["student", "kd-ref", "kd-auto"]}
# name -> (distillation backend, compiled, with teacher)
VARIANTS: Dict[str, Tuple[str, bool, bool]] = {
    "student": ("auto", False, False),
    "kd-ref": ("reference", False, True),
    "kd-auto": ("auto", False, True),
    "kd-fused": ("auto", True, True),
}
COLUMNS = ["recipe", "step", "ms (median)", "ms p20-p80", "images/s", "student / this", "overhead vs student",
           "teacher fwd / student step", "MGD losses / this step"]


def config(shape: str, *, backend: str, compile: bool):
    """The recipe's Config with this shape's models, no checkpoints, and the variant's backend/compile."""
    from fastkd.config import build_config, load_yaml

    student, teacher, _, _, extra = SHAPES[shape]
    tree = load_yaml(CONFIG)
    tree["student"]["name"] = student
    tree["student"]["kwargs"] = {**{k: v for k, v in tree["student"]["kwargs"].items() if not k.startswith("init_")},
                                 **extra}
    tree["teacher"]["name"] = teacher
    tree["teacher"]["kwargs"] = {**tree["teacher"]["kwargs"], **extra}
    tree["teacher"]["checkpoint"] = "unused: random weights"  # required by the config; never loaded here
    tree["distill"]["backend"] = backend
    tree["train"]["compile"] = compile
    return build_config(tree, source=CONFIG)


def synthetic_batch(shape: str, device, dtype, *, channels_last: bool, seed: int = 0):
    """A DetectionBatch as ``task.to_device`` returns it: normalised images padded to multiples of 32
    (padding 0), 8 boxes per image in the unpadded image's pixels, labels 1..80, no crowd boxes."""
    from fastkd.data.detection.batch import DetectionBatch, ceil32

    _, _, (h, w), n, _ = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 3, ceil32(h), ceil32(w))
    images[:, :, :h, :w] = torch.randn(n, 3, h, w, generator=g)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, dtype).contiguous(memory_format=fmt)
    targets = []
    for i in range(n):
        k = 8
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = (0.05 + 0.25 * torch.rand(k, 2, generator=g)) * torch.tensor([w, h])
        boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w - 1.0, h - 1.0]))], 1)
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(1, 81, (k,), generator=g).to(device),
                        "iscrowd": torch.zeros(k, dtype=torch.uint8, device=device), "image_id": i,
                        "orig_size": (h, w), "size": (h, w), "scale": 1.0, "flipped": False})
    return DetectionBatch(images=images, targets=targets)


def build(shape: str, variant: str, batch, device, dtype):
    """(distiller, optimizer) as the trainer builds them (minus DeepSpeed): task models, checked pairs,
    the Distiller with the task, a compiled teacher when the variant compiles (train.compile_teacher)."""
    from fastkd.tasks.detection import DetectionTask

    backend, compile, with_teacher = VARIANTS[variant]
    cfg = config(shape, backend=backend, compile=compile)
    return build_distiller(DetectionTask(cfg), cfg, batch, device, dtype, backend=backend, compile=compile,
                           with_teacher=with_teacher)


def build_distiller(task, cfg, batch, device, dtype, *, backend: str, compile: bool, with_teacher: bool):
    """(distiller, optimizer) for any task: random-weight student (and teacher), the engine's start-up probe of
    both models' features on ``batch``, checked pairs, losses, the Distiller, a compiled teacher if compiling."""
    from fastkd.distill import Distiller, build_losses, check_pairs
    from fastkd.models.loading import freeze
    from fastkd.engine.schedules import build_optimizer

    torch.manual_seed(0)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    student = task.build_model(cfg.student, "student").to(device, dtype, memory_format=fmt)
    teacher, specs = None, []
    if with_teacher:
        teacher = freeze(task.build_model(cfg.teacher, "teacher")).to(device, dtype, memory_format=fmt)
        student.eval()
        s_feats = task.teacher_forward(student, batch, None)[1]  # the engine's start-up probe of the student
        student.train()
        specs = check_pairs(cfg.distill.pairs, s_feats, task.teacher_forward(teacher, batch, None)[1])
    distill_cfg = cfg.distill if with_teacher else type(cfg.distill)(backend=backend)
    losses = build_losses(specs, seed=0, backend=backend).to(device, dtype)
    distiller = Distiller(student, teacher, specs, losses, distill_cfg, task=task, compile=compile)
    if compile:
        object.__setattr__(distiller, "_teacher", torch.compile(teacher))
    return distiller, build_optimizer(distiller, cfg.optim)


def make_step(distiller, optimizer, batch) -> Callable[[], None]:
    """One optimizer step as the trainer's loop takes it (engine.backward/step replaced by torch's)."""
    def step():
        seeds = distiller.next_seeds()
        t_logits, t_feats = distiller.teacher_forward(batch)
        losses = distiller(batch, t_logits, t_feats, seeds, 0, 1.0)
        losses["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def make_losses_only(distiller, batch) -> Callable[[], None]:
    """The seeded (MGD) losses of every pair alone, forward + backward, on this step's own FPN levels."""
    _, t_feats = distiller.teacher_forward(batch)
    # the student's levels eagerly, as the engine's start-up probe takes them (no compiled graph for no-grad)
    s_feats = distiller.task.teacher_forward(distiller.student, batch, None)[1]
    pairs = [(distiller.losses[sp.key], s_feats[sp.cfg.student].detach().requires_grad_(), t_feats[sp.cfg.teacher])
             for sp in distiller.seeded]

    def losses():
        total = sum(mod(s, t, seed=mod.seeds.next(), sample_offset=0) for mod, s, t in pairs)
        total.backward()
        for _, s, _ in pairs:
            s.grad = None
    return losses


def round_robin(fns: Dict[str, Callable[[], None]], *, warmup: int, rep: int) -> Dict[str, Dict[str, float]]:
    """CPU timing of several functions interleaved (one run of each per round): medians and p20/p80 in ms."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rep):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        ts.sort()
        out[name] = {"ms": statistics.median(ts), "p20": ts[int(0.2 * (len(ts) - 1))],
                     "p80": ts[int(0.8 * (len(ts) - 1))]}
    return out


def variant_functions(build_fn: Callable, name: str, batch, *, warmup: int, loss_label: str) -> Dict[str, Callable]:
    """A variant's step (run ``warmup`` times, at least once: compilation, and backend auto's measured
    decision, happen there), and for a distilled one the teacher forward alone and the MGD losses alone.
    ``build_fn(name, batch)`` -> (distiller, optimizer)."""
    distiller, opt = build_fn(name, batch)
    step = make_step(distiller, opt, batch)
    for _ in range(max(1, warmup)):
        step()
    fns = {name: step}
    if distiller.teacher is not None:
        fns[f"teacher fwd of {name}"] = lambda: distiller.teacher_forward(batch)
        fns[f"{loss_label} of {name}"] = make_losses_only(distiller, batch)
    return fns


def measure(shape: str, variants: List[str], device, dtype, *, warmup: int, rep: int,
            report: Callable[[List[list]], None] = lambda rows: None) -> List[list]:
    """Rows of :data:`COLUMNS` for ``variants`` (``student`` first) at ``SHAPES[shape]``."""
    student, teacher, (h, w), n, extra = SHAPES[shape]
    recipe = f"{student.split('_')[1]} <- {teacher.split('_')[1]} {w}x{h}"
    recipe += "".join(f" {k} {v}" for k, v in extra.items())
    batch = synthetic_batch(shape, device, dtype, channels_last=device.type == "cuda")
    return run_variants(lambda name, b: build(shape, name, b, device, dtype), batch, variants, device,
                        recipe=recipe, n=n, loss_label="MGD losses P3-P7 fwd+bwd", warmup=warmup, rep=rep,
                        report=report)


def run_variants(build_fn: Callable, batch, variants: List[str], device, *, recipe: str, n: int, loss_label: str,
                 warmup: int, rep: int, report: Callable[[List[list]], None]) -> List[list]:
    """Time every variant (``student`` first) of one recipe -> rows of :data:`COLUMNS`.

    CUDA: one variant after the other (built, warmed up, timed, freed; ``report`` gets its rows at once, so
    a run stopped later keeps them). CPU: every variant built first, then all timed round-robin."""
    from benchmarks.common import bench

    kw = dict(warmup=warmup, loss_label=loss_label)
    if device.type != "cuda":
        fns: Dict[str, Callable] = {}
        for name in variants:
            fns.update(variant_functions(build_fn, name, batch, **kw))
        out = rows(recipe, n, variants, round_robin(fns, warmup=min(1, warmup), rep=rep), loss_label)
        report(out)
        return out
    times: Dict[str, Dict[str, float]] = {}
    out = []
    for name in variants:
        fns = variant_functions(build_fn, name, batch, **kw)
        times.update({k: bench(fn, device) for k, fn in fns.items()})
        del fns
        torch.cuda.empty_cache()
        new = rows(recipe, n, [name], times, loss_label)
        report(new)
        out += new
    return out


def rows(recipe: str, n: int, variants: List[str], times: Dict[str, Dict[str, float]], loss_label: str) -> List[list]:
    base = times["student"]["ms"]
    out = []
    for name in variants:
        ms = times[name]["ms"]
        teacher = times.get(f"teacher fwd of {name}")
        losses = times.get(f"{loss_label} of {name}")
        out.append([recipe, name, ms, f"{times[name]['p20']:.4g}-{times[name]['p80']:.4g}", n * 1e3 / ms,
                    f"{base / ms:.2f}x", f"{100 * (ms / base - 1):+.0f} %" if name != "student" else "",
                    f"{100 * teacher['ms'] / base:.0f} %" if teacher else "",
                    f"{100 * losses['ms'] / ms:.0f} %" if losses else ""])
        for label, t in (("teacher fwd", teacher), (loss_label, losses)):
            if t:
                out.append([recipe, f"{label} of {name}", t["ms"], f"{t['p20']:.4g}-{t['p80']:.4g}",
                            "", "", "", "", ""])
    return out


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's description."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def auto_decisions() -> str:
    """What backend ``auto`` chose for each MGD shape bucket of this run, with its trial's best times."""
    from fastkd.ops import _auto

    lines = []
    for key, d in sorted(_auto._decided.items()):
        ms = ", ".join(f"{k} {v:.1f} ms" for k, v in d.ms.items())
        lines.append(f"- `{key}`: {d.choice} ({d.source}{'; ' + ms if ms else ''})")
    return "\n".join(lines) or "- (no trial taken: one backend accepted these inputs, or FASTKD_AUTO_TRIAL=0)"
