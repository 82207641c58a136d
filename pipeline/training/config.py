"""Configuration of training: the hyper-parameters (``TrainConfig``) and the job around them.

``TrainJobConfig`` is what ``nucleiscope train --config FILE`` runs, for every kind of
training: ``task = "attention"`` trains F and G on scale-labelled tiles (``runner = "ray"``:
Ray Train workers, DDP; ``runner = "local"``: this process, the GPU-resident quick path),
``task = "student"`` runs the self-training stage in this process (teacher maps,
pseudo-labels, the student U-Net). The file is TOML::

    task = "attention"               # or "student"
    runner = "ray"                   # or "local" (the only runner of the student task)
    max_seconds = 600                # optional wall-clock budget of one run (a rerun continues)
    output = "runs/monuseg"          # run folder: local path or fsspec URL (s3://bucket/runs/x)
    steps = 20000                    # optimisation steps in total (a rerun continues to this)
    checkpoint_every = 1000
    log_every = 100                  # one metrics.csv row per this many steps
    keep_checkpoints = 3
    sampler = "resident"             # "stream" (Ray tasks, any size) or "resident" (all on the device)

    [storage_options]                # fsspec options for sources and output (e.g. an S3 endpoint)

    [scaling]
    workers = 1                      # Ray Train workers (DDP); the batch is per worker
    use_gpu = true
    cpus_per_worker = 8

    [[sources]]                      # paths, globs, folders, manifests or URLs; mpp states µm/px
    path = "../shared/data/monuseg-train/images/*.tif"
    mpp = 0.25

    [train]                          # TrainConfig fields (reference values by default)
    batch_size = 32

    [stream]                         # StreamConfig fields (sampler = "stream")
    window_um = 512.0

    [student]                        # task = "student": StudentTrainConfig fields
    batch_size = 16

    [self_training]                  # task = "student": SelfTrainingConfig fields
    holdout = 0

    [pseudo_labels]                  # task = "student": PseudoLabelConfig fields
    recipe = "consensus"

Relative paths are taken from the current directory. Unknown keys are errors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..common.errors import ConfigError
from ..common.tomlfile import read_toml
from ..common.validate import finite_number
from .pseudo_labels import PseudoLabelConfig
from .self_training import StudentTrainConfig

#: µm/px of the scale classes, indexed by label (0 = 10x, 1 = 20x, 2 = 40x).
SCALE_MPP: tuple[float, float, float] = (1.0, 0.5, 0.25)
#: Coarsest source µm/px accepted: 40x tiles are derived from it with at most 5 % upsampling.
MAX_SOURCE_MPP = SCALE_MPP[-1] * 1.05
SAMPLERS = ("stream", "resident")
TASKS = ("attention", "student")
RUNNERS = ("ray", "local")


@dataclass(frozen=True)
class SelfTrainingConfig:
    """The self-training stage around the student's hyper-parameters (``task = "student"``);
    the pseudo-labels' recipe and sizes are the job's ``[pseudo_labels]`` table."""

    #: Weights of the attention teacher F (None: the shipped ``attention_f.safetensors``;
    #: unused by the "classical" recipe, which needs no teacher).
    teacher: str | None = None
    #: Keep the last N sources (in order) out of training, to score them as held out.
    holdout: int = 0
    #: Folder of ``<stem>.png`` instance labels, read only to score the result (None: no scores).
    labels: str | None = None
    #: Processes for pseudo-labels and post-processing.
    workers: int = 2
    #: Also write the teacher's maps (``teacher_maps.npz``, uint8 round(a * 255)).
    save_maps: bool = False

    def __post_init__(self) -> None:
        _check_int(self, "holdout", 0)
        _check_int(self, "workers", 1)



def _check_int(obj: object, name: str, minimum: int) -> None:
    value = getattr(obj, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (reference values by default)."""

    batch_size: int = 32
    crop_px: int = 160
    pad_min_px: int = 224
    sparsity: float = 0.07
    sharpness: float = 20.0
    tau_momentum: float = 0.9
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    lr_drop_steps: tuple[int, ...] = (30_000, 60_000)
    lr_gamma: float = 0.1
    weight_scale: float = 1.0
    weight_tv: float = 1.0
    weight_equiv: float = 1.0
    #: Weight of the optional scale-equivariance loss (0: off, as the authors advise).
    weight_scale_equiv: float = 0.0
    hed_sigma: float = 0.03
    stain_norm: bool = True
    #: Reject tiles with more than this share of white pixels (None: keep all; for WSI sources).
    max_white_frac: float | None = None
    white_level: int = 220
    white_candidates: int = 4
    f_width: int = 64
    f_dilations: tuple[int, ...] = (1, 2, 3, 5, 10, 20)
    g_width: int = 64
    g_blocks: tuple[int, ...] = (3, 4, 6, 3)
    #: bf16 autocast and channels-last layout, on CUDA only.
    bf16: bool = True
    channels_last: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name, minimum in (("batch_size", 2), ("crop_px", 8), ("pad_min_px", 0), ("white_candidates", 1),
                              ("f_width", 1), ("g_width", 1), ("seed", 0)):
            _check_int(self, name, minimum)
        if not 0.0 < self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in (0, 1), got {self.sparsity!r}")
        if not 0.0 <= self.tau_momentum < 1.0:
            raise ConfigError(f"tau_momentum must be in [0, 1), got {self.tau_momentum!r}")
        for name in ("sharpness", "lr", "lr_gamma"):
            if not finite_number(getattr(self, name)) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("weight_decay", "weight_scale", "weight_tv", "weight_equiv", "weight_scale_equiv", "hed_sigma"):
            if not finite_number(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if len(self.betas) != 2 or not all(finite_number(b) and 0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        drops = self.lr_drop_steps
        if any(not isinstance(s, int) or s <= 0 for s in drops) or list(drops) != sorted(drops):
            raise ConfigError(f"lr_drop_steps must be increasing positive integers, got {drops!r}")
        if self.max_white_frac is not None and not (finite_number(self.max_white_frac) and 0 <= self.max_white_frac <= 1):
            raise ConfigError(f"max_white_frac must be in [0, 1] or None, got {self.max_white_frac!r}")
        if not 0 <= self.white_level <= 255:
            raise ConfigError(f"white_level must be in [0, 255], got {self.white_level!r}")
        positive = all(isinstance(d, int) and d >= 1 for d in (*self.f_dilations, *self.g_blocks))
        if not self.f_dilations or not self.g_blocks or not positive:
            raise ConfigError("f_dilations and g_blocks must be non-empty positive integers")

    @property
    def tile_px(self) -> int:
        """Side of a tile before its random crop (tiles are padded to at least ``pad_min_px``)."""
        return max(self.pad_min_px, self.crop_px)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return asdict(self)


@dataclass(frozen=True)
class SourceSpec:
    """Training images: a path, glob, folder, manifest or fsspec URL, and optionally their µm/px."""

    path: str
    #: µm/px of every file ``path`` names, overriding metadata (required for PNG/JPEG).
    mpp: float | None = None
    #: A split file (``evaluation.split``): only the files of its ``part`` are used.
    split: str | None = None
    part: str = "train"

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise ConfigError(f"a source path must be a non-empty string, got {self.path!r}")
        if self.split is not None and not isinstance(self.split, str):
            raise ConfigError(f"source split must be a path, got {self.split!r}")
        if self.part not in ("train", "validation"):
            raise ConfigError(f"source part must be train or validation, got {self.part!r}")
        if self.mpp is not None and not (finite_number(self.mpp) and self.mpp > 0):
            raise ConfigError(f"source mpp must be a positive number, got {self.mpp!r} (for {self.path})")


@dataclass(frozen=True)
class StreamConfig:
    """How the streamed sampler cuts tiles (Ray tasks) and keeps them on the device."""

    #: Side of the level-0 window one task reads, in µm (all three scales come from it).
    window_um: float = 512.0
    #: Tiles cut per scale from each window (the same number at each scale).
    tiles_per_scale: int = 8
    #: Tiles per scale kept on the device; batches draw from this pool, refreshed as tasks land.
    pool_tiles: int = 256
    #: Window tasks each worker keeps running.
    tasks_in_flight: int = 4
    #: CPUs a window task asks Ray for.
    task_cpus: float = 1.0
    #: A tile is kept when at least this share of it is tissue (reference: 0.9).
    min_tissue_frac: float = 0.9
    #: µm/px of the tissue mask of each source.
    tissue_mpp: float = 8.0

    def __post_init__(self) -> None:
        for name, minimum in (("tiles_per_scale", 1), ("pool_tiles", 1), ("tasks_in_flight", 1)):
            _check_int(self, name, minimum)
        for name in ("window_um", "task_cpus", "tissue_mpp"):
            if not (finite_number(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"stream {name} must be a positive number, got {getattr(self, name)!r}")
        if not (finite_number(self.min_tissue_frac) and 0.0 <= self.min_tissue_frac <= 1.0):
            raise ConfigError(f"stream min_tissue_frac must be in [0, 1], got {self.min_tissue_frac!r}")


@dataclass(frozen=True)
class TrainJobConfig:
    """A training job: sources, run folder, schedule of steps, workers and hyper-parameters."""

    sources: tuple[SourceSpec, ...]
    output: str
    steps: int
    checkpoint_every: int = 1000
    log_every: int = 100
    keep_checkpoints: int = 3
    sampler: str = "stream"
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    #: Worker-group restarts Ray Train may make after a worker fails (each resumes from a checkpoint).
    max_failures: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    task: str = "attention"
    #: "ray" or "local" (None: "ray" for the attention task, "local" for the student).
    runner: str | None = None
    #: Wall-clock budget of one run in seconds (None: none); the next run continues.
    max_seconds: float | None = None
    #: After training F, write its test-time-augmented maps of the sources (``maps.npz``).
    maps: bool = False
    student: StudentTrainConfig = field(default_factory=StudentTrainConfig)
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)
    pseudo_labels: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.sources or not all(isinstance(s, SourceSpec) for s in self.sources):
            raise ConfigError("a training job needs at least one [[sources]] entry")
        if not isinstance(self.output, str) or not self.output.strip():
            raise ConfigError("output (the run folder) must be a non-empty path or URL")
        for name, minimum in (("steps", 1), ("checkpoint_every", 1), ("log_every", 1), ("keep_checkpoints", 1),
                              ("workers", 1), ("max_failures", 0)):
            _check_int(self, name, minimum)
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not isinstance(self.use_gpu, bool):
            raise ConfigError(f"use_gpu must be true or false, got {self.use_gpu!r}")
        if not (finite_number(self.cpus_per_worker) and self.cpus_per_worker > 0):
            raise ConfigError(f"cpus_per_worker must be a positive number, got {self.cpus_per_worker!r}")
        if not isinstance(self.storage_options, dict):
            raise ConfigError("storage_options must be a table")
        self._check_task()
        if self.task == "attention" and self.sampler == "stream" and self.stream.window_um < self.train.tile_px * SCALE_MPP[0]:
            raise ConfigError(
                f"stream window_um ({self.stream.window_um}) must hold one 10x tile: "
                f"at least {self.train.tile_px * SCALE_MPP[0]:g} µm (tile_px {self.train.tile_px} at 1.0 µm/px)"
            )

    def _check_task(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.runner is None:
            object.__setattr__(self, "runner", "ray" if self.task == "attention" else "local")
        if self.runner not in RUNNERS:
            raise ConfigError(f"runner must be one of {RUNNERS}, got {self.runner!r}")
        if self.task == "student" and self.runner != "local":
            raise ConfigError('the student task trains in this process: runner must be "local"')
        if self.max_seconds is not None and not (finite_number(self.max_seconds) and self.max_seconds > 0):
            raise ConfigError(f"max_seconds must be a positive number, got {self.max_seconds!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (storage options left out: they may hold secrets)."""
        data = asdict(self)
        data.pop("storage_options")
        return data


_JOB_KEYS = ("output", "steps", "checkpoint_every", "log_every", "keep_checkpoints", "sampler", "max_failures",
             "task", "runner", "max_seconds", "maps")  # fmt: skip
_SCALING_KEYS = ("workers", "use_gpu", "cpus_per_worker")
_TABLES = ("storage_options", "scaling", "sources", "train", "stream", "student", "self_training", "pseudo_labels")
#: [student] keys set from the job's top level instead.
_STUDENT_FROM_JOB = ("steps", "max_seconds")


def load_job_config(path: str | os.PathLike[str]) -> TrainJobConfig:
    """Read and validate a TOML job file; raises ConfigError naming the file."""
    name = os.fspath(path)
    data = read_toml(name, "config file")
    try:
        return job_config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from exc


def job_config_from_dict(data: Mapping[str, Any]) -> TrainJobConfig:
    """A ``TrainJobConfig`` from parsed TOML (the layout in this module's docstring)."""
    _no_unknown(data, (*_JOB_KEYS, *_TABLES), "top level")
    scaling = _table(data, "scaling")
    _no_unknown(scaling, _SCALING_KEYS, "[scaling]")
    raw_sources = data.get("sources", [])
    if not isinstance(raw_sources, list) or not all(isinstance(s, dict) for s in raw_sources):
        raise ConfigError("sources must be an array of tables ([[sources]] with path and optional mpp)")
    sources = []
    for entry in raw_sources:
        _no_unknown(entry, ("path", "mpp", "split", "part"), "[[sources]]")
        if "path" not in entry:
            raise ConfigError("every [[sources]] entry needs a path")
        sources.append(SourceSpec(**entry))
    if "output" not in data or "steps" not in data:
        raise ConfigError("output and steps are required")
    options = _table(data, "storage_options")
    return TrainJobConfig(
        sources=tuple(sources),
        train=_dataclass_from(TrainConfig, _table(data, "train"), "[train]"),
        stream=_dataclass_from(StreamConfig, _table(data, "stream"), "[stream]"),
        student=_student_config(data),
        self_training=_dataclass_from(SelfTrainingConfig, _table(data, "self_training"), "[self_training]"),
        pseudo_labels=_dataclass_from(PseudoLabelConfig, _table(data, "pseudo_labels"), "[pseudo_labels]"),
        storage_options=dict(options),
        **{k: data[k] for k in _JOB_KEYS if k in data},
        **{k: scaling[k] for k in _SCALING_KEYS if k in scaling},
    )


def _student_config(data: Mapping[str, Any]) -> StudentTrainConfig:
    """[student] with steps and max_seconds from the job's top level."""
    table = dict(_table(data, "student"))
    clash = sorted(set(table) & set(_STUDENT_FROM_JOB))
    if clash:
        raise ConfigError(f"[student] {clash}: set these at the top level of the job")
    config: StudentTrainConfig = _dataclass_from(StudentTrainConfig, table, "[student]")
    if data.get("task") == "student" and isinstance(data.get("steps"), int):
        values = {"steps": data["steps"], "max_seconds": data.get("max_seconds")}
        config = StudentTrainConfig(**{**config.to_dict(), **values, "widths": config.widths})
    return config


def _table(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a table ([{name}])")
    return value


def _no_unknown(data: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; known: {sorted(known)}")


def _dataclass_from(cls: type[Any], table: Mapping[str, Any], where: str) -> Any:
    """An instance of the dataclass ``cls`` from TOML values typed like its defaults (arrays to tuples)."""
    defaults = cls()
    names = tuple(f.name for f in fields(cls))
    _no_unknown(table, names, where)
    values: dict[str, Any] = {}
    for key, value in table.items():
        default = getattr(defaults, key)
        if isinstance(default, tuple):
            if not isinstance(value, list):
                raise ConfigError(f"{where} {key} must be an array, got {value!r}")
            value = tuple(value)
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{where} {key} must be true or false, got {value!r}")
        elif isinstance(default, int) and not isinstance(default, bool) and (
            not isinstance(value, int) or isinstance(value, bool)
        ):
            raise ConfigError(f"{where} {key} must be an integer, got {value!r}")
        elif isinstance(default, float) and not finite_number(value):
            raise ConfigError(f"{where} {key} must be a number, got {value!r}")
        elif default is None and not (finite_number(value) or isinstance(value, str)):
            raise ConfigError(f"{where} {key} must be a number or a string, got {value!r}")
        values[key] = value
    return cls(**values)
