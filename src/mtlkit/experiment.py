"""An experiment: one config naming everything a paper's protocol names.

The same fields in YAML, in a Python dict, or as an :class:`Experiment`; ``mtlkit compare`` and
``mtlkit train`` read them from ``--config FILE`` and ``--set key=value``, and
:func:`mtlkit.compare` / :func:`mtlkit.train` take them directly. Every field is optional; the
defaults are the built-in comparison (``configs/default.yaml`` writes them all out).

.. code-block:: yaml

    # NYUv2 with SegNet-MTAN, as in the MTAN paper (Liu et al., CVPR 2019, arXiv:1803.10704)
    dataset: nyuv2                # a registered name, or package.module:function
    root: data/nyuv2
    dataset_options: {}
    model: segnet_mtan            # a registered model, or package.module:function
    model_options: {}
    optimizer: {name: adam, lr: 1e-4, weight_decay: 0}
    scheduler: {name: step, step_size: 100, gamma: 0.5}
    epochs: 200
    batch_size: 2
    methods: [ew, dwa, uw, mgda]
    hparams:
      dwa: {temperature: 2.0}
    seeds: [0, 1, 2]

Fields (defaults in brackets):

- ``dataset`` [multidigits]: a name of ``mtlkit.data.available()`` or ``package.module:function``
  returning a :class:`~mtlkit.data.DatasetBundle` (called with ``dataset_options``, and with
  ``root``/``seed`` where its signature takes them). ``root`` [none]: data folder.
  ``dataset_options`` [{}]: the dataset's options. ``max_samples`` [none]: use only the first N
  samples of each split (``--quick`` sets it).
- ``model`` [none: the dataset's default model]: a name of
  ``mtlkit.train.models.available_models()`` or ``package.module:function`` called as
  ``function(tasks, input_shape, **model_options)``, returning a multi-task model.
  ``model_options`` [{}]: the model's options (over the dataset's defaults for its default
  model). A key that names a model (registered, or ``package.module:function``) holds a
  mapping of options for that model alone, used only when it is the model built, so a config
  can give each model choice its own settings (``model_options: {nddr: {init: [0.8, 0.2]}}``
  applies with ``--model nddr`` and is ignored for any other model); the other keys apply to
  whichever model is built and win over its section (``--set model_options.init=...``
  overrides a config's ``nddr: {init: ...}``).
- ``optimizer``: ``name`` [adam] (adam, adamw, sgd), ``lr`` [0.003], ``weight_decay`` [0],
  ``momentum`` [0, sgd], ``nesterov`` [false, sgd], ``betas`` [[0.9, 0.999], adam/adamw].
  ``task_lr`` [{}]: per-task learning rates of the task-specific parameters.
- ``scheduler``: ``name`` [plateau] (none, step, multistep, cosine, plateau, poly), ``step_size`` [1],
  ``milestones`` [[]], ``gamma`` [0.1], ``warmup_epochs`` [0], ``min_lr`` [0], ``factor``
  [0.1] and ``patience`` [2] (plateau: the rate times ``factor`` once more than ``patience``
  evaluations in a row have not improved the validation score, never below ``min_lr``, as
  torch's ``ReduceLROnPlateau``), ``power`` [0.9, poly] (:class:`mtlkit.train.optimizers.Schedule`).
- ``epochs`` [40: a cap; with the default schedule, early stopping ends the default comparison's
  runs before it], ``max_steps`` [none: whole epochs], ``batch_size`` [64], ``grad_clip``
  [none: max gradient norm], ``eval_every`` [1 epoch; the last epoch is always evaluated],
  ``cosine_every`` [25 steps; 0: never]: how often the task gradients' pairwise cosines are
  logged (K extra backward passes for methods that do not compute them anyway).
  ``patience`` [5]: early stopping, end a run after this many evaluations without a better
  validation score (null: never; a run the budget ends while it still improves is flagged in
  the results). ``min_delta`` [0.005]: the smallest gain that counts as better there: the mean
  over tasks of the primary validation metrics' relative change since the last such gain (0:
  any better validation score); model selection still takes the best validation score.
- ``baselines`` [{}]: published single-task values ``{task/metric: value}``; a task named there
  is not trained alone, and Δm% / Δp use its given metrics only.
- ``delta_m`` [all_metrics]: the Δm% that orders ``compare``'s table: ``all_metrics`` (mean
  over every metric, Maninis et al. 2019) or ``per_task`` (mean over tasks of each task's one
  primary metric, the dense-prediction survey's, Vandenhende et al. 2021, arXiv:2004.13379);
  ``results.json`` keeps both, and the report names the one used.
- ``methods`` [ten methods, see ``DEFAULT_METHODS``], ``hparams`` [{}]: ``{method: {name:
  value}}``. ``seeds`` [1]: a count (seeds 0..n-1) or a list of seeds.
- ``amp`` [none]: mixed precision, ``bf16`` (autocast) or ``fp16`` (autocast and a gradient
  scaler that the balancer drives: weights from unscaled quantities, skipped steps leave the
  balancer's state untouched).
- ``jobs`` [auto]: runs of a comparison trained at once, each in its own process (auto: one
  per CPU core on CPU, one on an accelerator or under ``torchrun``); ``threads`` [auto]: torch
  threads of each process (auto: the cores divided among the jobs). Results do not depend on
  ``jobs``; the thread count can change float rounding.
- ``device`` [cpu]; ``out`` [reports/compare for compare, runs/<method> for train];
  ``keep_checkpoint`` [none for compare, last for train]: which checkpoint a finished run keeps
  (``last``, ``best`` (the selected epoch) or ``none``; a run being trained always has one, so
  an interrupted run resumes).

YAML numbers are read as people write them: ``1e-4`` is a float (plain PyYAML reads it as a
string). Errors name the field: ``optimizer.lr must be a positive number, got '1e-3x'``.

Example:
    >>> exp = Experiment.from_dict({"optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    ...                             "methods": ["ew", "mgda"]})
    >>> exp = exp.with_overrides(["hparams.mgda.normalization=l2", "scheduler.name=cosine"])
    >>> exp.optimizer.lr, exp.hparams, exp.scheduler.name
    (0.1, {'mgda': {'normalization': 'l2'}}, 'cosine')
    >>> parse_yaml("lr: 1e-3")
    {'lr': 0.001}
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtlkit.train.optimizers import Schedule, check_optimizer

if TYPE_CHECKING:
    from torch import nn

    from mtlkit.data import DatasetBundle
    from mtlkit.train.trainer import RunResult, TrainConfig

#: A representative default set: plain sum, four loss weightings, five gradient methods.
DEFAULT_METHODS = ("ew", "uw", "dwa", "rlw", "famo", "mgda", "pcgrad", "cagrad", "imtl", "nash_mtl")
#: ``delta_m`` choices: Δm% over every metric, or over each task's primary metric.
DELTA_M = ("all_metrics", "per_task")
#: What ``--quick`` sets (where the config leaves it unset): a set-up check, not a result.
QUICK = {"epochs": 1, "max_steps": 5, "max_samples": 64}


@dataclass
class Optimizer:
    """The ``optimizer`` section (see the module docstring)."""

    name: str = "adam"
    lr: float = 3e-3
    weight_decay: float = 0.0
    momentum: float = 0.0
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])

    def validate(self) -> None:
        check_optimizer(self.name, self.momentum, self.nesterov, self.betas, "optimizer")
        if not _positive(self.lr):
            raise ValueError(f"optimizer.lr must be a positive number, got {self.lr!r}")
        if not _number(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay must be a number >= 0, "
                             f"got {self.weight_decay!r}")


_SECTIONS: dict[str, type] = {"optimizer": Optimizer, "scheduler": Schedule}


@dataclass
class Experiment:
    """A comparison or a training run, as data (fields: see the module docstring)."""

    dataset: str = "multidigits"
    root: str | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    max_samples: int | None = None
    model: str | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: int | list[int] = 1
    epochs: int = 40
    max_steps: int | None = None
    batch_size: int = 64
    optimizer: Optimizer = field(default_factory=Optimizer)
    # A schedule driven by validation, not by the budget: a run that early stopping ends is then
    # the same under any larger budget (only runs flagged as still improving can change).
    scheduler: Schedule = field(default_factory=lambda: Schedule(name="plateau", patience=2))
    task_lr: dict[str, float] = field(default_factory=dict)
    grad_clip: float | None = None
    eval_every: int = 1
    cosine_every: int = 25
    patience: int | None = 5
    min_delta: float = 0.005
    baselines: dict[str, float] = field(default_factory=dict)
    delta_m: str = "all_metrics"
    device: str = "cpu"
    amp: str | None = None
    jobs: int | str = "auto"
    threads: int | str = "auto"
    out: str | None = None
    keep_checkpoint: str | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> Experiment:
        """Build and validate from parsed YAML/JSON; unknown fields are an error.

        ``optimizer`` and ``scheduler`` may be a mapping or just a name (``scheduler: cosine``).
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: must hold a mapping of field: value")  # noqa: TRY004
        data = dict(data)
        names = [f.name for f in fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; fields are {sorted(names)}")
        for key, section in _SECTIONS.items():
            if key in data and not isinstance(data[key], section):
                data[key] = _section(section, key, data[key])
        exp = cls(**data)
        exp.validate()
        return exp

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Experiment:
        """Read a YAML (or JSON) config file."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config: no file {p}")
        return cls.from_dict(read_config_file(p), source=f"config {p}")

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain data (what ``results.json`` records and YAML can hold)."""
        return asdict(self)

    def with_overrides(self, items: Iterable[str]) -> Experiment:
        """A copy with ``key=value`` overrides (dotted keys reach into sections and maps:
        ``optimizer.lr=1e-4``, ``hparams.mgda.grad_on=features``); values are YAML."""
        data = self.to_dict()
        for item in items:
            apply_override(data, item)
        return Experiment.from_dict(data, source="--set")

    def replace(self, **changes: Any) -> Experiment:
        """A validated copy with some fields changed."""
        return Experiment.from_dict({**self.to_dict(), **changes})

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Field checks that need no data; each error names its field."""
        from mtlkit import balancers
        from mtlkit.train.trainer import KEEP, check_device

        _check_spec("dataset", self.dataset)
        if self.model is not None:
            _check_spec("model", self.model)
        for name in ("dataset_options", "model_options", "hparams", "task_lr", "baselines"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a mapping, got {getattr(self, name)!r}")  # noqa: TRY004
        _model_sections(self.model_options)
        if self.root is not None and not isinstance(self.root, (str, os.PathLike)):
            raise ValueError(f"root must be a folder path, got {self.root!r}")
        if not isinstance(self.methods, list) or not self.methods:
            raise ValueError("methods must be a non-empty list of balancer names")
        known = balancers.available()
        for m in self.methods:
            if m not in known:
                raise ValueError(f"methods: unknown method {m!r}; available: {', '.join(known)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must not repeat a name, got {self.methods}")
        for m, hp in self.hparams.items():
            if m not in self.methods:
                raise ValueError(f"hparams.{m}: {m!r} is not one of the methods {self.methods}")
            if not isinstance(hp, dict):
                raise ValueError(f"hparams.{m} must be a mapping of hyperparameters")  # noqa: TRY004
        self.seed_list()
        for name in ("epochs", "batch_size", "eval_every"):
            if not _int(getattr(self, name), 1):
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not _int(self.cosine_every, 0):
            raise ValueError(f"cosine_every must be an integer >= 0, got {self.cosine_every!r}")
        for name in ("max_steps", "max_samples", "patience"):
            v = getattr(self, name)
            if v is not None and not _int(v, 1):
                raise ValueError(f"{name} must be an integer >= 1 or null, got {v!r}")
        if isinstance(self.min_delta, bool) or not (_number(self.min_delta)
                                                    and 0 <= self.min_delta < math.inf):
            raise ValueError(f"min_delta must be a number >= 0, got {self.min_delta!r}")
        if not isinstance(self.optimizer, Optimizer):
            raise ValueError(f"optimizer must be a mapping, got {self.optimizer!r}")  # noqa: TRY004
        self.optimizer.validate()
        if not isinstance(self.scheduler, Schedule):
            raise ValueError(f"scheduler must be a mapping, got {self.scheduler!r}")  # noqa: TRY004
        self.scheduler.validate()
        for t, v in self.task_lr.items():
            if not _positive(v):
                raise ValueError(f"task_lr.{t} must be a positive number, got {v!r}")
        for k, v in self.baselines.items():
            if not isinstance(k, str) or "/" not in k:
                raise ValueError(f"baselines: keys are task/metric (e.g. seg/miou), got {k!r}")
            if not (_number(v) and math.isfinite(v)):
                raise ValueError(f"baselines.{k} must be a finite number, got {v!r}")
        if self.delta_m not in DELTA_M:
            raise ValueError(f"delta_m must be one of {list(DELTA_M)}, got {self.delta_m!r}")
        if self.grad_clip is not None and not _positive(self.grad_clip):
            raise ValueError(f"grad_clip must be a positive number or null, got {self.grad_clip!r}")
        if not isinstance(self.device, str):
            raise ValueError(f"device must be a string, got {self.device!r}")  # noqa: TRY004
        check_device(self.device)
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be bf16, fp16 or null, got {self.amp!r}")
        for name in ("jobs", "threads"):
            v = getattr(self, name)
            if v != "auto" and not _int(v, 1):
                raise ValueError(f"{name} must be an integer >= 1 or auto, got {v!r}")
        if self.out is not None and not isinstance(self.out, (str, os.PathLike)):
            raise ValueError(f"out must be a folder path, got {self.out!r}")
        if self.keep_checkpoint is not None and self.keep_checkpoint not in KEEP:
            raise ValueError(f"keep_checkpoint must be one of {list(KEEP)}, "
                             f"got {self.keep_checkpoint!r}")

    def seed_list(self) -> list[int]:
        """The seeds: ``range(seeds)`` for a count, else the list itself."""
        s = self.seeds
        if _int(s, 1):
            return list(range(int(s)))  # type: ignore[arg-type]
        if isinstance(s, list) and s and all(_int(v, 0) for v in s) and len(set(s)) == len(s):
            return list(s)
        raise ValueError(f"seeds must be a count >= 1 or a list of distinct integers >= 0, "
                         f"got {s!r}")

    def parallelism(self, runs: int) -> tuple[int, int]:
        """(processes, torch threads per process) for ``runs`` independent runs.

        ``auto`` on CPU: one process per core (at most one per run), each with an even share
        of the cores; one process on an accelerator or under ``torchrun``. Small models train
        much faster this way than one process with several threads (a thread per core per
        process; with more threads than free cores, OpenMP's spinning threads slow every step
        down many times over).
        """
        from mtlkit.engine._dist import world_size

        cores = _cores()
        if self.jobs != "auto":
            jobs = int(self.jobs)
        elif self.device != "cpu" or world_size() > 1:
            jobs = 1
        else:
            jobs = max(1, min(cores, runs))
        threads = int(self.threads) if self.threads != "auto" else max(1, cores // jobs)
        return jobs, threads

    # ------------------------------------------------------------------ what a run needs
    def train_config(self, seed: int, *, keep: str = "none") -> TrainConfig:
        from mtlkit.train.trainer import TrainConfig

        opt = self.optimizer
        return TrainConfig(
            epochs=self.epochs, max_steps=self.max_steps, batch_size=self.batch_size,
            lr=opt.lr, task_lr=dict(self.task_lr), weight_decay=opt.weight_decay,
            optimizer=opt.name, momentum=opt.momentum, nesterov=opt.nesterov,
            betas=(float(opt.betas[0]), float(opt.betas[1])),
            scheduler=copy.deepcopy(self.scheduler), grad_clip=self.grad_clip,
            eval_every=self.eval_every, cosine_every=self.cosine_every,
            patience=self.patience, min_delta=self.min_delta,
            keep=self.keep_checkpoint or keep, seed=seed,
            device=self.device, progress=False, amp=self.amp,
        )

    def load_data(self) -> DatasetBundle:
        """The dataset bundle, cut to ``max_samples`` per split when set."""
        from mtlkit.data import load

        bundle = load(self.dataset, root=self.root, **self.dataset_options)
        if self.max_samples is None:
            return bundle
        from dataclasses import replace

        from torch.utils.data import Subset

        def cut(ds: Any) -> Any:
            if hasattr(ds, "head"):  # multi-input data: the first N samples of each task
                return ds.head(int(self.max_samples))  # type: ignore[arg-type]
            n = min(len(ds), int(self.max_samples))  # type: ignore[arg-type]
            return ds if n == len(ds) else Subset(ds, range(n))

        cut_bundle: DatasetBundle = replace(bundle, train=cut(bundle.train), val=cut(bundle.val),
                                            test=cut(bundle.test))
        return cut_bundle

    def model_options_for(self, model: str) -> dict[str, Any]:
        """The options of ``model_options`` that ``model`` is built with: its own section (the
        key naming it), then the plain options, which win.

        Example:
            >>> exp = Experiment(model_options={"nddr": {"init": [0.8, 0.2]}, "layers": [1] * 4})
            >>> exp.model_options_for("nddr"), exp.model_options_for("mtan")
            ({'init': [0.8, 0.2], 'layers': [1, 1, 1, 1]}, {'layers': [1, 1, 1, 1]})
        """
        sections = _model_sections(self.model_options)
        plain = {k: v for k, v in self.model_options.items() if k not in sections}
        return {**copy.deepcopy(sections.get(model, {})), **plain}

    def model_spec(self, bundle: DatasetBundle) -> tuple[str, dict[str, Any]]:
        """``(model, options)``: the config's model, or the dataset's default (its options
        updated by ``model_options``); options as :meth:`model_options_for` picks them."""
        if self.model is None:
            return bundle.model, {**dict(bundle.model_options),
                                  **self.model_options_for(bundle.model)}
        return self.model, self.model_options_for(self.model)

    def build_model(self, bundle: DatasetBundle, tasks: Sequence[Any]) -> nn.Module:
        from mtlkit.train.models import build_model

        name, options = self.model_spec(bundle)
        try:
            return build_model(name, tasks, bundle.input_shape, **options)
        except TypeError as err:  # a wrong option: name the field
            raise ValueError(f"model_options: {err}{_section_hint(self.model_options, err)}"
                             ) from None

    def run_settings(self, method: str, model: str, options: Mapping[str, Any]
                     ) -> dict[str, Any]:
        """What, beyond the trainer's own settings, names a run (compared on resume)."""
        return {"dataset": self.dataset, "dataset_options": self.dataset_options,
                "root": None if self.root is None else str(self.root),
                "max_samples": self.max_samples, "model": model, "model_options": dict(options),
                "method_name": method, "hparams": self.hparams.get(method, {})}


# ---------------------------------------------------------------------- entry points
def _cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def as_experiment(config: Experiment | Mapping[str, Any] | str | os.PathLike[str] | None
                  ) -> Experiment:
    """An :class:`Experiment` from an experiment, a dict of fields, or a config file path."""
    if config is None:
        return Experiment()
    if isinstance(config, Experiment):
        config.validate()
        return config
    if isinstance(config, Mapping):
        return Experiment.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return Experiment.from_file(config)
    raise TypeError(f"config must be an Experiment, a mapping or a file path, got {type(config)}")


def compare(config: Experiment | Mapping[str, Any] | str | os.PathLike[str] | None = None, *,
            resume: bool = False, report: bool = True,
            log: Callable[[str], None] | None = None, **fields_: Any) -> dict[str, Any]:
    """Run a comparison: single-task baselines, then every method for every seed; write
    ``results.json`` (and the report, with ``report``) into ``out`` and return the results.

    Args:
        config: an :class:`Experiment`, a mapping of its fields, or a YAML file path.
        resume: continue an interrupted comparison in ``out`` (finished runs are kept).
        report: write ``report.md`` / ``report.html`` and the plots too.
        log: called with a line of progress per run (default: silent).
        **fields_: fields that replace the config's (``epochs=2``).

    Example:
        >>> # results = mtlkit.compare({"methods": ["ew", "mgda"], "epochs": 2}, out="runs/c")
        >>> # results["methods"]["mgda"]["delta_m"]["mean"]
    """
    from mtlkit.engine._dist import rank
    from mtlkit.train.compare import run_compare

    exp = as_experiment(config)
    if fields_:
        exp = exp.replace(**fields_)
    if exp.out is None:
        exp = exp.replace(out="reports/compare")
    check_out_dir(exp.out)  # type: ignore[arg-type]
    results = run_compare(exp, log=log or (lambda s: None), resume=resume)
    if report and rank() == 0:
        from mtlkit.train.report import write_report

        write_report(exp.out)
    return results


def train(config: Experiment | Mapping[str, Any] | str | os.PathLike[str] | None = None, *,
          resume: bool = False, seed: int | None = None, **fields_: Any) -> RunResult:
    """Train the first method of ``methods`` into ``out`` (``runs/<method>`` by default) and
    return its :class:`~mtlkit.train.RunResult`; ``resume`` continues from its checkpoint.

    Example:
        >>> # result = mtlkit.train({"methods": ["dwa"], "epochs": 3, "out": "runs/dwa"})
        >>> # result.selected_epoch, result.test["sum/mae"]
    """
    from mtlkit.train.compare import train_one

    exp = as_experiment(config)
    if fields_:
        exp = exp.replace(**fields_)
    if exp.out is None:
        exp = exp.replace(out=f"runs/{exp.methods[0]}")
    check_out_dir(exp.out)  # type: ignore[arg-type]
    return train_one(exp, seed=exp.seed_list()[0] if seed is None else seed, resume=resume)


def check_out_dir(out: str | os.PathLike[str]) -> Path:
    """Create the output folder; ValueError (naming it) if it is a file or not writable."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"out: {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".mtlkit-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"out: cannot write into {path} ({err.strerror or err})") from None
    return path


# ---------------------------------------------------------------------- YAML and overrides
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)


def _loader() -> type:
    try:
        import yaml
    except ImportError:
        raise ValueError("reading a YAML config needs PyYAML: pip install 'mtlkit[cli]'") from None

    class Loader(yaml.SafeLoader):
        """SafeLoader that reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    return Loader


def parse_yaml(text: str, source: str = "config") -> Any:
    """Parse YAML with numbers read as people write them (``1e-3`` is a float)."""
    loader = _loader()  # a clear error where PyYAML is not installed
    import yaml

    try:
        return yaml.load(text, Loader=loader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{source} is not valid YAML{where} "
                         f"({getattr(err, 'problem', None) or err.__class__.__name__})") from None


def read_config_file(path: Path) -> dict[str, Any]:
    data = parse_yaml(path.read_text(), source=f"config {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config {path}: must hold a mapping of field: value")  # noqa: TRY004
    return data


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``key.sub=value`` to a dict of fields, in place (value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"--set expects key=value, got {item!r}")
    value = parse_yaml(raw, source=f"--set {key}") if raw.strip() else None
    parts = key.split(".")
    if parts[0] not in {f.name for f in fields(Experiment)}:
        raise ValueError(f"--set {key}: unknown field {parts[0]!r}; fields are "
                         f"{sorted(f.name for f in fields(Experiment))}")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str) and parts[0] in _SECTIONS and i == 0:
            child = node[part] = {"name": child}
        if not isinstance(child, dict):
            raise ValueError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a mapping")  # noqa: TRY004
        node = child
    node[parts[-1]] = value


def _section(cls: type, key: str, value: Any) -> Any:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping):
        raise ValueError(f"{key} must be a mapping or a name, got {value!r}")  # noqa: TRY004
    names = [f.name for f in fields(cls)]
    unknown = [k for k in value if k not in names]
    if unknown:
        raise ValueError(f"{key}: unknown field(s) {unknown}; fields are {names}")
    return cls(**dict(value))


def _check_spec(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a registered name or package.module:function, "
                         f"got {value!r}")
    if ":" in value:
        module, _, attr = value.partition(":")
        if not module or not attr.isidentifier():
            raise ValueError(f"{name}: {value!r} is not of the form package.module:function")
        return
    if name == "dataset":
        from mtlkit.data import available

        names = available()
    else:
        from mtlkit.train.models import available_models

        names = available_models()
    if value not in names:
        raise ValueError(f"{name}: unknown {name} {value!r}; available: {', '.join(names)} "
                         f"(or package.module:function)")


def _model_sections(options: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-model sections of ``model_options``: keys naming a registered model or a
    ``package.module:function``; each must be a mapping (a one-line error names it)."""
    from mtlkit.train.models import available_models

    names = set(available_models())
    sections: dict[str, dict[str, Any]] = {}
    for key, value in options.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"model_options: keys are option or model names, got {key!r}")
        if key in names or ":" in key:
            if ":" in key:
                _check_spec(f"model_options.{key}", key)
            if not isinstance(value, dict):
                raise ValueError(f"model_options.{key} must be a mapping of options for the "
                                 f"model {key!r}, got {value!r}")
            sections[key] = value
    return sections


def _section_hint(options: Mapping[str, Any], err: Exception) -> str:
    """``(did you mean ...)`` when an option the model refused looks like a misspelt model
    section (a mapping under a name close to a registered model's)."""
    import difflib

    from mtlkit.train.models import available_models

    for key, value in options.items():
        if isinstance(value, dict) and f"'{key}'" in str(err):
            close = difflib.get_close_matches(key, available_models(), n=1, cutoff=0.8)
            if close:
                return (f" (model_options.{key}: a model's own options go under its "
                        f"registered name; did you mean {close[0]!r}?)")
    return ""


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v: Any) -> bool:
    return _number(v) and v > 0


def _int(v: Any, minimum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum
