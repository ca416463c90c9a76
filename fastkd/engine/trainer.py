"""The training loop on DeepSpeed. Pieces are built by the functions below; ``Trainer.fit`` reads top to bottom.

Host-device syncs are marked ``# sync``; places where distributed state matters ``# dist``.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import sys
import time
from typing import Dict, List

import torch
from torch import nn

from ..comm import all_reduce_max, all_reduce_mean, all_reduce_sum
from ..config import Config, ConfigError, to_dict
from ..distill import Distiller, build_losses, check_pairs
from ..errors import NonFiniteLossError
from ..models.loading import maybe_load_student
from ..resources import locate
from ..tasks import Task, build_task
from . import checkpoint as ckpt
from . import guard, preflight, resume
from .data import loader_state, restore_loader, sample_offset
from .dist import DistContext, averaged_norm_buffers, norm_buffers
from .metrics import MetricsLogger
from .schedules import build_optimizer, build_scheduler

# ---------------------------------------------------------------------------------------------------------
# Building the pieces


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def micro_batch(cfg: Config, world: int) -> int:
    per_step = world * cfg.train.grad_accum
    if cfg.train.batch_size % per_step:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} is not divisible by processes ({world}) x "
                          f"grad_accum ({cfg.train.grad_accum})")
    return cfg.train.batch_size // per_step


def build_distiller(cfg: Config, ctx: DistContext, task: Task, probe) -> Distiller:
    """Student + teacher + one loss module per pair, after checking the pairs on a real batch (on the device)."""
    torch.manual_seed(cfg.seed)  # same student initialisation on every rank
    student = task.build_model(cfg.student, "student")
    maybe_load_student(student, cfg.student)
    if cfg.train.sync_bn and ctx.world_size > 1:
        if ctx.device.type != "cuda":
            raise ConfigError("train.sync_bn needs GPUs (SyncBatchNorm does not run on the CPU); set it to false")
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    student = student.to(ctx.device)
    if cfg.train.channels_last and ctx.device.type == "cuda":
        student = student.to(memory_format=torch.channels_last)
    if cfg.teacher is None:
        return Distiller(student, None, [], nn.ModuleDict(), cfg.distill, task=task, compile=cfg.train.compile)
    teacher = task.load_teacher(cfg.teacher, ctx.device)
    was = student.training
    student.eval()  # the probe must not touch BatchNorm running statistics
    _, s_feats = task.teacher_forward(student, probe, None)
    _, t_feats = task.teacher_forward(teacher, probe, None)
    student.train(was)
    specs = check_pairs(cfg.distill.pairs, s_feats, t_feats)
    losses = build_losses(specs, seed=cfg.seed, backend=cfg.distill.backend).to(ctx.device)
    distiller = Distiller(student, teacher, specs, losses, cfg.distill, task=task, compile=cfg.train.compile)
    if cfg.train.compile and cfg.train.compile_teacher and teacher is not None:
        object.__setattr__(distiller, "_teacher", torch.compile(teacher))
    return distiller


def deepspeed_config(cfg: Config, *, micro: int, dtype: torch.dtype) -> dict:
    path = locate(cfg.deepspeed.config)  # configs/deepspeed/...: the presets fastkd ships
    if not os.path.isfile(path):
        raise ConfigError(f"deepspeed.config: preset not found: {cfg.deepspeed.config}")
    with open(path) as f:
        ds = json.load(f)
    _merge(ds, copy.deepcopy(cfg.deepspeed.overrides))
    ds.update(train_batch_size=cfg.train.batch_size, train_micro_batch_size_per_gpu=micro,
              gradient_accumulation_steps=cfg.train.grad_accum, gradient_clipping=cfg.train.grad_clip,
              steps_per_print=10**9, zero_allow_untested_optimizer=True)
    ds["bf16"] = {"enabled": dtype == torch.bfloat16}
    ds.pop("fp16", None)
    if cfg.deepspeed.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = cfg.deepspeed.zero_stage
    return ds


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def calibration_batches(loader, cfg: Config, ctx: DistContext, micro: int, to_device):
    """The first ``calibration_batches`` global batches, as (batch on the device, sample_offset) of this rank."""
    n = cfg.distill.calibration_batches * cfg.train.grad_accum
    for i, batch in enumerate(loader):
        if i >= n:
            break
        yield to_device(batch), sample_offset(i % cfg.train.grad_accum, ctx.rank, ctx.world_size, micro)


# ---------------------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: Config, ctx: DistContext):
        import deepspeed

        self.cfg, self.ctx = cfg, ctx
        self.resume_from = ckpt.resolve_resume(cfg.train.resume, cfg.run_dir, warn=self._message)
        self.resume_notes = resume.review_checkpoint(cfg, self.resume_from, ctx.world_size)  # before set-up
        self.micro = micro_batch(cfg, ctx.world_size)
        self.gas = cfg.train.grad_accum
        self.dtype = compute_dtype(cfg, ctx.device)
        self.channels_last = cfg.train.channels_last and ctx.device.type == "cuda"
        self.task = build_task(cfg)
        self.train_loader, self.val_loader = self.task.build_loaders(
            micro=self.micro, grad_accum=self.gas, rank=ctx.rank, world=ctx.world_size, seed=cfg.seed,
            device=ctx.device, dtype=self.dtype, channels_last=self.channels_last)
        self.steps_per_epoch = len(self.train_loader) // self.gas
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        resume.check_not_past_end(self.resume_from, self.total_steps, cfg)
        self.distiller = build_distiller(cfg, ctx, self.task, self._to_device(next(iter(self.train_loader))))
        self.alphas = {} if self.resume_from else self._calibrate()
        optimizer = build_optimizer(self.distiller, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.schedule, total_steps=self.total_steps,
                                    steps_per_epoch=self.steps_per_epoch, base_lr=cfg.optim.lr)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.distiller, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(cfg, micro=self.micro, dtype=self.dtype), mpu=ctx.groups)
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        if self.resume_from:
            self._restore(*self.resume_from)
        self.log = MetricsLogger(cfg.run_dir, enabled=ctx.is_main, progress=cfg.train.progress,
                                 total_steps=self.total_steps, initial_step=self.step)
        self.stop_requested = False

    # -- start-up ------------------------------------------------------------------------------------------
    def _to_device(self, batch):
        return self.task.to_device(batch, self.ctx.device, self.dtype, self.channels_last)

    def _calibrate(self) -> Dict[str, float]:
        self.train_loader.set_epoch(0) if hasattr(self.train_loader, "set_epoch") else None
        student = self.distiller.student
        buffers = {k: v.clone() for k, v in student.state_dict().items()}  # keep BN statistics untouched
        batches = calibration_batches(self.train_loader, self.cfg, self.ctx, self.micro, self._to_device)
        chosen = self.distiller.calibrate(self.cfg.distill, batches, all_reduce_mean, self.ctx.device)
        student.load_state_dict(buffers)
        return chosen

    def _restore(self, root: str, tag: str) -> None:
        client, rank_state = ckpt.load(self.engine, root, tag, self.ctx.rank)
        self.step, self.epoch, self.step_in_epoch = client["step"], client["epoch"], client["step_in_epoch"]
        self.loader_resume = rank_state.get("loader")
        own = norm_buffers(self.distiller.student)
        for k, v in rank_state.get("norm_buffers", {}).items():  # this rank's own BatchNorm statistics
            own[k].copy_(v)
        if self.step_in_epoch >= self.steps_per_epoch:  # saved at the end of an epoch
            self.epoch, self.step_in_epoch, self.loader_resume = self.epoch + 1, 0, None
        self._message(f"resumed from {os.path.join(root, tag)} at step {self.step} (epoch {self.epoch})")
        for note in resume.after_load(self.cfg, self.engine, client, self.resume_notes, self.ctx.world_size):
            self._message(f"resume: {note}")
        for name, old, new in self.distiller.apply_explicit_alphas(self.cfg.distill):
            self._message(f"alpha of {name}: the config's {new:.4g} replaces the checkpoint's {old:.4g}")

    def _message(self, text: str) -> None:
        if getattr(self, "log", None) is not None:
            self.log.message(f"[fastkd] {text}")
        elif self.ctx.is_main:
            print(f"[fastkd] {text}", file=sys.stderr, flush=True)

    def _eval(self, model: nn.Module) -> Dict[str, float]:
        was = model.training
        model.eval()
        result = self.task.evaluate(model, self.val_loader, self.ctx.device, self.dtype)  # dist: every rank, same result
        model.train(was)
        return result

    def _save(self) -> None:
        client = {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                  "alphas": self.distiller.alphas(), "world_size": self.ctx.world_size,
                  "global_batch": self.cfg.train.batch_size, "config": to_dict(self.cfg)}
        student = self.distiller.student
        rank_state = {"loader": loader_state(self.train_loader),
                      "norm_buffers": {k: v.clone() for k, v in norm_buffers(student).items()}}
        with averaged_norm_buffers(student):  # dist: the checkpoint holds one model
            path = ckpt.save(self.engine, self.cfg.run_dir, self.step, client, rank_state, rank=self.ctx.rank,
                             keep_last=self.cfg.train.keep_last)
        self.saved = (self.step, getattr(self, "good_peak", None))  # for the stop message
        self._message(f"checkpoint {path}")

    # -- the loop ------------------------------------------------------------------------------------------
    def fit(self) -> Dict[str, float]:
        cfg, ctx = self.cfg, self.ctx
        if ctx.is_main:
            resume.write_attempt_config(cfg, self.step)
        for name, value in self.alphas.items():
            self._message(f"alpha: auto for {name} -> {value:.4g}")
            self.log.log(self.step, {f"alpha/{name}": value}, kind="calibration")
        if cfg.train.eval_teacher and self.distiller.teacher is not None:
            acc = self._eval(self.distiller.teacher)
            self._message(f"teacher val {self.task.describe(acc)}")
            self.log.log(self.step, {f"teacher/{k}": v for k, v in acc.items()}, kind="teacher")
        if self.step >= self.total_steps:
            self._message(f"the run already ended at step {self.step} (its length: {self.total_steps} steps): "
                          "nothing to train")
        old_handlers = self._install_signal_handlers()
        try:
            result = self._loop()
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            self.log.close()
        return result

    def _loop(self) -> Dict[str, float]:
        cfg, ctx, engine, distiller = self.cfg, self.ctx, self.engine, self.distiller
        names = distiller.loss_names() + ["total"]
        acc = torch.zeros(len(names), dtype=torch.float64, device=ctx.device)  # loss sums since the last log
        logged_steps, t_log = 0, time.time()
        result: Dict[str, float] = {}
        session_end = self.step + cfg.train.session_steps if cfg.train.session_steps else None
        engine.train()
        while self.step < self.total_steps:
            skip = restore_loader(self.train_loader, getattr(self, "loader_resume", None), self.epoch)
            self.loader_resume = None
            if self.step_in_epoch and skip == 0 and not hasattr(self.train_loader, "load_state_dict"):
                skip = self.step_in_epoch * self.gas
            for i, batch in enumerate(self.train_loader):
                if i < skip:  # a loader that cannot seek: fast-forward to the saved position
                    continue
                m = i % self.gas  # micro-step within the optimizer step (positions are step-aligned)
                if m == 0:
                    seeds = distiller.next_seeds()  # host ints, outside the compiled region
                batch = self._to_device(batch)
                t_logits, t_feats = distiller.teacher_forward(batch)
                losses = engine(batch, t_logits, t_feats, seeds, sample_offset(m, ctx.rank, ctx.world_size, self.micro),
                                self.task.batch_size(batch) / self.micro)
                engine.backward(losses["total"])
                micro_losses = torch.stack([losses[k].detach().double() for k in names])
                step_losses = micro_losses if m == 0 else step_losses + micro_losses
                engine.step()  # DeepSpeed steps the optimizer and scheduler at the accumulation boundary only
                if m != self.gas - 1:
                    continue
                self._check_step(step_losses, names)  # sync + dist: once per optimizer step, after it
                acc += step_losses
                self.step += 1
                self.step_in_epoch += 1
                logged_steps += 1
                self.log.advance()
                if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                    result = self._log_train(names, acc, logged_steps, t_log)
                    acc.zero_()
                    logged_steps, t_log = 0, time.time()
                mid_epoch = self.step_in_epoch < self.steps_per_epoch and self.step < self.total_steps
                if cfg.train.eval_every_steps and self.step % cfg.train.eval_every_steps == 0 and mid_epoch:
                    result.update(self._log_eval())  # sync + dist: every rank evaluates
                if self.stop_requested or self.step == session_end:
                    if self.step < self.total_steps:
                        self._save()
                        why = "by signal" if self.stop_requested else "after train.session_steps"
                        self._message(f"stopped {why} at step {self.step}; resume continues from the checkpoint")
                        return result
                if cfg.train.ckpt_every and self.step % cfg.train.ckpt_every == 0:
                    self._save()
                if self.step >= self.total_steps:
                    break
            epoch_done = self.step_in_epoch >= self.steps_per_epoch
            if epoch_done:
                self.epoch += 1
                self.step_in_epoch = 0
            last = self.step >= self.total_steps
            if epoch_done and (last or (cfg.train.eval_every and self.epoch % cfg.train.eval_every == 0)):
                result.update(self._log_eval())
            elif last:
                result.update(self._log_eval())
            saved = cfg.train.ckpt_every and self.step % cfg.train.ckpt_every == 0  # in the loop above
            if (last or (epoch_done and not cfg.train.ckpt_every)) and not saved:
                self._save()  # the end of the run; epoch ends only without train.ckpt_every
        return result

    def _check_step(self, step_losses: torch.Tensor, names: List[str]) -> None:
        """Stop on a non-finite loss, or on weights/optimizer state the optimizer step made non-finite, before
        anything is checkpointed (the last checkpoint stays good); also carries the preemption flag so every
        rank agrees to stop at the same step."""
        state, weight_peak = guard.state_check(self.engine, self.distiller, step_losses.device)  # this rank's share
        flags = torch.cat([(~torch.isfinite(step_losses)).double(), state.view(1),
                           torch.tensor([float(self.stop_requested)], dtype=torch.float64, device=step_losses.device)])
        flags = all_reduce_sum(flags).tolist()  # sync + dist
        self.stop_requested = flags[-1] > 0
        bad = [n for n, f in zip(names, flags[:-2]) if f > 0 and n != "total"] or (["total"] if flags[-3] else [])
        if bad:
            raise NonFiniteLossError(f"non-finite loss at step {self.step + 1} (epoch {self.epoch}) in term(s): "
                                     f"{', '.join(bad)}; {self._kept()}")
        if flags[-2]:
            raise NonFiniteLossError(
                f"non-finite weights or optimizer state after the optimizer step of step {self.step + 1} (epoch "
                f"{self.epoch}), with a finite loss: the update overflowed (lower optim.lr or the alphas, or set "
                f"train.grad_clip); {self._kept()}")
        self.good_peak = weight_peak  # max |weight| after this (good) step, this rank's share; no sync

    def _kept(self) -> str:
        """What the stop message says of the last good state: where the checkpoint is, and how large the
        weights of the last good step and of that checkpoint were (finite can still be absurd)."""
        where = os.path.join(self.cfg.run_dir, ckpt.SUBDIR)
        saved_step, saved_peak = getattr(self, "saved", None) or (None, None)
        peaks = [p for p in (getattr(self, "good_peak", None), saved_peak) if p is not None]
        if not peaks:
            return f"it is not checkpointed; the last good checkpoint is kept in {where}"
        peaks = all_reduce_max(torch.stack(peaks)).tolist()  # sync + dist: every rank stops here together
        lr = self.engine.get_lr()[0]
        if saved_step == self.step or getattr(self, "good_peak", None) is None:
            sizes = f"its weights (step {saved_step}) reach |w| = {peaks[-1]:.3g}, lr {lr:.3g}"
        else:
            sizes = (f"the last good step ({self.step}) left weights up to |w| = {peaks[0]:.3g}, lr {lr:.3g}"
                     + (f"; the checkpoint (step {saved_step}): |w| up to {peaks[1]:.3g}" if len(peaks) > 1 else ""))
        return (f"it is not checkpointed; the last good checkpoint is kept in {where} ({sizes}: make sure they "
                "are sane before resuming from it)")

    def _log_train(self, names, acc, steps, t0) -> Dict[str, float]:
        world = self.ctx.world_size
        means = (all_reduce_sum(acc) / (world * self.gas * steps)).tolist()  # sync + dist
        elapsed = max(time.time() - t0, 1e-9)
        rec = {f"loss/{n}": v for n, v in zip(names, means)}
        rec.update(lr=self.engine.get_lr()[0], epoch=self.epoch,
                   images_per_s=steps * self.cfg.train.batch_size / elapsed)
        self.log.log(self.step, rec)
        return rec

    def _log_eval(self) -> Dict[str, float]:
        with averaged_norm_buffers(self.distiller.student):  # dist: every rank evaluates the same model
            acc = self._eval(self.distiller.student)
        self._message(f"step {self.step} epoch {self.epoch}: val {self.task.describe(acc)}")
        self.log.log(self.step, {**{f"val/{k}": v for k, v in acc.items()}, "epoch": self.epoch}, kind="eval")
        return {f"val/{k}": v for k, v in acc.items()}

    def _install_signal_handlers(self) -> dict:
        """SIGTERM/SIGINT (preemption): finish the current step, write a checkpoint, exit cleanly."""
        def request_stop(signum, frame):
            self.stop_requested = True
        old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                old[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread
                pass
        return old


def train(cfg: Config) -> Dict[str, float]:
    """Entry point of ``fastkd train`` in every process."""
    from .dist import setup
    preflight.check(cfg)  # bad run_dir or data file: one message before any expensive set-up
    ctx = setup(cfg.train.dist_timeout_s)
    return Trainer(cfg, ctx).fit()
