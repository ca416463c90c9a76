"""Run configuration: kw_only dataclasses validated by pydantic v2, loaded from YAML + dotted overrides.

    cfg = load_config("configs/tests/tiny.yaml", ["optim.lr=0.2", "distill.pairs.0.alpha=1e-5"])

Every field has a docstring (the string under it). Errors are ``ConfigError`` with one line per
problem naming the dotted key: an unknown key suggests the closest valid one, a wrong type names
the value and the expected type.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

_PYD = ConfigDict(extra="forbid", arbitrary_types_allowed=False)
field = dataclasses.field


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message says where and how."""


def _cfg(cls):
    return dataclass(config=_PYD, kw_only=True)(cls)


def import_factory(spec: str, what: str):
    """The callable named by ``package.module:attribute`` (user-supplied models and data sources)."""
    import importlib

    module_name, attr = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{what} {spec!r}: cannot import {attr} from {module_name}: {exc}") from None


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


FLOAT32_MAX = 3.4028234663852886e38
"""The largest loss weight: every loss backend takes the weight as (or scales float32 sums by) a float32."""


def check_weight(name: str, value: Union[float, str], *, auto: bool = True) -> None:
    """A loss weight is a finite number in [0, FLOAT32_MAX] (or ``auto`` where allowed)."""
    if auto and value == "auto":
        return
    _check(math.isfinite(value) and 0.0 <= value <= FLOAT32_MAX,
           f"{name} must be a finite number in [0, {FLOAT32_MAX:.4g}] (the float32 range every loss backend "
           f"takes){' or auto' if auto else ''}, got {value}")


@_cfg
class ModelConfig:
    name: str
    """Model name for ``fastkd.models.build`` (e.g. resnet18), or ``package.module:factory``."""
    num_classes: int = 1000
    """Number of output classes."""
    in_channels: int = 3
    """Input image channels."""
    kwargs: Dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the model factory."""
    checkpoint: Optional[str] = None
    """State-dict file to load (required for the teacher; optional initialisation for the student)."""
    feature_layers: Optional[List[str]] = None
    """For foreign models without ``features=True``: module names to tap (``fastkd.models.adapt``)."""

    def __post_init__(self):
        _check(self.num_classes >= 1, f"num_classes must be >= 1, got {self.num_classes}")
        _check(self.in_channels >= 1, f"in_channels must be >= 1, got {self.in_channels}")


@_cfg
class DataConfig:
    source: str = "synthetic"
    """ffcv | torch (fastkd.data loaders), synthetic (built-in, for tests/smoke runs), or package.module:factory."""
    path: Optional[str] = None
    """Dataset location (file or folder) for the train split."""
    val_path: Optional[str] = None
    """Dataset location for the validation split (defaults to ``path``)."""
    image_size: int = 224
    """Side of the (square) images fed to the models."""
    mean: Optional[List[float]] = None
    """Per-channel normalisation mean (None: the source's default)."""
    std: Optional[List[float]] = None
    """Per-channel normalisation std (None: the source's default)."""
    num_workers: int = 4
    """Loader worker processes per rank."""
    channels: int = 3
    """Image channels (synthetic source)."""
    num_classes: int = 10
    """Classes of the synthetic source."""
    train_size: int = 512
    """Synthetic source: number of training samples."""
    val_size: int = 128
    """Synthetic source: number of validation samples."""
    kwargs: Dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the loader factory."""

    def __post_init__(self):
        _check(self.image_size >= 1, f"image_size must be >= 1, got {self.image_size}")
        _check(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        _check(self.train_size >= 1 and self.val_size >= 1, "train_size and val_size must be >= 1")
        if self.mean is not None and self.std is not None:
            _check(len(self.mean) == len(self.std), f"mean has {len(self.mean)} values but std has {len(self.std)}")


@_cfg
class PairConfig:
    student: str
    """Student feature name (a key of the student's feature dict, e.g. layer4)."""
    teacher: str
    """Teacher feature name."""
    loss: Literal["mgd", "ct"] = "mgd"
    """Distillation loss for this pair."""
    alpha: Union[float, Literal["auto"]] = 2e-5
    """Loss weight, or ``auto``: calibrated on the first batches to ``target`` x the task loss."""
    target: float = 1.0
    """With ``alpha: auto``: the starting ratio of this loss to the task loss."""
    mask: Literal["spatial", "channel"] = "spatial"
    """MGD: mask mode (channel for classification, spatial for dense tasks)."""
    ratio: float = 0.65
    """MGD: fraction of mask entries dropped (lambda_mgd)."""
    hidden_channels: Optional[int] = None
    """CT: hidden width of the channel-wise MLP (default: teacher channels)."""
    reduction: Literal["sum_over_batch", "mean"] = "sum_over_batch"
    """CT: reduction of the squared error."""

    def __post_init__(self):
        _check(0.0 <= self.ratio < 1.0, f"ratio must be in [0, 1), got {self.ratio}")
        _check(0 < self.target < math.inf, f"target must be a finite number > 0, got {self.target}")
        check_weight("alpha", self.alpha)


@_cfg
class KDConfig:
    alpha: Union[float, Literal["auto"]] = 1.0
    """Weight of the logit KD loss, or ``auto`` (calibrated like the pairs)."""
    temperature: float = 4.0
    """Softmax temperature T (the loss is scaled by T^2)."""
    target: float = 1.0
    """With ``alpha: auto``: the starting ratio of KD to the task loss."""

    def __post_init__(self):
        _check(0 < self.temperature < math.inf, f"temperature must be a finite number > 0, got {self.temperature}")
        _check(0 < self.target < math.inf, f"target must be a finite number > 0, got {self.target}")
        check_weight("alpha", self.alpha)


@_cfg
class DistillConfig:
    pairs: List[PairConfig] = field(default_factory=list)
    """Feature pairs, each distilled by its own MGD/CT module (any number, e.g. five FPN levels)."""
    kd: Optional[KDConfig] = None
    """Logit KD stacked on the feature losses (null: off)."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy task loss."""
    task_weight: float = 1.0
    """Weight of the cross-entropy task loss."""
    calibration_batches: int = 1
    """Batches measured for ``alpha: auto``."""
    backend: str = "auto"
    """fastkd.ops backend for the fused losses: auto | reference | triton | csrc."""

    def __post_init__(self):
        _check(0.0 <= self.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        check_weight("task_weight", self.task_weight, auto=False)
        _check(self.calibration_batches >= 1, "calibration_batches must be >= 1")
        names = [f"{p.loss}:{p.student}->{p.teacher}" for p in self.pairs]
        dup = sorted({n for n in names if names.count(n) > 1})
        _check(not dup, f"duplicate pairs: {', '.join(dup)}")


@_cfg
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    """Optimizer."""
    lr: float = 0.1
    """Peak learning rate (reached after warmup)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    weight_decay: float = 1e-4
    """Weight decay."""
    betas: Tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    decay_norm_and_bias: bool = True
    """Apply weight decay to norm weights and biases too (the classic ResNet recipe does)."""

    def __post_init__(self):
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")


@_cfg
class ScheduleConfig:
    name: Literal["cosine", "step", "constant", "poly"] = "cosine"
    """Learning-rate decay after warmup (poly: ``min_lr + (lr - min_lr) * (1 - t/T)^power``, mmseg's)."""
    warmup_epochs: float = 0.0
    """Linear warmup length in epochs (may be fractional)."""
    warmup_steps: Optional[int] = None
    """Linear warmup length in optimizer steps (overrides warmup_epochs)."""
    milestones: List[float] = field(default_factory=list)
    """Step schedule: epochs at which the lr is multiplied by gamma."""
    gamma: float = 0.1
    """Step schedule: decay factor."""
    min_lr: float = 0.0
    """Cosine and poly schedules: final learning rate."""
    power: float = 0.9
    """Poly schedule: exponent of the decay."""

    def __post_init__(self):
        _check(self.warmup_epochs >= 0, "warmup_epochs must be >= 0")
        _check(self.power > 0, f"power must be > 0, got {self.power}")
        _check(list(self.milestones) == sorted(self.milestones), f"milestones must be increasing, got {self.milestones}")


@_cfg
class DeepSpeedConfig:
    config: str = "configs/deepspeed/zero2.json"
    """DeepSpeed JSON preset (relative paths: the working directory, then the fastkd repo)."""
    zero_stage: Optional[int] = None
    """Override the preset's ZeRO stage (0-3)."""
    overrides: Dict[str, Any] = field(default_factory=dict)
    """Keys merged into the preset (e.g. {zero_optimization: {reduce_bucket_size: 5e7}})."""

    def __post_init__(self):
        _check(self.zero_stage is None or 0 <= self.zero_stage <= 3, f"zero_stage must be 0..3, got {self.zero_stage}")


@_cfg
class TrainConfig:
    epochs: int = 1
    """Training epochs."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (default: epochs x steps per epoch)."""
    session_steps: Optional[int] = None
    """Stop this invocation after this many steps with a checkpoint (time-limited jobs); the schedule
    still spans the whole run and ``resume: auto`` continues it exactly."""
    batch_size: int = 256
    """Global batch: micro_batch x processes x grad_accum."""
    grad_accum: int = 1
    """Gradient accumulation (micro-steps per optimizer step)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value (0: off)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    compile: bool = False
    """torch.compile the student forward + losses (DeepSpeed's backward/step stay outside)."""
    compile_teacher: bool = True
    """With compile on: compile the teacher forward on its own."""
    sync_bn: bool = False
    """Convert the student's BatchNorm to SyncBatchNorm (GPU only); off: statistics per process."""
    channels_last: bool = True
    """Channels-last memory format on GPU."""
    log_every: int = 10
    """Log metrics every this many optimizer steps."""
    eval_every: int = 1
    """Evaluate every this many epochs (0: only at the end)."""
    eval_every_steps: int = 0
    """Also evaluate after every this many optimizer steps within an epoch (0: never); at an epoch's
    end ``eval_every`` decides.  For accuracy curves of short runs."""
    eval_teacher: bool = True
    """Report the teacher's validation accuracy once at start."""
    ckpt_every: int = 0
    """Save a checkpoint every this many optimizer steps, and at the end of the run (0: at every epoch's end)."""
    keep_last: int = 3
    """Complete checkpoints kept on disk."""
    resume: str = "auto"
    """auto (latest complete checkpoint in run_dir, if any) | none | a checkpoint directory."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    dist_timeout_s: int = 1800
    """Timeout of collective operations, so a dead rank brings the others down."""

    def __post_init__(self):
        for name in ("epochs", "batch_size", "grad_accum", "log_every"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _check(self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1")
        _check(self.session_steps is None or self.session_steps >= 1, "session_steps must be >= 1")
        _check(self.batch_size % self.grad_accum == 0,
               f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        _check(self.grad_clip >= 0, "grad_clip must be >= 0")
        _check(self.eval_every_steps >= 0, f"eval_every_steps must be >= 0, got {self.eval_every_steps}")
        _check(self.keep_last >= 1, "keep_last must be >= 1")


@_cfg
class Config:
    student: ModelConfig
    """The model being trained."""
    task: str = "classification"
    """What is trained: classification | detection | segmentation (``fastkd.tasks``), or
    ``package.module:Class`` (a ``fastkd.tasks.Task`` subclass)."""
    teacher: Optional[ModelConfig] = None
    """The frozen model distilled from (checkpoint required); null trains the student alone (baselines,
    or the teacher itself)."""
    run_dir: str = "runs/default"
    """Checkpoints, metrics.jsonl, TensorBoard events and plots go here."""
    seed: int = 0
    """Seed of data order, initialisation and MGD masks."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data source."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Losses."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop, precision, logging, checkpoints."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed preset and overrides."""

    def __post_init__(self):
        _check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        if self.teacher is None:
            _check(not self.distill.pairs and self.distill.kd is None,
                   "distill.pairs / distill.kd need a teacher: set teacher (or remove them for a baseline)")
        else:
            _check(self.teacher.checkpoint is not None,
                   "teacher.checkpoint is required (a state_dict file of the teacher)")


# ----------------------------------------------------------------------------------------------------------
# Loading: YAML -> dict -> dotted overrides -> validation with readable errors


def parse_override(item: str) -> Tuple[List[str], Any]:
    """``a.b.0.c=value`` -> (["a", "b", "0", "c"], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key component")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc.problem})") from None
    return key.split("."), value


def apply_override(tree: dict, parts: List[str], value: Any) -> None:
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {'.'.join(parts)}: {where} is not an index of a list of {len(node)}")
            idx = int(part)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"override {'.'.join(parts)}: {'.'.join(parts[:i])} is a value, not a section")


def _annotation_at(cls: Any, loc: Sequence) -> Any:
    """The annotation at a pydantic error location, walking dataclasses, lists, dicts, optionals."""
    ann: Any = cls
    for part in loc:
        ann = _strip_optional(ann)
        if dataclasses.is_dataclass(ann) and isinstance(part, str):
            hints = typing.get_type_hints(ann)
            if part not in hints:
                return None
            ann = hints[part]
        elif typing.get_origin(ann) in (list, List, tuple) and isinstance(part, int):
            args = typing.get_args(ann)
            ann = args[min(part, len(args) - 1)] if args else Any
        elif typing.get_origin(ann) in (dict, Dict):
            ann = typing.get_args(ann)[1] if typing.get_args(ann) else Any
        else:
            return ann
    return ann


def _strip_optional(ann: Any) -> Any:
    if typing.get_origin(ann) is Union:
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _type_name(ann: Any) -> str:
    if ann is None:
        return "?"
    origin = typing.get_origin(ann)
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(ann))
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(ann))
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(ann)[0])}"
    if origin in (tuple, Tuple):
        return "[" + ", ".join(_type_name(a) for a in typing.get_args(ann)) + "]"
    if origin in (dict, Dict):
        return "mapping"
    if ann is type(None):
        return "null"
    if dataclasses.is_dataclass(ann):
        return f"a mapping ({ann.__name__} section)"
    return getattr(ann, "__name__", str(ann))


def _dotted(loc: Sequence) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def _field_loc(root: Any, loc: Sequence) -> List:
    """Drop pydantic's union-branch tags (e.g. 'float', "literal['auto']") from a location."""
    out: List = []
    ann: Any = root
    for part in loc:
        nxt = _annotation_at(ann, [part]) if ann is not None else None
        stripped = _strip_optional(ann) if ann is not None else None
        is_field = isinstance(part, int) or (dataclasses.is_dataclass(stripped) and nxt is not None) or \
            typing.get_origin(stripped) in (dict, Dict)
        if not is_field and out:
            break
        out.append(part)
        ann = nxt
    return out


def format_validation_error(exc: ValidationError, root: Any = None, source: str = "") -> str:
    root = root if root is not None else Config
    lines: Dict[str, str] = {}
    for err in exc.errors():
        loc = list(err["loc"])
        kind = err["type"]
        if kind in ("unexpected_keyword_argument", "extra_forbidden"):
            parent = _strip_optional(_annotation_at(root, loc[:-1]))
            valid = [f.name for f in dataclasses.fields(parent)] if dataclasses.is_dataclass(parent) else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean {_dotted(loc[:-1] + close)!r}?" if close else ""
            lines[_dotted(loc)] = (f"unknown key {_dotted(loc)!r}{hint} (valid keys here: {', '.join(valid)})")
            continue
        floc = _field_loc(root, loc)
        key = _dotted(floc)
        if kind == "missing" or kind == "missing_keyword_argument":
            lines[key] = f"{key}: required key is missing ({_type_name(_annotation_at(root, floc))})"
        elif kind == "value_error":
            msg = err["msg"].removeprefix("Value error, ")
            lines[key] = msg if not floc else f"{key}: {msg}"
        else:
            value = err.get("input")
            lines[key] = (f"{key}: got {value!r} ({type(value).__name__}), expected "
                          f"{_type_name(_annotation_at(root, floc))}")
    where = f" in {source}" if source else ""
    return f"invalid configuration{where}:\n  " + "\n  ".join(lines.values())


def build_config(tree: dict, source: str = "") -> Config:
    if not isinstance(tree, dict):
        raise ConfigError(f"configuration{' ' + source if source else ''} must be a mapping at the top level, "
                          f"got {type(tree).__name__}")
    try:
        return TypeAdapter(Config).validate_python(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, Config, source)) from None


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            tree = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return tree or {}


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> Config:
    """YAML file (or nothing) + ``key.path=value`` overrides -> validated Config."""
    tree = load_yaml(path) if path else {}
    for item in overrides:
        parts, value = parse_override(item)
        apply_override(tree, parts, value)
    return build_config(tree, source=path or "")


def to_dict(cfg: Any) -> dict:
    """Plain dict (YAML-safe) of a config, e.g. to save beside a run."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))
