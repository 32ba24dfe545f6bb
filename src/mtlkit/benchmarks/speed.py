"""Speed benchmark: step time and peak memory of each balancer, relative to a plain sum.

Three problems (built in plain torch, :mod:`mtlkit.benchmarks._models`):

* ``tiny``: a 3-task MLP (Linear-ReLU-Linear-ReLU encoder, one linear regression head per
  task, mean-squared error), where a balancer's own bookkeeping (validation, stacking the
  losses, the finiteness check) is a visible share of the step: the loss weightings' target;
* ``dense``: a small ResNet-style encoder (stem and four residual blocks, output stride 4) with
  three dense convolutional heads (segmentation, depth, normals), K = 3;
* ``many``: the same encoder, globally pooled, with 40 linear binary classifiers, K = 40.

Default sizes (dense and many chosen so that one full run with ``--peers`` and the default methods fitted in 10
minutes on 2 shared CPU cores: 332-376 s measured, 20 methods and 9 peers, 9 repeats of
measurements of at least 0.3 s; the ten methods of issue 11 and their nine peers, added since,
took 15 minutes alone for both problems with 5 repeats on a heavily loaded machine (load 13-15
on 2 cores), so a full default run now takes longer: pass ``--methods`` for a subset;
``--quick`` is a set-up check, not a measurement):

==========  ======  =====  =====  =============  =================
problem     batch   input  width  shared params  task-specific
==========  ======  =====  =====  =============  =================
tiny        256     32     64     6,272          195 (3 heads)
dense       8       48x48  8      24,296         28,203 (3 heads)
many        16      16x16  8      24,296         1,320 (40 heads)
resnet18    8       64x64  -      11,176,512     20,520 (40 heads)
==========  ======  =====  =====  =============  =================

``resnet18`` (opt in with ``--suites resnet18``) is the ``many`` problem on a ResNet-18 trunk,
where the K x P Jacobian (1.8 GB) decides the memory: ``strategy="auto"`` takes the Gram-only
path there (``mgda[strategy=batched]`` is the Jacobian path, for comparison).

A step is: zero the gradients, forward, ``balancer.backward(losses, shared=encoder parameters,
features=encoder output)``, an SGD step (learning rate 0, so every step sees the same inputs),
and ``after_step`` (with a no-grad forward for the post-step losses) for the methods that need
it (FAMO). The reference is the plain sum: ``sum(losses).backward()`` with the same forward and
optimiser step.

**Time.** Every method runs ``--steps`` steps per repeat (at least; a fast method runs as many as
fill ``--min-time`` seconds, 0.3 by default), and the plain sum runs before and after each
method (one chain: the sum after a method is the sum before the next, across repeats, so every
plain-sum measurement follows a method); the method's ratio in a repeat is its mean step time
over the mean of those two plain-sum measurements. The table shows the median ratio over ``--repeats``
repeats, all in one process (absolute times are printed for information only). On CPU the clock
is the process's CPU time (``time.process_time``) and torch runs on ``--threads`` threads (1 by
default): on a shared machine wall-clock time mostly measures the other processes, and two
OpenMP threads competing for two busy cores made steps up to 20x slower and 10x noisier in our
measurements. On CUDA the clock is wall time with a device synchronisation around each
measurement. A method with a TorchJD peer is measured back to back with it (alternating which goes
first) between the same two plain-sum measurements, and ``ours/torchjd time`` is the median
over repeats of (our step time / TorchJD's step time) in those adjacent measurements, with its
range over the repeats beside it as a noise gauge: on a shared machine the speed drifts by
10-30 % within a minute, far more than the differences measured.

**Memory.** Peak bytes allocated by torch during one step above what is allocated before it
(parameters, optimiser state, the batch; gradients released): on CUDA
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on CPU, where
``tracemalloc`` does not see torch's allocations and the resident set size mostly measures
allocator caching, the running maximum of ``torch.profiler``'s memory events (each allocation
and release of torch's CPU allocator). Both count exactly what torch allocates, the same way for
every method and for the peers.

**Trunk passes.** How many backward passes went through the bottom of the encoder in one step
(a gradient hook on the stem's output; a vectorised backward over several tasks counts once).
A plain sum and every loss-weighting method: 1; features mode: 1; parameters mode: one per chunk
of tasks, or K where ``strategy="auto"`` loops (few tasks on CPU, see
:func:`mtlkit.engine._grads.auto_strategy`).

**Targets** (column ``target``, verdict ``PASS`` / ``MISS`` in ``result``): loss-weighting
methods (``requires == "losses"``) ``time/sum <= 1.05``, and those whose step has a no-grad
forward for ``after_step`` by definition (FAMO's default) ``time/(sum+forward) <= 1.05``,
against ``sum+forward`` (a plain sum's step plus that forward), measured back to back with the
method in each repeat like a peer (the median of those ratios follows the verdict, in
parentheses); ``grad_on="features"`` at K=3 ``time/sum <= 1.5``; parameter-level methods that
TorchJD also implements ``ours/torchjd time <= 1.00`` (K=3 and K=40) and at K=40 also
``ours/torchjd mem <= 0.50``. Other rows have no target (``-``).

**Peers** (``--peers``): for methods TorchJD implements, a step with
``torchjd.autojac.mtl_backward(losses, features=...)`` followed by ``jac_to_grad(shared,
aggregator)`` with the matching aggregator, on the same model, batch and process, with
TorchJD's defaults; the table prints its ratios beside ours. LibMTL's weightings are coupled to
its trainer and are not timed; whether it imports is reported.

**Compiled vs eager** (``--compile``; backend ``--compile-backend``, inductor by default): a
second table per problem times each method's step with the model's encoder and heads
``torch.compile``-d (in place, each its own graph) beside the same step on an eager copy of the
model, back to back in each repeat; ``compiled/eager`` is the median over the repeats of the
ratio of those two step times. The compiled step runs at least twice before it is timed (the
first call compiles). Compiled with ``torch._functorch.config.donated_buffer=False``: with
donated buffers, a compiled backward first called by a plain backward pass (the sum's) refuses
any later pass that keeps the graph, as the per-task passes of parameters mode do.

**Methods** (``--methods``; by default from the registry, see :func:`default_methods`: every
loss weighting on ``tiny``; every gradient method and ew, uw, dwa, famo on ``dense`` and
``many``; a newly registered method is measured without an edit here) are registry names; ``NAME@features`` sets ``grad_on="features"``, and
``NAME[option=value;...]`` passes constructor options (e.g. ``mgda[chunk_size=4]`` or
``ew[check_finite=False]``, to compare settings side by side in one run).

Usage::

    mtlkit bench speed [--quick] [--device cuda] [--methods mgda,upgrad] [--peers]
    mtlkit bench speed --suites tiny --repeats 15   # the loss weightings' overhead
    mtlkit bench speed --suites dense --methods ew,mgda,upgrad --compile   # compiled vs eager
    python bench/speed.py --quick
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import importlib
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mtlkit import balancers
from mtlkit.benchmarks._models import PassCounter, Suite, build, suites

for _module in ("_gradnorm", "_gramian", "_mgda", "_surgery"):  # register the gradient methods
    importlib.import_module(f"mtlkit.balancers.{_module}")

PLAIN_SUM = "sum"
#: The plain sum plus one no-grad forward pass of the batch: the reference of a method that
#: must see the losses after the optimiser step (FAMO's default), whose step has that forward
#: by definition. Measured when such a method is.
SUM_FORWARD = "sum+forward"
#: Settings measured beside a method's defaults, in the same run (each right after its method).
VARIANTS = ("ew[check_finite=False]", "famo[update=next_batch]", "grad_norm_scaling@features",
            "mgda@features", "upgrad@features")
#: Loss weightings measured on the dense and many problems (every loss weighting is measured
#: on tiny, where its target is: there the bookkeeping is a visible share of the step).
LOSS_ON_LARGE = ("ew", "uw", "dwa", "famo")
#: Registered methods that are not measured by default, and why.
NOT_BY_DEFAULT = {"torchjd": "a wrapper of TorchJD's weightings (--peers times TorchJD itself)"}
#: The per-step context the benchmark supplies to methods that declare it (a fixed KPI for DTP).
CONTEXT: dict[str, Callable[[tuple[str, ...]], Any]] = {
    "kpi": lambda tasks: dict.fromkeys(tasks, 0.5),
}
#: Context of a second or held-out batch, which the step function supplies itself.
EXTRA_BATCH_KEYS = ("second_losses", "held_out", "parameters")
#: Targets of issue 3 (see the module docstring).
LOSS_TIME, FEATURES_TIME, PEER_TIME, PEER_MEM = 1.05, 1.5, 1.00, 0.50

# Our registry name -> TorchJD aggregator with the same definition (see tests/balancers/
# test_grad_torchjd.py for the conventions that differ).
PEERS: dict[str, Callable[[int], Any]] = {
    "mgda": lambda k: _tjd().MGDA(),
    "pcgrad": lambda k: _tjd().PCGrad(),
    "graddrop": lambda k: _tjd().GradDrop(),
    "gradvac": lambda k: _tjd().GradVac(),
    "cagrad": lambda k: _tjd().CAGrad(c=0.4),
    "imtl": lambda k: _tjd().IMTLG(),
    "nash_mtl": lambda k: _tjd().NashMTL(n_tasks=k),
    "aligned_mtl": lambda k: _tjd().AlignedMTL(),
    "upgrad": lambda k: _tjd().UPGrad(),
    "config": lambda k: _tjd().ConFIG(),
    "dualproj": lambda k: _tjd().DualProj(),
    "cr_mogm": lambda k: _tjd().GramianWeightedAggregator(
        _tjd().CRMOGMWeighting(_tjd().MGDAWeighting())),
    "fairgrad": lambda k: _tjd().FairGrad(alpha=2.0),
    "krum": lambda k: _tjd().Krum(n_byzantine=0),
    "trimmed_mean": lambda k: _tjd().TrimmedMean(trim_number=1),
    "pcd": lambda k: _tjd().PCD(),
    "excess_mtl": lambda k: _tjd().ExcessMTL(),
    "imtl_l": lambda k: _tjd_scalarization().IMTLL(k),
}
#: Peers that are TorchJD scalarizers (one backward pass of ``scalarizer(losses)``), not
#: aggregators.
SCALARIZER_PEERS = {"imtl_l"}
# Weightings of J1 J2' (two independent batches; here two forward passes of the same batch):
# the peer step runs TorchJD's ``jac`` on each batch's losses, then backpropagates the mean of
# the two batches' losses weighted by the weighting's output, as TorchJD's own example.
CROSS_PEERS: dict[str, Callable[[int], Any]] = {
    "modo": lambda k: _tjd().MoDoWeighting(gamma=1e-3, rho=0.1),
    "sdmgrad": lambda k: _tjd().SDMGradWeighting(),
}


def default_methods(suite: str) -> list[str]:
    """The methods measured when ``--methods`` is not given, from the registry: on ``tiny``
    every loss weighting, elsewhere every gradient method and ``LOSS_ON_LARGE``; in both, only
    methods that build from their defaults (a required hyperparameter, such as ``fixed``'s
    weights, is not guessed) and whose context the benchmark supplies (``CONTEXT``), and the
    ``VARIANTS`` of the methods chosen. A newly registered method is measured with no edit
    here."""
    out: list[str] = []
    for name in balancers.available():
        cls = balancers.get(name)
        required = [p for p in balancers.hyperparameters(cls).values() if p.default is p.empty]
        if (name in NOT_BY_DEFAULT or required
                or any(key not in CONTEXT and key not in EXTRA_BATCH_KEYS
                       for key in cls.context_keys)):
            continue
        loss = cls.requires == "losses"
        if (suite == "tiny") == loss or (loss and name in LOSS_ON_LARGE):
            out.append(name)
            out.extend(v for v in VARIANTS if Spec(v).name == name
                       and (suite != "tiny" or Spec(v).grad_on is None))
    return out


def _tjd() -> Any:
    from torchjd import aggregation

    return aggregation


def _tjd_scalarization() -> Any:
    from torchjd import scalarization

    return scalarization


@dataclass(frozen=True)
class Spec:
    """A method as written on the command line: ``name``, ``name@features``, optionally followed
    by ``[option=value;...]``; the plain sum is ``sum``; ``torchjd:name`` is the peer of
    ``name``."""

    key: str

    @property
    def peer(self) -> bool:
        return self.key.startswith("torchjd:")

    @property
    def _base(self) -> str:
        return self.key.removeprefix("torchjd:").split("[")[0]

    @property
    def name(self) -> str:
        return self._base.split("@")[0]

    @property
    def grad_on(self) -> str | None:
        return "features" if self._base.endswith("@features") else None

    @property
    def options(self) -> dict[str, Any]:
        if "[" not in self.key:
            return {}
        body = self.key.split("[", 1)[1]
        if not body.endswith("]"):
            raise ValueError(f"method {self.key!r}: options must be written NAME[opt=value;...]")
        out: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in body[:-1].split(";"))):
            opt, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"method {self.key!r}: option {item!r} is not opt=value")
            try:
                out[opt.strip()] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                out[opt.strip()] = value.strip()
        return out

    @property
    def peer_key(self) -> str | None:
        """The TorchJD peer timed beside this method (parameters mode only)."""
        if self.peer or self.key == PLAIN_SUM or self.grad_on is not None:
            return None
        return f"torchjd:{self.name}" if self.name in PEERS or self.name in CROSS_PEERS else None


class Problem:
    """A model, its batch and the step functions of the methods, on one device."""

    def __init__(self, suite: Suite, device: torch.device,
                 compile_backend: str | None = None) -> None:
        torch.manual_seed(0)
        self.suite = suite
        self.device = device
        self.model = build(suite).to(device)
        if compile_backend is not None:
            # torch.compile of the model's modules, in place (the parameters stay the same
            # objects): the encoder and each head is its own graph, so the features are a
            # tensor between two compiled graphs and grad_on="features" works too.
            self.model.encoder.compile(backend=compile_backend)
            for head in self.model.heads.values():
                head.compile(backend=compile_backend)
        self.batch = self.model.make_batch(suite, device)
        self.shared = list(self.model.encoder.parameters())
        #: what each of our methods ``requires`` (losses, gramian, ...), filled by step_fn
        self.requires: dict[str, str] = {}
        #: the methods whose step runs a no-grad forward for ``after_step``, filled by step_fn
        self.after_step: set[str] = set()

    def step_fn(self, spec: Spec) -> Callable[[], None]:
        model, batch, shared = self.model, self.batch, self.shared
        if spec.key in (PLAIN_SUM, SUM_FORWARD):
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            forward_after = spec.key == SUM_FORWARD

            def plain() -> None:
                opt.zero_grad(set_to_none=True)
                losses, _ = model.losses(*batch)
                sum(losses.values()).backward()
                opt.step()
                if forward_after:
                    with torch.no_grad():
                        model.losses(*batch)

            return plain
        if spec.peer and spec.name in SCALARIZER_PEERS:
            scalarizer = PEERS[spec.name](len(self.suite.tasks)).to(self.device)
            opt = torch.optim.SGD([*model.parameters(), *scalarizer.parameters()], lr=0.0)

            def peer_scalarizer() -> None:
                opt.zero_grad(set_to_none=True)
                losses, _ = model.losses(*batch)
                scalarizer(torch.stack(list(losses.values()))).backward()
                opt.step()

            return peer_scalarizer
        if spec.peer and spec.name in CROSS_PEERS:
            from torchjd.autojac import jac

            weighting = CROSS_PEERS[spec.name](len(self.suite.tasks))
            opt = torch.optim.SGD(model.parameters(), lr=0.0)

            def cross_peer() -> None:
                opt.zero_grad(set_to_none=True)
                both = [torch.stack(list(model.losses(*batch)[0].values())) for _ in range(2)]
                j1, j2 = (torch.cat([g.flatten(1) for g in jac(v, shared, retain_graph=True)], 1)
                          for v in both)
                weights = weighting(j1 @ j2.T)
                ((both[0] + both[1]) / 2).backward(weights)
                opt.step()

            return cross_peer
        if spec.peer:
            from torchjd.autojac import jac_to_grad, mtl_backward

            aggregator = PEERS[spec.name](len(self.suite.tasks))
            opt = torch.optim.SGD(model.parameters(), lr=0.0)

            def peer() -> None:
                opt.zero_grad(set_to_none=True)
                losses, z = model.losses(*batch)
                mtl_backward(list(losses.values()), features=z)
                jac_to_grad(shared, aggregator)
                opt.step()

            return peer
        hparams = {"grad_on": spec.grad_on} if spec.grad_on else {}
        hparams.update(spec.options)
        balancer = balancers.create(spec.name, tasks=list(self.suite.tasks), **hparams)
        balancer.to(self.device)
        # A bilevel method is no plain loss weighting: the 1.05x target is not its.
        self.requires[spec.key] = (f"{balancer.requires}, held-out batch"
                                   if balancer.needs_held_out_batch
                                   else balancer.requires)
        if balancer.needs_after_step:
            self.after_step.add(spec.key)
        opt = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.0)
        missing = [key for key in balancer.context_keys
                   if key not in CONTEXT and key not in EXTRA_BATCH_KEYS]
        if missing:
            raise SystemExit(f"method {spec.key!r} needs the context {missing}, which the "
                             "benchmark does not supply")
        context = {key: CONTEXT[key](self.suite.tasks) for key in balancer.context_keys
                   if key in CONTEXT}

        # What the step needs is read once, as a training loop knows it.
        second, held_out = balancer.needs_second_batch, balancer.needs_held_out_batch
        after_step = balancer.needs_after_step

        def ours() -> None:
            opt.zero_grad(set_to_none=True)
            losses, z = model.losses(*batch)
            # A second forward of the same batch stands in for a second batch (MoDo, SDMGrad)
            # or a held-out batch (Auto-Lambda).
            extra: dict[str, Any] = {}
            if second:
                extra = {"second_losses": model.losses(*batch)[0]}
            elif held_out:
                extra = {"held_out": lambda: model.losses(*batch)[0],
                         "parameters": list(model.parameters())}
            balancer.backward(losses, shared=shared, features=z, **context, **extra)
            opt.step()
            if after_step:
                with torch.no_grad():
                    balancer.after_step(model.losses(*batch)[0])

        return ours


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device) -> Callable[[], float]:
    """Process CPU time on CPU (robust to other processes on a shared machine), wall time on
    CUDA (the device's work is not CPU time)."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def _timed(step: Callable[[], None], n: int, device: torch.device) -> float:
    clock = _clock(device)
    _sync(device)
    start = clock()
    for _ in range(n):
        step()
    _sync(device)
    return (clock() - start) / n


@dataclass
class Times:
    """Per-repeat ratios (method time / plain-sum time), the plain-sum step times, and for each
    method with a partner (its TorchJD peer, or ``sum+forward`` for a method with an after-step
    forward) the per-repeat (our time / partner's time) measured back to back."""

    ratios: dict[str, list[float]]
    base: list[float]
    paired: dict[str, list[float]]

    def median(self, key: str) -> float:
        return statistics.median(self.ratios[key])

    def versus(self, key: str) -> list[float]:
        """Per-repeat (our step time / the partner's), the two measured one after the other."""
        return self.paired[key]


def measure_times(problem: Problem, specs: list[Spec], fns: dict[str, Callable[[], None]],
                  repeats: int, steps: int, warmup: int, min_time: float = 0.0) -> Times:
    """Ratios of each method's step time to the plain sum's, measured around it in each repeat.

    Each measurement runs ``steps`` steps, or more for a fast method: as many as fill
    ``min_time`` seconds by the last warm-up step's time (cheap methods, whose targets are the
    tightest, get the most steps). A method with a peer among ``fns`` is measured back to back
    with it (which goes first alternates between repeats), between the same two plain-sum
    measurements: on a shared machine the speed drifts by 10-30 % within a minute, and the
    ratio of two adjacent measurements cancels most of it. A method whose step has a no-grad
    forward for ``after_step`` (``problem.after_step``) is measured back to back with
    ``sum+forward`` (its reference) the same way."""
    n: dict[str, int] = {}
    for key, fn in fns.items():
        for _ in range(warmup):
            fn()
        one = _timed(fn, 1, problem.device)
        n[key] = max(steps, math.ceil(min_time / one)) if one > 0 else steps
    ratios: dict[str, list[float]] = {s.key: [] for s in specs}
    paired: dict[str, list[float]] = {}
    base_times = []
    ours = [s for s in specs if not s.peer]
    after_step = getattr(problem, "after_step", ())
    # One chain of plain-sum measurements, each between two methods: a plain sum measured right
    # after another runs warm (its own caches and allocations), which made the ratio of the
    # first method of every repeat 3-10 % too high when each repeat started with a fresh one.
    base = _timed(fns[PLAIN_SUM], n[PLAIN_SUM], problem.device)
    base_times.append(base)
    for r in range(repeats):
        for s in ours:
            partner = (s.peer_key if s.peer_key in fns
                       else SUM_FORWARD if s.key in after_step and SUM_FORWARD in fns else None)
            group = [s.key]
            if partner is not None:
                group = [s.key, partner] if r % 2 == 0 else [partner, s.key]
            t = {key: _timed(fns[key], n[key], problem.device) for key in group}
            after = _timed(fns[PLAIN_SUM], n[PLAIN_SUM], problem.device)
            for key, value in t.items():
                ratios[key].append(value / ((base + after) / 2))
            if partner is not None:
                paired.setdefault(s.key, []).append(t[s.key] / t[partner])
            base = after
            base_times.append(after)
    return Times(ratios, base_times, paired)


def trunk_passes(fn: Callable[[], None]) -> int:
    """Backward passes through the bottom of the encoder during one step."""
    PassCounter.calls, PassCounter.active = 0, True
    try:
        fn()
    finally:
        PassCounter.active = False
    return PassCounter.calls


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start/stop lines); Python exceptions are
    unaffected (they are raised, and printed once it is restored)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(problem: Problem, fn: Callable[[], None]) -> int:
    """Peak bytes allocated by torch during one step, above what was allocated before it.

    The step runs once first (lazy state such as optimiser buffers is then in place), the
    gradients are released, and the next step is measured: with
    ``torch.cuda.max_memory_allocated`` on CUDA, and on CPU with ``torch.profiler``'s memory
    events (every allocation and release by torch's CPU allocator, in time order), whose running
    sum's maximum is the same quantity. Only torch's allocations are counted, not the Python
    heap or allocator caches.
    """
    device = problem.device
    fn()
    problem.model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU],
                                     profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _unavailable(spec: Spec, k: int) -> str | None:
    """Why the peer of ``spec`` cannot be built here (TorchJD or its optional solvers), or None."""
    try:
        with _quiet():
            (PEERS.get(spec.name) or CROSS_PEERS[spec.name])(k)
    except Exception as err:  # noqa: BLE001 - any failure of an optional peer is reported
        return f"{type(err).__name__}: {err}"
    return None


def libmtl_status() -> str:
    """Whether LibMTL imports here (it is reported, never timed)."""
    try:
        importlib.import_module("LibMTL")
    except Exception as err:  # noqa: BLE001 - an optional peer; report whatever went wrong
        return f"LibMTL: not importable ({type(err).__name__}: {err}); not timed"
    return ("LibMTL: importable, but not timed (its weightings need its trainer's model "
            "attributes; see STYLE.md)")


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def verdict(spec: Spec, requires: str | None, k: int, time_ratio: float | None,
            vs_time: float | None, vs_mem: float | None,
            forward_ratio: float | None = None) -> tuple[str, str]:
    """(target, PASS/MISS/-) of one row; see the module docstring. ``forward_ratio``: for a
    method with an after-step forward, its step time over the ``sum+forward`` reference's
    (measured back to back)."""
    if spec.key in (PLAIN_SUM, SUM_FORWARD):
        return "-", "-"
    if requires == "losses" and forward_ratio is not None:
        ok = forward_ratio <= LOSS_TIME
        return f"time/({SUM_FORWARD}) <= {LOSS_TIME}", "PASS" if ok else "MISS"
    if requires == "losses":
        ok = time_ratio is not None and time_ratio <= LOSS_TIME
        return f"time/sum <= {LOSS_TIME}", "PASS" if ok else "MISS"
    if spec.grad_on == "features":
        if k != 3:
            return "-", "-"
        ok = time_ratio is not None and time_ratio <= FEATURES_TIME
        return f"time/sum <= {FEATURES_TIME}", "PASS" if ok else "MISS"
    if spec.peer_key is None:
        return "-", "-"
    target = f"time <= {PEER_TIME:.2f}x torchjd"
    if k == 40:
        target += f", mem <= {PEER_MEM:.2f}x"
    if vs_time is None:
        return target, "n/a (no peer measurement)"
    misses = ["time"] if vs_time > PEER_TIME else []
    if k == 40 and vs_mem is not None and vs_mem > PEER_MEM:
        misses.append("mem")
    result = "PASS" if not misses else "MISS (" + ", ".join(misses) + ")"
    if k == 40 and vs_mem is None:
        result += " (mem not measured)"
    return target, result


COLUMNS = ("method", "trunk passes", "time/sum", "peak MiB", "mem/sum", "torchjd time/sum",
           "ours/torchjd time", "range", "torchjd peak MiB", "ours/torchjd mem", "target",
           "result")


def run_suite(suite: Suite, specs: list[Spec], args: argparse.Namespace,
              device: torch.device) -> list[dict[str, Any]]:
    """Measure one problem and print its table; returns the rows."""
    problem = Problem(suite, device)
    k = len(suite.tasks)
    peers: list[Spec] = []
    skipped: dict[str, str] = {}
    if args.peers:
        for key in dict.fromkeys(s.peer_key for s in specs if s.peer_key):
            p = Spec(key)
            reason = _unavailable(p, k)
            if reason is None:
                peers.append(p)
            else:
                skipped[key] = reason
    everything = [Spec(PLAIN_SUM), *specs, *peers]
    with _quiet():
        fns = {s.key: problem.step_fn(s) for s in everything}
        if problem.after_step and SUM_FORWARD not in fns:
            specs = [Spec(SUM_FORWARD), *specs]
            everything.insert(1, specs[0])
            fns[SUM_FORWARD] = problem.step_fn(specs[0])
        passes = {s.key: trunk_passes(fns[s.key]) for s in everything}
        times = measure_times(problem, [*specs, *peers], fns, args.repeats, args.steps,
                              args.warmup, args.min_time)
        memory: dict[str, int] = {}
        if not args.no_memory:
            for s in everything:
                memory[s.key] = peak_memory(problem, fns[s.key])
    mib = 2.0**20
    base_mem = memory.get(PLAIN_SUM)
    rows = []
    for s in everything:
        if s.peer:
            continue
        peer = s.peer_key if s.peer_key in times.ratios else None
        ratio = 1.0 if s.key == PLAIN_SUM else times.median(s.key)
        peak = memory.get(s.key)
        ppeak = memory.get(peer) if peer else None
        vs = times.versus(s.key) if peer else None
        vs_time = statistics.median(vs) if vs else None
        vs_mem = peak / ppeak if peak is not None and ppeak else None
        forward = (statistics.median(times.versus(s.key)) if s.key in problem.after_step
                   and s.key in times.paired else None)
        target, result = verdict(s, problem.requires.get(s.key), k, ratio, vs_time, vs_mem,
                                 forward)
        if forward is not None:
            result += f" ({forward:.2f})"
        if s.peer_key and s.peer_key in skipped and result.startswith("n/a"):
            result = "n/a (no torchjd peer here)"
        rows.append({
            "method": s.key,
            "trunk passes": str(passes[s.key]),
            "time/sum": _fmt(ratio),
            "peak MiB": _fmt(None if peak is None else peak / mib, 1),
            "mem/sum": _fmt(peak / base_mem if peak is not None and base_mem else None),
            "torchjd time/sum": _fmt(times.median(peer) if peer else None),
            "ours/torchjd time": _fmt(vs_time),
            "range": f"{min(vs):.2f}-{max(vs):.2f}" if vs else "-",
            "torchjd peak MiB": _fmt(None if ppeak is None else ppeak / mib, 1),
            "ours/torchjd mem": _fmt(vs_mem),
            "target": target,
            "result": result,
        })
    base = statistics.median(times.base)
    clock = "wall time" if device.type == "cuda" else "process CPU time"
    print(f"\n### {suite.describe()}\n")
    print(f"device {device}, {torch.get_num_threads()} thread(s), clock: {clock}; plain sum step "
          f"{base * 1e3:.1f} ms (median of {len(times.base)} measurements); ratios: median of "
          f"{args.repeats} repeats, each measurement >= {args.steps} steps and >= "
          f"{args.min_time:g} s")
    if args.peers:
        for key, reason in skipped.items():
            print(f"peer {key} unavailable: {reason}")
        print(libmtl_status())
    _print_table(COLUMNS, rows)
    return rows


def _print_table(columns: Sequence[str], rows: Sequence[Mapping[str, str]]) -> None:
    """A markdown table of ``rows`` (column -> cell), after a blank line."""
    print()
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(r[c] for c in columns) + " |")
    sys.stdout.flush()


COMPILE_COLUMNS = ("method", "eager ms", "compiled ms", "compiled/eager", "range")


def measure_compiled(eager: dict[str, Callable[[], None]],
                     compiled: dict[str, Callable[[], None]], repeats: int, steps: int,
                     warmup: int, min_time: float, device: torch.device
                     ) -> dict[str, tuple[list[float], list[float]]]:
    """Per method, the (eager, compiled) step times of each repeat, measured back to back
    (which goes first alternates between repeats), so that their ratio cancels most of the
    machine's drift. Both run ``warmup`` steps first, the compiled one at least two (the first
    call compiles; a second catches a recompilation)."""
    pairs = {key: (fn, compiled[key]) for key, fn in eager.items()}
    n: dict[str, int] = {}
    for key, (e, c) in pairs.items():
        for _ in range(warmup):
            e()
        for _ in range(max(warmup, 2)):
            c()
        one = min(_timed(e, 1, device), _timed(c, 1, device))
        n[key] = max(steps, math.ceil(min_time / one)) if one > 0 else steps
    out: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in pairs}
    for r in range(repeats):
        for key, fns in pairs.items():
            for i in ([0, 1] if r % 2 == 0 else [1, 0]):
                out[key][i].append(_timed(fns[i], n[key], device))
    return out


def run_compiled(suite: Suite, specs: list[Spec], args: argparse.Namespace,
                 device: torch.device) -> list[dict[str, Any]]:
    """Time each method's step with the model compiled (``torch.compile`` of the encoder and of
    each head, backend ``args.compile_backend``) beside the same step eager, on two copies of
    the same model; print the table of compiled/eager ratios and return its rows. A method that
    fails with the compiled model gets its error in the row."""
    from torch._functorch import config as functorch_config

    eager_problem = Problem(suite, device)
    compiled_problem = Problem(suite, device, compile_backend=args.compile_backend)
    eager: dict[str, Callable[[], None]] = {}
    compiled: dict[str, Callable[[], None]] = {}
    errors: dict[str, str] = {}
    # Without donated buffers: AOTAutograd compiles the backward at its first call and, when
    # that is a plain backward (the sum's, measured first), lets it overwrite saved tensors,
    # after which a backward pass that keeps the graph (the per-task passes) is refused.
    with _quiet(), functorch_config.patch(donated_buffer=False):
        for s in [Spec(PLAIN_SUM), *specs]:
            fn = compiled_problem.step_fn(s)
            try:
                fn()  # compiles (and shows whether the method runs compiled at all)
            except Exception as err:  # noqa: BLE001 - reported in the row
                errors[s.key] = f"{type(err).__name__}: {str(err).splitlines()[0][:100].strip()}"
                continue
            eager[s.key], compiled[s.key] = eager_problem.step_fn(s), fn
        times = measure_compiled(eager, compiled, args.repeats, args.steps, args.warmup,
                                 args.min_time, device)
    rows = []
    for s in [Spec(PLAIN_SUM), *specs]:
        if s.key in errors:
            rows.append({"method": s.key, "eager ms": "-", "compiled ms": "-",
                         "compiled/eager": "-", "range": errors[s.key]})
            continue
        e, c = times[s.key]
        ratios = [b / a for a, b in zip(e, c)]
        rows.append({
            "method": s.key,
            "eager ms": _fmt(statistics.median(e) * 1e3),
            "compiled ms": _fmt(statistics.median(c) * 1e3),
            "compiled/eager": _fmt(statistics.median(ratios)),
            "range": f"{min(ratios):.2f}-{max(ratios):.2f}",
        })
    clock = "wall time" if device.type == "cuda" else "process CPU time"
    print(f"\n### {suite.describe()}: compiled ({args.compile_backend}) vs eager\n")
    print(f"device {device}, {torch.get_num_threads()} thread(s), clock: {clock}; step times: "
          f"median of {args.repeats} repeats; compiled/eager: median over the repeats of the "
          "ratio of the two measurements taken back to back, range beside it; compiled with "
          "torch._functorch.config.donated_buffer=False")
    _print_table(COMPILE_COLUMNS, rows)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mtlkit bench speed``."""
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and few repeats, to check the set-up")
    parser.add_argument("--methods", default=None,
                        help="comma-separated balancer names; NAME@features for grad_on="
                             "'features'; NAME[opt=value;...] for constructor options "
                             "(default: from the registry, per problem: every loss weighting "
                             "on tiny, every gradient method and " + ", ".join(LOSS_ON_LARGE)
                             + " on dense and many)")
    parser.add_argument("--suites", default="tiny,dense,many",
                        help="comma-separated: tiny, dense, many, resnet18 (default "
                             "tiny,dense,many)")
    parser.add_argument("--peers", action="store_true",
                        help="also time TorchJD's mtl_backward with the same aggregator")
    parser.add_argument("--repeats", type=int, default=None,
                        help="repeats (median reported; default 9, 2 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="steps per measurement")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per method")
    parser.add_argument("--min-time", dest="min_time", type=float, default=None,
                        help="seconds each measurement lasts at least (more steps for fast "
                             "methods; default 0.3, 0 with --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads on CPU (default 1, see the module docstring)")
    parser.add_argument("--no-memory", dest="no_memory", action="store_true",
                        help="skip the peak-memory measurements")
    parser.add_argument("--compile", action="store_true",
                        help="also time each method with the model torch.compile-d beside "
                             "eager (a second table per problem: compiled/eager)")
    parser.add_argument("--compile-backend", dest="compile_backend", default="inductor",
                        help="torch.compile backend for --compile (default inductor; "
                             "aot_eager compiles in seconds on CPU)")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (see :func:`add_arguments`); returns 0."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    table = suites(args.quick)
    chosen = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in table]
    if unknown:
        raise SystemExit(f"unknown suite(s) {unknown}; choose from {sorted(table)}")
    if getattr(args, "compile", False):
        from torch._dynamo import list_backends

        known_backends = list_backends(exclude_tags=())
        if args.compile_backend not in known_backends:
            raise SystemExit(f"unknown --compile-backend {args.compile_backend!r}; choose from "
                             f"{', '.join(sorted(known_backends))}")
    args.repeats = args.repeats or (2 if args.quick else 9)
    args.steps = args.steps or 2
    args.warmup = args.warmup if args.warmup is not None else 1
    if args.min_time is None:
        args.min_time = 0.0 if args.quick else 0.3
    per_suite: dict[str, list[Spec]] = {}
    known = set(balancers.available())
    for name in chosen:
        given = args.methods.split(",") if args.methods else default_methods(name)
        specs = [Spec(m.strip()) for m in given if m.strip()]
        bad = [s.key for s in specs if s.name not in known or s.peer or s.key == PLAIN_SUM]
        if bad:
            raise SystemExit(f"unknown method(s) {bad}; available: {', '.join(sorted(known))}")
        for s in specs:
            try:
                _ = s.options  # parse now: a malformed option stops the run before timing
            except ValueError as err:
                raise SystemExit(str(err)) from None
        per_suite[name] = specs
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    try:
        print(f"mtlkit speed benchmark: torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        for name in chosen:
            run_suite(table[name], per_suite[name], args, device)
            if getattr(args, "compile", False):
                run_compiled(table[name], per_suite[name], args, device)
    finally:
        torch.set_num_threads(threads)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtlkit bench speed", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


__all__ = ["add_arguments", "main", "run"]


if __name__ == "__main__":
    raise SystemExit(main())
