"""Run configuration: kw_only dataclasses validated by pydantic v2, loaded from YAML + dotted overrides.

    cfg = load_config("configs/tests/tiny.yaml", ["optim.lr=0.2", "distill.pairs.0.alpha=1e-5"])

Every field has a docstring (the string under it). Errors are ``ConfigError`` with one line per
problem naming the dotted key (``fastkd.config_errors``): an unknown key suggests the closest valid one,
a wrong type names the value and the expected type.

A feature pair's ``loss`` picks its config class (``MGDPairConfig``, ``CTPairConfig``, or one registered
by a module that the config's ``imports`` names). Nothing here imports torch: configs are validated before
torch and DeepSpeed are loaded.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from typing import Annotated, Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import yaml
from pydantic import ConfigDict, Discriminator, Tag, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass, rebuild_dataclass

from .config_errors import format_validation_error as _format_validation_error, suggest
from .errors import ConfigError

_PYD = ConfigDict(extra="forbid", arbitrary_types_allowed=False)
field = dataclasses.field


def config_class(cls):
    """Make ``cls`` a config class: a kw_only pydantic dataclass that refuses unknown keys."""
    return dataclass(config=_PYD, kw_only=True)(cls)


_cfg = config_class


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


DEFAULT_LOSS = "mgd"
"""The loss of a pair that names none."""


@_cfg
class PairConfig:
    """A (student feature, teacher feature) pair and its loss: the fields every feature loss shares.

    Each loss has its own subclass with its own fields (``MGDPairConfig``, ``CTPairConfig``), registered
    under its name; ``loss:`` picks it, in YAML and here: ``PairConfig(student=..., teacher=..., loss="ct")``
    builds a ``CTPairConfig``. A loss of one's own: ``fastkd.losses.register_loss`` (docs/losses.md).
    """
    student: str
    """Student feature name (a key of the student's feature dict, e.g. layer4)."""
    teacher: str
    """Teacher feature name."""
    loss: str = DEFAULT_LOSS
    """Distillation loss for this pair: a registered name (mgd, ct, or one of your own)."""
    alpha: Union[float, Literal["auto"]] = 2e-5
    """Loss weight, or ``auto``: calibrated on the first batches to ``target`` x the task loss."""
    target: float = 1.0
    """With ``alpha: auto``: the starting ratio of this loss to the task loss."""

    def __new__(cls, *args, **kwargs):
        if cls is PairConfig:  # the base stands for the class registered for ``loss``
            cls = pair_config_class(kwargs.get("loss", DEFAULT_LOSS))
        return object.__new__(cls)

    def __post_init__(self):
        _check(0 < self.target < math.inf, f"target must be a finite number > 0, got {self.target}")
        check_weight("alpha", self.alpha)


_PAIRS: Dict[str, type] = {}  # loss name -> its PairConfig subclass, in registration order
_HOLDS_PAIRS: List[type] = []  # config classes whose validators embed the union of the pair classes


def _pair_tag(value: Any) -> Optional[str]:
    """The loss name of a pair being validated (a mapping or a pair config); None for anything else."""
    if isinstance(value, dict):
        loss = value.get("loss", DEFAULT_LOSS)
        return loss if isinstance(loss, str) else repr(loss)
    return value.loss if isinstance(value, PairConfig) else None


def _pair_union() -> Any:
    members = tuple(Annotated[cls, Tag(name)] for name, cls in _PAIRS.items())
    return Annotated[Union[members], Discriminator(_pair_tag)]


def register_pair_config(cls: type) -> type:
    """Make ``cls`` the config of the pairs whose ``loss`` is its name (torch-free; the module side of a
    loss is ``fastkd.losses.register_loss``, which calls this). ``cls`` is a ``PairConfig`` subclass
    made with the same pydantic dataclass settings (``config_class``) declaring ``loss: Literal["name"] =
    "name"``; the name becomes part of log and checkpoint keys (``name.student_feature``)."""
    if not (isinstance(cls, type) and issubclass(cls, PairConfig) and cls is not PairConfig
            and vars(cls).get("__pydantic_config__", {}).get("extra") == "forbid"):
        raise TypeError(f"{cls!r} is not a subclass of fastkd.config.PairConfig decorated with "
                        f"@fastkd.config.config_class")
    ann, name = typing.get_type_hints(cls).get("loss"), getattr(cls, "loss", None)
    if typing.get_origin(ann) is not Literal or typing.get_args(ann) != (name,) or not isinstance(name, str):
        raise TypeError(f"{cls.__qualname__} must declare its loss name as `loss: Literal[\"name\"] = \"name\"`")
    if not name.isidentifier():
        raise TypeError(f"{cls.__qualname__}: loss name {name!r} must be an identifier (it names log and "
                        f"checkpoint keys)")
    known = _PAIRS.get(name)
    if known is not None and known is not cls:
        raise TypeError(f"{cls.__module__}.{cls.__qualname__}: loss {name!r} is already registered by "
                        f"{known.__module__}.{known.__qualname__}")
    _PAIRS[name] = cls
    global AnyPairConfig
    AnyPairConfig = _pair_union()
    for holder in _HOLDS_PAIRS:
        rebuild_dataclass(holder, force=True)
    return cls


def pair_config_class(loss: str) -> type:
    """The config class registered for ``loss``; ConfigError naming the registered ones otherwise."""
    if loss not in _PAIRS:
        raise ConfigError(f"unknown loss {loss!r}{suggest(loss, list(_PAIRS))}; registered: {', '.join(_PAIRS)}")
    return _PAIRS[loss]


def pair_keys(loss: str) -> Optional[List[str]]:
    """The keys a pair of ``loss`` has (None for a loss nobody registered)."""
    return [f.name for f in dataclasses.fields(_PAIRS[loss])] if loss in _PAIRS else None


@register_pair_config
@_cfg
class MGDPairConfig(PairConfig):
    """A pair distilled by MGD (``fastkd.losses.MGD``)."""
    loss: Literal["mgd"] = "mgd"
    """Distillation loss for this pair."""
    mask: Literal["spatial", "channel"] = "spatial"
    """Mask mode (channel for classification, spatial for dense tasks)."""
    ratio: float = 0.65
    """Fraction of mask entries dropped (lambda_mgd)."""

    def __post_init__(self):
        _check(0.0 <= self.ratio < 1.0, f"ratio must be in [0, 1), got {self.ratio}")
        super().__post_init__()


@register_pair_config
@_cfg
class CTPairConfig(PairConfig):
    """A pair distilled by CT (``fastkd.losses.CT``)."""
    loss: Literal["ct"] = "ct"
    """Distillation loss for this pair."""
    hidden_channels: Optional[int] = None
    """Hidden width of the channel-wise MLP (default: teacher channels)."""
    reduction: Literal["sum_over_batch", "mean"] = "sum_over_batch"
    """Reduction of the squared error."""


AnyPairConfig = _pair_union()
"""A pair of any registered loss (pydantic's tagged union on ``loss``; rebuilt when a loss registers)."""


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
    pairs: List[AnyPairConfig] = field(default_factory=list)
    """Feature pairs, each distilled by its own module of its loss (any number, e.g. five FPN levels)."""
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
    """DeepSpeed JSON preset (a relative path: from the working directory; ``configs/...`` not found there
    names fastkd's own presets, shipped with the package)."""
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
    imports: List[str] = field(default_factory=list)
    """Modules ``load_config`` imports before it validates the rest, e.g. ones that register a feature loss
    of your own (``fastkd.losses.register_loss``); each must be importable (installed or on PYTHONPATH)."""
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


_HOLDS_PAIRS.extend([DistillConfig, Config])


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


def format_validation_error(exc: ValidationError, root: Any = None, source: str = "") -> str:
    return _format_validation_error(exc, root if root is not None else Config, source)


def build_config(tree: dict, source: str = "") -> Config:
    if not isinstance(tree, dict):
        raise ConfigError(f"configuration{' ' + source if source else ''} must be a mapping at the top level, "
                          f"got {type(tree).__name__}")
    import_modules(tree.get("imports"), source)
    try:
        return TypeAdapter(Config).validate_python(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, Config, source)) from None


def import_modules(names: Any, source: str = "") -> None:
    """Import the modules a config's ``imports`` names (a malformed list is left to the validation)."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return
    import importlib

    for i, name in enumerate(names):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            where = f" in {source}" if source else ""
            raise ConfigError(f"invalid configuration{where}: imports.{i}: cannot import {name!r}: {exc}") from None


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
