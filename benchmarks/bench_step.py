"""Images/s of one training step at ImageNet shapes, synthetic data, through the engine's Distiller.

For each ImageNet recipe (configs/imagenet/*.yaml: R34->R18 MGD, R50->MobileNetV1 MGD, ...):

    student      student forward + CE + backward + SGD step (the no-distillation baseline)
    kd-ref       + teacher forward + the recipe's distillation losses, pure-PyTorch reference, eager
    kd-fused     + teacher forward + fused losses (backend auto), student+losses and teacher under torch.compile
    teacher-fwd  the teacher forward alone (eager and compiled), to explain the overhead

and reports the overhead of distillation over the student-only step and how much of it the teacher
forward explains. Targets (issue 9, H100): kd-fused >= 1.2x kd-ref images/s; kd-fused overhead over
student <= teacher-forward share + 15 %.

GPU (bf16, channels_last, batch 256, 224 px; the real measurement):
    python benchmarks/bench_step.py --out benchmarks/results/step_gpu.md
CPU smoke test (tiny shapes, fp32; checks the script, not a measurement):
    python benchmarks/bench_step.py --device cpu --tiny

Detection (``--task detection``, benchmarks/step_detection.py: RetinaNet, MGD on FPN P3-P7 as
configs/coco/retinanet_x101_r50_mgd.yaml, the detection task's forwards, synthetic DetectionBatch):
    python benchmarks/bench_step.py --task detection --out benchmarks/results/step_det_gpu.md
        # GPU: R50 <- X101-64x4d at 1333x800 (padded 1344x800), batch 2, bf16: student, kd-ref, kd-auto
        # (fused losses, eager), kd-fused (fused losses + the task's compiled dense part + compiled teacher)
    python benchmarks/bench_step.py --task detection --device cpu --out benchmarks/results/step_det_cpu.md
        # CPU: R18 <- R50 at 320x320, batch 2, fp32: student, kd-ref, kd-auto, timed round-robin
    python benchmarks/bench_step.py --task segmentation --out benchmarks/results/step_seg_gpu.md
        # PSPNet-R18 <- PSPNet-R101 at 512x512, batch 8, bf16, MGD on layer4 + the channel-wise logit loss
        # (benchmarks/step_segmentation.py); kd-fused: the Distiller's compiled forward + compiled teacher
Each distilled row comes with the teacher forward alone and the five MGD losses alone (forward + backward),
and their shares: of the student step (teacher) and of the row's own step (losses).

DeepSpeed is not used (the GPU machines may lack it): the optimizer is torch SGD over the student's and
the loss modules' parameters, as the engine's optimizer; DeepSpeed's bf16 optimizer additionally keeps
fp32 master weights (one more elementwise pass over the parameters per step, not timed here).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import bench, environment, peak_memory_bytes, write_results  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ("r34_r18_mgd", "r50_mbv1_mgd", "r50_mbv1_ct")


def build(recipe: str, *, backend: str, compile: bool, student_only: bool, device, dtype):
    """(distiller, optimizer) for a recipe, exactly as the engine builds them (minus DeepSpeed)."""
    from fastkd.config import load_config
    from fastkd.distill import Distiller, build_losses, check_pairs
    from fastkd.models.loading import build_model, freeze
    from fastkd.tasks.classification import ClassificationTask
    from fastkd.engine.schedules import build_optimizer

    cfg = load_config(os.path.join(REPO, "configs", "imagenet", f"{recipe}.yaml"),
                      [f"distill.backend={backend}"])
    torch.manual_seed(0)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    student = build_model(cfg.student, "student").to(device, dtype, memory_format=fmt)
    teacher = freeze(build_model(cfg.teacher, "teacher")).to(device, dtype, memory_format=fmt)
    probe = torch.randn(2, 3, 64, 64, device=device, dtype=dtype)
    with torch.no_grad():
        student.eval()
        s_feats = student(probe, features=True)[1]
        t_feats = teacher(probe, features=True)[1]
        student.train()
    specs = [] if student_only else check_pairs(cfg.distill.pairs, s_feats, t_feats)
    distill_cfg = cfg.distill if not student_only else type(cfg.distill)(backend=backend)
    losses = build_losses(specs, seed=0, backend=backend).to(device, dtype)
    for mod in losses.values():  # alpha: auto is calibrated by the engine; a fixed value times the same work
        if not isinstance(mod.alpha, float) or mod.alpha == 1.0:
            mod.alpha = 1e-4
    distiller = Distiller(student, teacher, specs, losses, distill_cfg, compile=compile,
                          task=ClassificationTask(label_smoothing=distill_cfg.label_smoothing))
    if compile:
        object.__setattr__(distiller, "_teacher", torch.compile(teacher))
    return distiller, build_optimizer(distiller, cfg.optim)


def make_step(distiller, optimizer, images, labels, *, with_teacher: bool) -> Callable[[], None]:
    """One optimizer step as the trainer's loop takes it (engine.backward/step replaced by torch's)."""
    def step():
        seeds = distiller.next_seeds()
        if with_teacher:
            t_logits, t_feats = distiller.teacher_forward(images)
        else:
            t_logits, t_feats = None, {}
        losses = distiller((images, labels), t_logits, t_feats, seeds, 0, 1.0)
        losses["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def measure(recipe: str, args, device, dtype) -> List[Dict[str, object]]:
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    images = torch.randn(args.batch, 3, args.size, args.size, device=device, dtype=dtype).contiguous(memory_format=fmt)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    kw = dict(warmup=args.warmup, rep=args.rep)
    variants = [("student", "auto", False, True), ("kd-ref", "reference", False, False)]
    if not args.no_compile:
        variants.append(("kd-fused", "auto", True, False))
    else:
        variants.append(("kd-fused-eager", "auto", False, False))
    rows, times = [], {}
    for name, backend, compile, student_only in variants:
        distiller, opt = build(recipe, backend=backend, compile=compile, student_only=student_only,
                               device=device, dtype=dtype)
        step = make_step(distiller, opt, images, labels, with_teacher=not student_only)
        step()  # first call: compilation, allocator warm-up
        t = bench(step, device, **kw)
        mem = peak_memory_bytes(step, device) if not args.no_memory else None
        times[name] = t["ms"]
        rows.append({"name": name, "ms": t, "mem": mem})
        if name != "student":  # the teacher forward alone, in this variant's mode (eager or compiled)
            teacher_step = lambda d=distiller: d.teacher_forward(images)  # noqa: E731
            teacher_step()
            tf = bench(teacher_step, device, **kw)
            times[f"teacher-{name}"] = tf["ms"]
            mode = "compiled" if compile else "eager"
            rows.append({"name": f"teacher fwd of {name} ({mode})", "ms": tf, "mem": None})
        del distiller, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = times["student"]
    out = []
    for r in rows:
        ms = r["ms"]["ms"]
        fused = r["name"].startswith("kd-fused")
        teacher_ms = times.get(f"teacher-{r['name']}")
        overhead = ms / base - 1 if r["name"].startswith("kd") else None
        out.append([recipe, r["name"], ms, f"{r['ms']['p20']:.4g}-{r['ms']['p80']:.4g}", args.batch * 1e3 / ms,
                    f"{base / ms:.2f}x" if not r["name"].startswith("teacher") else "",
                    f"{100 * overhead:+.0f} %" if overhead is not None else "",
                    f"{100 * teacher_ms / base:.0f} %" if teacher_ms is not None else "",
                    f"{100 * teacher_ms / (ms - base):.0f} %" if teacher_ms is not None and ms > base else "",
                    f"{r['mem'] / 2**20:.0f}" if r["mem"] is not None else "-"])
        if fused:
            ref = times["kd-ref"]
            share = times[f"teacher-{r['name']}"] / base
            speed_ok = ref / ms >= 1.2
            over_ok = overhead <= share + 0.15
            print(f"{recipe}: {r['name']} vs kd-ref {ref / ms:.2f}x "
                  f"(target >= 1.2x: {'met' if speed_ok else 'NOT met'}); "
                  f"overhead {100 * overhead:.0f} % vs teacher share {100 * share:.0f} % + 15 % "
                  f"({'met' if over_ok else 'NOT met'})", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("classification", "detection", "segmentation"), default="classification")
    p.add_argument("--dense-shape", choices=("gpu", "cpu", "tiny"), default=None,
                   help="detection/segmentation: models and image size (default: gpu on CUDA, cpu on the CPU, "
                        "tiny with --tiny)")
    p.add_argument("--recipes", nargs="+", choices=RECIPES, default=["r34_r18_mgd", "r50_mbv1_mgd"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default 256 (--tiny: 4)")
    p.add_argument("--size", type=int, default=None, help="image side, default 224 (--tiny: 64)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: batch 4, 64 px, 2 repetitions")
    p.add_argument("--no-compile", action="store_true", help="time the fused losses eagerly instead of compiled")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--warmup", type=int, default=None, help="CPU warm-up runs, default 3 (--tiny: 2)")
    p.add_argument("--rep", type=int, default=None, help="CPU timed runs, default 10 (--tiny: 3)")
    p.add_argument("--out", default=None, help="append the table to this results file (markdown)")
    args = p.parse_args()
    for key, full, tiny in (("batch", 256, 4), ("size", 224, 64), ("warmup", 3, 2), ("rep", 10, 3)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    if args.tiny:
        print("bench_step --tiny: a smoke test of the script; its timings and targets mean nothing", flush=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_step: no CUDA device; use --device cpu --tiny for a smoke test", file=sys.stderr)
        return 2
    auto = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype, auto)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.task != "classification":
        return dense(args, device, dtype)
    rows = []
    for recipe in args.recipes:
        rows += measure(recipe, args, device, dtype)
    cols = ["recipe", "step", "ms (median)", "ms p20-p80", "images/s", "student / this", "overhead vs student",
            "teacher fwd / student step", "overhead explained by teacher fwd", "peak MiB"]
    env = environment(device)
    title = f"Training step, batch {args.batch}, {args.size} px, {str(dtype).split('.')[-1]}"
    command = "python benchmarks/bench_step.py " + " ".join(sys.argv[1:])
    from common import markdown_table
    print(f"\n{title}\n" + ", ".join(f"{k} {v}" for k, v in env.items()) + "\n\n" + markdown_table(cols, rows))
    if args.out:
        write_results(args.out, title, cols, rows, env, command)
    return 0


def dense(args, device, dtype) -> int:
    """``--task detection|segmentation``: the table of step_detection / step_segmentation.measure, printed and
    optionally appended to --out (with the CPU model, the load average before and after, auto's decisions)."""
    import step_detection
    import step_segmentation
    from common import markdown_table

    module = step_detection if args.task == "detection" else step_segmentation
    shape = args.dense_shape or ("tiny" if args.tiny else "gpu" if device.type == "cuda" else "cpu")
    load_before = os.getloadavg()
    rows = module.measure(shape, module.DEFAULT_VARIANTS[shape], device, dtype, warmup=1, rep=args.rep)
    env = environment(device)
    if device.type == "cpu":
        env["cpu"] = step_detection.cpu_model()
        env["load average (1/5/15 min) before"] = "/".join(f"{x:.2f}" for x in load_before)
        env["after"] = "/".join(f"{x:.2f}" for x in os.getloadavg())
    notes = "backend auto's decisions (fastkd.ops._auto; the first kd-auto/kd-fused step took them):\n" + \
        step_detection.auto_decisions()
    losses = "MGD on P3-P7" if args.task == "detection" else "MGD on layer4 + channel-wise logit KD"
    title = f"{args.task.capitalize()} training step, {rows[0][0]}, batch {module.SHAPES[shape][3]}, " \
            f"{str(dtype).split('.')[-1]}, {losses}"
    cols = step_detection.COLUMNS
    print(f"\n{title}\n" + ", ".join(f"{k} {v}" for k, v in env.items()) + "\n\n" + markdown_table(cols, rows)
          + "\n\n" + notes)
    if args.out:
        write_results(args.out, title, cols, rows, env, "python benchmarks/bench_step.py " + " ".join(sys.argv[1:]),
                      notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
