"""``fastkd train | eval | export | plot | data | bench``.

    fastkd train configs/demo/mgd.yaml optim.lr=0.2 distill.pairs.0.alpha=1e-5
    deepspeed --num_gpus 8 --module fastkd.cli train cfg.yaml          (or: deepspeed $(which fastkd) train ...)
    fastkd eval cfg.yaml --weights runs/x/student.pt [KEY=VALUE ...]   (overrides before or after the options)
    fastkd export runs/x --out student.pt
    fastkd plot runs/x
    fastkd convert mmseg CKPT OUT [--model pspnet_r101]   (mmsegmentation checkpoint -> native keys)
    fastkd convert backbone SRC OUT [--model pspnet_r18]  (ImageNet ResNet: v1c / mmpretrain / torchvision layout)
    fastkd convert mmdet CKPT OUT                         (mmdetection ResNet/ResNeXt + FPN -> torchvision keys)
    fastkd demo [cls|det|seg] [--device cuda] [KEY=VALUE ...]   (the demos, fastkd/demos/)

A user mistake (bad config, missing file, unpairable features, NaN loss) ends with one clear message
and a nonzero exit status, without a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from typing import List, Optional

from .errors import EXIT_NONFINITE, EXIT_PEER_FAILED, EXIT_USER_ERROR, ConfigError, NonFiniteLossError, PeerFailure


def _quiet_deepspeed() -> None:
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.utils import logger
        logger.setLevel(logging.WARNING)
    except ImportError:
        pass


def cmd_train(args) -> int:
    from .config import load_config
    from .engine.preflight import check
    cfg = load_config(args.config, args.overrides)
    check(cfg)  # a bad run_dir or data file ends here, before torch, DeepSpeed and the models load
    _quiet_deepspeed()
    from .engine.trainer import train
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0 and result:
        print(" ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)))
    return 0


def cmd_eval(args) -> int:
    import torch
    from .config import load_config
    from .models.loading import load_state_dict_file, load_strict
    from .engine.dist import setup
    from .engine.export import student_state_dict
    from .engine.preflight import check_data
    from .tasks import build_task

    cfg = load_config(args.config, args.overrides)
    check_data(cfg)  # a bad data file or missing ground truth ends here
    _quiet_deepspeed()
    ctx = setup(cfg.train.dist_timeout_s)
    if args.teacher and cfg.teacher is None:
        raise ConfigError(f"--teacher: {args.config} has no teacher")
    which = cfg.teacher if args.teacher else cfg.student
    task = build_task(cfg)
    model = task.build_model(which, "teacher" if args.teacher else "student")
    if args.teacher:
        src = which.checkpoint
        state = load_state_dict_file(src, "teacher")
    elif args.weights and os.path.isdir(args.weights):
        src, state = args.weights, student_state_dict(args.weights)
    elif args.weights:
        src, state = args.weights, load_state_dict_file(args.weights, "student")
    else:
        if not os.path.isdir(cfg.run_dir):
            raise ConfigError(f"no --weights given and run_dir {cfg.run_dir} does not exist")
        src, state = cfg.run_dir, student_state_dict(cfg.run_dir)
    load_strict(model, state, src, "teacher" if args.teacher else "student")
    model = model.to(ctx.device).eval()
    micro = max(1, cfg.train.batch_size // (ctx.world_size * cfg.train.grad_accum))
    _, val = task.build_loaders(micro=micro, grad_accum=1, rank=ctx.rank, world=ctx.world_size, seed=cfg.seed,
                                device=ctx.device, dtype=torch.float32, channels_last=False)
    metrics = task.evaluate(model, val, ctx.device, torch.float32)
    if ctx.is_main:
        print(f"{src}: {task.report(metrics)}")
    return 0


def cmd_export(args) -> int:
    from .engine.export import export_student
    state = export_student(args.run_dir, args.out, args.tag)
    n = sum(v.numel() for v in state.values() if v.is_floating_point())
    print(f"wrote {args.out}: student state_dict, {len(state)} tensors, {n:,} values")
    return 0


def cmd_plot(args) -> int:
    from .engine.plot import plot_run
    print(plot_run(args.run_dir, args.out))
    return 0


def cmd_bench(args) -> int:
    from .resources import checkout_root
    root = checkout_root()
    folder = os.path.join(root, "benchmarks") if root else None
    if folder is None or not os.path.isdir(folder):
        raise ConfigError("fastkd bench runs the benchmarks of a source checkout (benchmarks/bench_NAME.py), and this "
                          f"fastkd ({os.path.dirname(os.path.abspath(__file__))}) is installed without them: run it "
                          "from a clone of the repository")
    script = os.path.join(folder, f"bench_{args.name}.py")
    if not os.path.isfile(script):
        names = sorted(f[6:-3] for f in os.listdir(folder) if f.startswith("bench_") and f.endswith(".py"))
        raise ConfigError(f"no benchmark {args.name!r} (available: {', '.join(names) or 'none'})")
    return subprocess.call([sys.executable, script, *args.rest])


def cmd_convert_mmseg(args) -> int:
    from .tasks.segmentation.convert_mmseg import convert_checkpoint
    try:
        state = convert_checkpoint(args.checkpoint, args.out, model=args.model, num_classes=args.num_classes,
                                   force=args.force)
    except (ValueError, FileExistsError) as exc:  # ConversionError, an unknown --model
        raise ConfigError(str(exc)) from None
    n = sum(v.numel() for v in state.values() if v.is_floating_point())
    print(f"wrote {args.out}: {len(state)} tensors, {n:,} values")
    return 0


def cmd_convert_backbone(args) -> int:
    from .tasks.segmentation.backbone_init import LAYOUTS, convert_file
    try:
        _, loaded = convert_file(args.checkpoint, args.out, layout=args.layout, model=args.model,
                                 num_classes=args.num_classes, force=args.force)
    except (ValueError, FileExistsError) as exc:  # an unknown --model, an existing OUT
        raise ConfigError(str(exc)) from None
    ignored = f"; ignored: {', '.join(loaded.ignored)}" if loaded.ignored else ""
    checked = f"; fits {args.model}" if args.model else ""
    print(f"wrote {args.out}: {loaded.count} backbone tensors from {args.checkpoint} "
          f"(layout: {LAYOUTS[loaded.layout]}){checked}{ignored}")
    return 0


def cmd_convert_mmdet(args) -> int:
    from .tasks.detection.convert_mmdet import convert_file
    conv = convert_file(args.checkpoint, args.out)
    print(f"{args.out}: {conv.describe()}")
    return 0


def cmd_demo(args) -> int:
    from .demos import main as demo_main
    return demo_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastkd", description="fast feature knowledge distillation")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a student (plain process or under the deepspeed launcher)")
    t.add_argument("config", help="YAML config")
    t.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. optim.lr=0.2")
    t.set_defaults(func=cmd_train)

    what = ("evaluate a student (or the teacher) on the whole validation set: the task's metrics (top-1/top-5, "
            "COCO box AP, mIoU with IoU per class)")
    e = sub.add_parser("eval", help=what, description=what)
    e.add_argument("config", help="YAML config")
    e.add_argument("overrides", nargs="*", help="key.path=value overrides, before or after the options, e.g. "
                                                "data.kwargs.val_batch_size=4")
    e.add_argument("--weights", help="exported student.pt or a run directory (default: the config's run_dir)")
    e.add_argument("--teacher", action="store_true", help="evaluate the teacher checkpoint instead")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="write the student alone (strict-loadable state_dict)")
    x.add_argument("run_dir")
    x.add_argument("--out", required=True)
    x.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
    x.set_defaults(func=cmd_export)

    pl = sub.add_parser("plot", help="render metrics.jsonl curves to PNG")
    pl.add_argument("run_dir")
    pl.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png)")
    pl.set_defaults(func=cmd_plot)

    b = sub.add_parser("bench", help="run benchmarks/bench_NAME.py")
    b.add_argument("name")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)

    dm = sub.add_parser("demo", add_help=False, prefix_chars="+",  # every option goes to fastkd.demos
                        help="[cls|det|seg]: a teacher, then students distilled several ways, one table "
                             "(Fashion-MNIST classification, the default; fashion-scenes detection or "
                             "segmentation; fastkd demo det --help)")
    dm.add_argument("rest", nargs=argparse.REMAINDER)
    dm.set_defaults(func=cmd_demo)

    convert = sub.add_parser("convert", help="convert foreign checkpoints to fastkd's layouts")
    kinds = convert.add_subparsers(dest="convert_kind", required=True)
    c = kinds.add_parser("mmseg", help="mmsegmentation PSPNet / DeepLabV3 (ResNet-V1c) -> native segmentation model")
    c.add_argument("checkpoint", help="mmseg .pth file")
    c.add_argument("out", help="output state_dict file")
    c.add_argument("--model", default=None, help="check by loading strictly into this model (e.g. pspnet_r101)")
    c.add_argument("--num-classes", type=int, default=19, help="classes of --model (default 19, Cityscapes)")
    c.add_argument("--force", action="store_true", help="overwrite OUT")
    c.set_defaults(func=cmd_convert_mmseg)
    c = kinds.add_parser("backbone", help="ImageNet ResNet backbone (open-mmlab v1c, mmpretrain or torchvision "
                                          "layout) -> the file segmentation's init_backbone reads")
    c.add_argument("checkpoint", help="ImageNet checkpoint (.pth), e.g. resnet18_v1c-b5776b93.pth")
    c.add_argument("out", help="output state_dict file")
    c.add_argument("--layout", choices=["v1c", "mmpretrain", "torchvision"], default=None,
                   help="the layout SRC must be in (default: recognised from its stem keys)")
    c.add_argument("--model", default=None, help="check by loading into this model's backbone (e.g. pspnet_r18)")
    c.add_argument("--num-classes", type=int, default=19, help="classes of --model (default 19, Cityscapes)")
    c.add_argument("--force", action="store_true", help="overwrite OUT")
    c.set_defaults(func=cmd_convert_backbone)
    c = kinds.add_parser("mmdet", help="mmdetection ResNet/ResNeXt + FPN (+ DCN, RetinaNet head) -> torchvision layout")
    c.add_argument("checkpoint", help="mmdetection .pth")
    c.add_argument("out", help="output state_dict (.pt)")
    c.set_defaults(func=cmd_convert_mmdet)

    try:
        from .data import cli as data_cli
    except Exception:  # fastkd.data is optional here: a broken or absent data CLI must not break training
        data_cli = None
    if data_cli is not None and hasattr(data_cli, "add_parser"):
        data_cli.add_parser(sub)
    return p


def parse_args(parser: argparse.ArgumentParser, argv: List[str]) -> argparse.Namespace:
    """``parse_args``, except that KEY=VALUE overrides of ``train`` / ``eval`` may also follow the options
    (argparse ends a positional list at the first option: ``eval CFG --weights W a=b`` would be refused)."""
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    # torch logs "No CUDA runtime is found, using CUDA_HOME=..." when DeepSpeed imports its extension
    # builder on a machine without CUDA: noise before every message, and nothing fastkd builds that way
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher appends it
    args = parse_args(build_parser(), argv)
    rank = int(os.environ.get("RANK", "0"))
    prefix = f"fastkd: error{f' [rank {rank}]' if rank else ''}: "
    comm_failed = False
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError) as exc:
        _fail(prefix + str(exc))
        return EXIT_USER_ERROR
    except Exception as exc:
        if isinstance(exc, NonFiniteLossError):
            _fail(prefix + str(exc))
            return EXIT_NONFINITE
        if isinstance(exc, PeerFailure):  # the process group did not form: nothing to tear down
            print(prefix + str(exc), file=sys.stderr, flush=True)
            return EXIT_PEER_FAILED
        line = _peer_failure(exc)
        if line is None:
            _fail(f"{type(exc).__name__}: {exc}", print_it=False)
            raise
        comm_failed = True
        if line:
            print(prefix + line, file=sys.stderr, flush=True)
        return EXIT_PEER_FAILED
    finally:
        try:
            from .engine.dist import teardown
            if not comm_failed:
                teardown()
        except ImportError:
            pass
        if comm_failed:  # a broken group hangs in its destructors, and a store call to a stopped rank 0 never
            sys.stdout.flush()  # returns: end the process here, with the status a peer failure has
            sys.stderr.flush()
            os._exit(EXIT_PEER_FAILED)


def _fail(text: str, print_it: bool = True) -> None:
    """Print a failure of this process, and record it so the other processes can name it."""
    if print_it:
        print(text, file=sys.stderr, flush=True)
    if "torch" in sys.modules:
        from .engine.dist import record_own_failure
        record_own_failure(text.split("error: ", 1)[-1])


def _peer_failure(exc: Exception) -> Optional[str]:
    """For a collective that failed because another process did: the line to print ("" for none, when
    another surviving process prints it); None for any other error."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist
    from .engine.dist import explain_comm_failure, is_comm_error
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and is_comm_error(exc)):
        return None
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher terminates the group as soon as one rank
    return explain_comm_failure() or ""          # exits; finish these few seconds (it SIGKILLs after 30 s)


if __name__ == "__main__":
    sys.exit(main())
