"""The Distiller: student + its distillation modules; the frozen teacher rides along outside the module tree.

One step (DESIGN.md "Data flow"):

    batch = task.to_device(batch, ...)                             # the task's batch (fastkd.tasks)
    t_logits, t_feats = distiller.teacher_forward(batch)           # eval, no grad
    seeds = distiller.next_seeds()                                 # host ints, outside torch.compile
    losses = engine(batch, t_logits, t_feats, seeds, sample_offset, scale)
    total = losses["total"]                                        # sum of the named terms

Only the student and the loss modules are parameters of the Distiller, so DeepSpeed, the optimizer and
the checkpoints never see the teacher.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..config import FLOAT32_MAX, ConfigError, DistillConfig, PairConfig
from ..losses import FeatureLoss, feature_loss


@dataclasses.dataclass
class PairSpec:
    """One (student feature, teacher feature, loss) pair after the shape check."""
    name: str            # loss name in logs, e.g. "mgd.layer4"
    key: str             # ModuleDict key (no dots)
    cfg: PairConfig
    student_channels: int
    teacher_channels: int

    @property
    def loss(self) -> FeatureLoss:
        """The registry's entry of the pair's loss (its module, whether it draws seeded masks)."""
        return feature_loss(self.cfg.loss)


def _shape(t: torch.Tensor) -> str:
    return "[" + ",".join(str(s) for s in t.shape) + "]"


def _available(feats: Dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k} {_shape(v)}" for k, v in feats.items()) or "none (does the model return features?)"


def check_pairs(pairs: Sequence[PairConfig], s_feats: Dict[str, torch.Tensor],
                t_feats: Dict[str, torch.Tensor]) -> List[PairSpec]:
    """Check every pair on one batch of features (its loss's start-up check); fail naming the layers and
    their shapes."""
    names = [f"{p.loss}.{p.student}" for p in pairs]
    specs, problems = [], []
    for i, p in enumerate(pairs):
        name = names[i] if names.count(names[i]) == 1 else f"{names[i]}<-{p.teacher}"
        where = f"distill.pairs.{i} ({p.loss}: student {p.student!r} <- teacher {p.teacher!r})"
        if p.student not in s_feats:
            problems.append(f"{where}: the student has no feature {p.student!r}; available: {_available(s_feats)}")
            continue
        if p.teacher not in t_feats:
            problems.append(f"{where}: the teacher has no feature {p.teacher!r}; available: {_available(t_feats)}")
            continue
        s, t = s_feats[p.student], t_feats[p.teacher]
        problem = feature_loss(p.loss).check(p, s, t)
        if problem:
            problems.append(f"{where}: {problem}")
        else:
            specs.append(PairSpec(name, name.replace(".", "_").replace("<-", "__"), p, s.shape[1], t.shape[1]))
    if problems:
        raise ConfigError("feature pairs cannot be distilled:\n  " + "\n  ".join(problems))
    return specs


def build_losses(specs: Sequence[PairSpec], *, seed: int, backend: str) -> nn.ModuleDict:
    """One module per pair, built by its loss's registry entry; ``alpha: auto`` starts at 1.0 until calibrated."""
    mods = nn.ModuleDict()
    for i, sp in enumerate(specs):
        alpha = 1.0 if sp.cfg.alpha == "auto" else float(sp.cfg.alpha)
        # Distinct, reproducible mask streams per pair (SeedStream keys on base * 2^20 + k).
        mods[sp.key] = sp.loss.build(sp.student_channels, sp.teacher_channels, sp.cfg, alpha, seed * 64 + i,
                                     backend)
    return mods


class Distiller(nn.Module):
    """Student + distillation modules; ``forward`` returns the named losses and their ``total``.

    The task (a ``fastkd.tasks.Task``, required) supplies the student's training forward (task-loss terms,
    logits, features), the teacher's forward and the logit loss; the Distiller adds the feature pairs.
    """

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], specs: Sequence[PairSpec], losses: nn.ModuleDict,
                 cfg: DistillConfig, *, task, compile: bool = False):
        super().__init__()
        self.student = student
        self.losses = losses
        self.kd = task.logit_loss(cfg.kd, cfg.backend)
        self.specs = list(specs)
        # seeded losses (MGD) run outside the compiled region, the others inside it
        self.seeded = [sp for sp in self.specs if sp.loss.seeded]
        self.unseeded = [sp for sp in self.specs if not sp.loss.seeded]
        self.task_weight = cfg.task_weight
        self.teacher_layers = sorted({sp.cfg.teacher for sp in self.specs})
        self.task_names = list(task.loss_names(student))
        object.__setattr__(self, "task", task)  # plain attributes: not submodules, no params, no state_dict
        object.__setattr__(self, "_teacher", teacher)  # never handed to the optimizer or the checkpoints
        # a task whose training forward has data-dependent steps (detection: matching, sampling) compiles
        # its fixed-shape part itself and says so with ``compiles_itself``
        whole = compile and not getattr(task, "compiles_itself", False)
        self._fn = torch.compile(self._losses) if whole else self._losses

    @property
    def teacher(self) -> Optional[nn.Module]:
        return self._teacher

    @torch.no_grad()
    def teacher_forward(self, batch) -> Tuple[Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        """Teacher logits and the features the pairs need, in the student's dtype, without grad."""
        t = self._teacher
        if t is None:  # no teacher: plain supervised training (baselines)
            return None, {}
        logits, feats = self.task.teacher_forward(t, batch, self.teacher_layers)
        dtype = next(self.student.parameters()).dtype
        return (None if logits is None else logits.to(dtype)), {k: feats[k].to(dtype).contiguous()
                                                                for k in self.teacher_layers}

    def next_seeds(self) -> Dict[str, int]:
        """One mask seed per seeded pair (MGD) for this optimizer step (host ints; call outside torch.compile)."""
        return {sp.key: self.losses[sp.key].seeds.next() for sp in self.seeded}

    def forward(self, batch, t_logits, t_feats, seeds: Dict[str, int], sample_offset: int = 0,
                scale: float = 1.0, *, eager: bool = False) -> Dict[str, torch.Tensor]:
        fn = self._losses if eager else self._fn
        out, s_feats = fn(batch, t_logits, t_feats)
        # Seeded losses (MGD) run after the compiled region: their mask seed changes every step and would be
        # traced as a constant (a recompile per step); MGD's op is a fused kernel of its own anyway.
        for sp in self.seeded:
            out[sp.name] = self.losses[sp.key](s_feats[sp.cfg.student], t_feats[sp.cfg.teacher],
                                               seed=seeds[sp.key], sample_offset=sample_offset)
        # Every term is a mean over this micro-batch; ``scale`` turns it into "sum / global count" (STYLE.md).
        out = {k: out[k] * scale for k in self.loss_names()}
        out["total"] = sum(out.values())
        return out

    def loss_names(self) -> List[str]:
        return self.task_names + (["kd"] if self.kd is not None else []) + [sp.name for sp in self.specs]

    def _losses(self, batch, t_logits, t_feats):
        """Student forward + task, logit-KD and unseeded feature losses (CT): the torch.compile region."""
        terms, logits, s_feats = self.task.student_forward(self.student, batch)
        out = {k: self.task_weight * terms[k] for k in self.task_names}
        if self.kd is not None:
            out["kd"] = self.kd(logits, t_logits)
        for sp in self.unseeded:
            out[sp.name] = self.losses[sp.key](s_feats[sp.cfg.student], t_feats[sp.cfg.teacher])
        return out, {sp.cfg.student: s_feats[sp.cfg.student] for sp in self.seeded}

    # -- alpha: auto -------------------------------------------------------------------------------------
    def auto_terms(self, cfg: DistillConfig) -> Dict[str, Tuple[nn.Module, float]]:
        terms = {sp.name: (self.losses[sp.key], sp.cfg.target) for sp in self.specs if sp.cfg.alpha == "auto"}
        if cfg.kd is not None and cfg.kd.alpha == "auto":
            terms["kd"] = (self.kd, cfg.kd.target)
        return terms

    @torch.no_grad()
    def calibrate(self, cfg: DistillConfig, batches: Iterable, reduce_mean: Callable[[torch.Tensor], torch.Tensor],
                  device: torch.device) -> Dict[str, float]:
        """Set each ``alpha: auto`` so that the term starts at ``target`` x the task loss.

        ``batches`` yields (batch on the device, sample_offset). Measured with alpha = 1 on the first batches,
        averaged over batches and processes (so every
        rank picks the same alpha). The chosen alphas live in the modules' extra state: checkpoints keep them.
        """
        terms = self.auto_terms(cfg)
        if not terms:
            return {}
        for mod, _ in terms.values():
            mod.alpha = 1.0
        was_training = self.training
        self.train()
        sums = torch.zeros(len(terms) + 1, dtype=torch.float64, device=device)
        seeds = {sp.key: self.losses[sp.key].seeds.peek() for sp in self.seeded}
        count = 0
        for batch, offset in batches:
            t_logits, t_feats = self.teacher_forward(batch)
            out = self.forward(batch, t_logits, t_feats, seeds, offset, 1.0, eager=True)
            task_loss = sum(out[k] for k in self.task_names)
            sums += torch.stack([task_loss] + [out[k] for k in terms]).double()
            count += 1
        self.train(was_training)
        means = reduce_mean(sums / count).tolist()  # host sync: once, at start-up
        chosen = {}
        for (name, (mod, target)), value in zip(terms.items(), means[1:]):
            if not value > 0:
                raise ConfigError(f"alpha: auto for {name}: the measured loss is {value}; set alpha explicitly")
            alpha = float(target * means[0] / value)
            if not alpha <= FLOAT32_MAX:
                raise ConfigError(f"alpha: auto for {name} chose {alpha:.4g} (task loss {means[0]:.4g}, this loss "
                                  f"{value:.4g} at alpha 1), outside the float32 range of the loss backends; set "
                                  "alpha explicitly")
            mod.alpha = chosen[name] = alpha
        return chosen

    def apply_explicit_alphas(self, cfg: DistillConfig) -> List[Tuple[str, float, float]]:
        """After a resume: numeric alphas of the config win over the checkpoint's (``auto`` ones are kept).

        Returns (loss name, checkpoint alpha, config alpha) for every value that changed.
        """
        explicit = {sp.name: (self.losses[sp.key], sp.cfg.alpha) for sp in self.specs if sp.cfg.alpha != "auto"}
        if self.kd is not None and cfg.kd is not None and cfg.kd.alpha != "auto":
            explicit["kd"] = (self.kd, cfg.kd.alpha)
        changed = []
        for name, (mod, alpha) in explicit.items():
            if mod.alpha != float(alpha):
                changed.append((name, mod.alpha, float(alpha)))
                mod.alpha = float(alpha)
        return changed

    def alphas(self) -> Dict[str, float]:
        out = {sp.name: self.losses[sp.key].alpha for sp in self.specs}
        if self.kd is not None:
            out["kd"] = self.kd.alpha
        return out

