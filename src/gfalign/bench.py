"""Training speed of every rule against plain autograd backprop and against the machine itself.

For one architecture, batch size, device and dtype, ``run`` times training epochs of

- every rule through gfalign's training loop (``Trainer``; plain SGD takes the fused in-place
  path of ``FeedbackRule.sgd_step``),
- a plain PyTorch baseline written here: ``nn.Sequential``, ``loss.backward()``,
  ``torch.optim.SGD``, with the same batches,
- the *GEMM-only* bound of every rule: exactly the matrix products of its epoch (same shapes,
  same operand layouts, same batch sizes) run back to back on preallocated tensors, nothing else,

and measures the machine's matrix-product peak in the same process. Repeats are interleaved
chunk by chunk (chunk c of every case, GEMM-only runs included, before chunk c + 1 of any),
so drift of a shared machine reaches every case alike; the tables report medians, and
the ratios (GEMM-only over epoch, speed-up over the baseline) are medians of per-repeat ratios.

FLOPs count what each rule really computes (``step_gemms``): for DFA on 784-800-800-10 a step
is the 3 forward products, one ``e @ D`` with the direct matrices of both hidden layers
stacked (n_L x 1600) and the 3 weight-update products; BP replaces ``e @ D`` by the two
backward products ``d^{i+1} W^{i+1}``. Element-wise work is not counted.

Example:
    >>> result = run(BenchConfig(sizes=(784, 64, 64, 10), examples=2048, repeats=3))
    >>> print(format_table(result))
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from gfalign.engine import FeedbackRule
from gfalign.network import MLP
from gfalign.rules import PRESETS
from gfalign.train import TrainConfig, Trainer

__all__ = [
    "BASELINE",
    "COLUMNS",
    "BenchConfig",
    "BenchError",
    "Gemm",
    "PeakMemory",
    "Row",
    "epoch_batches",
    "epoch_flops",
    "format_table",
    "gemm_only",
    "gemm_only_seconds",
    "load_data",
    "machine",
    "matmul_peak",
    "resolve_device",
    "run",
    "step_gemms",
]

BASELINE = "autograd-bp"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class BenchError(ValueError):
    """A benchmark that cannot run here (no such device, bad sizes); the message says why."""


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark; the fields are the defaults and the documentation.

    Attributes:
        sizes: layer widths ``[n_0, ..., n_L]`` (the paper's 784-800-800-10).
        activation: hidden nonlinearity.
        batch_size: examples per step.
        rules: preset names (or configuration dictionaries) to time through gfalign.
        baseline: also time the plain autograd backprop baseline.
        optimizer_path: also time every rule through ``.grad`` and ``torch.optim.SGD.step``
            (``Trainer(fused_sgd=False)``), to show what the fused update saves.
        device: ``cpu``, ``cuda``, ``cuda:1`` ...
        dtype: ``float32`` or ``float64``.
        data: ``mnist`` (random tensors of MNIST's shape when MNIST cannot be loaded; the
            timing does not depend on the values) or ``synthetic`` (``gfalign.data.synthetic``).
        data_root: directory holding MNIST's files (default ``$GFALIGN_DATA``, then the cache).
        examples: training examples per epoch (default: all of them).
        repeats: timed epochs per case; the tables report their median.
        warmup: untimed steps of every case before the first timed epoch.
        threads: ``torch.set_num_threads`` (default: leave torch's choice).
        peak_size: side of the square matrices of the peak measurement.
        ensemble: K > 0 also times K members trained sequentially against one
            ``EnsembleTrainer`` of K members, for every rule.
        chunks: every epoch is timed in this many chunks of steps, chunk c of every case
            before chunk c + 1 of any, so a shared machine's noise reaches all cases alike.
        seed: seeds the networks, rules, shuffling and random data.
    """

    sizes: tuple[int, ...] = (784, 800, 800, 10)
    activation: str = "tanh"
    batch_size: int = 32
    rules: tuple[str, ...] = tuple(PRESETS)
    baseline: bool = True
    optimizer_path: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    data: str = "mnist"
    data_root: str | None = None
    examples: int | None = None
    repeats: int = 5
    warmup: int = 20
    threads: int | None = None
    peak_size: int = 2048
    ensemble: int = 0
    chunks: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", tuple(int(n) for n in self.sizes))
        object.__setattr__(self, "rules", tuple(self.rules))
        if len(self.sizes) < 3:
            raise BenchError(f"sizes need at least one hidden layer, got {list(self.sizes)}")
        if self.dtype not in DTYPES:
            raise BenchError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.data not in ("mnist", "synthetic"):
            raise BenchError(f"data must be mnist or synthetic, got {self.data!r}")
        for name in ("batch_size", "repeats", "peak_size", "chunks"):
            if getattr(self, name) < 1:
                raise BenchError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.examples is not None and self.examples < 1:
            raise BenchError(f"examples must be at least 1, got {self.examples}")
        if self.ensemble < 0 or self.warmup < 0:
            raise BenchError("ensemble and warmup cannot be negative")


# ------------------------------------------------------------------------------------ FLOPs


@dataclass(frozen=True)
class Gemm:
    """One matrix product ``C (m, n) = A (m, k) @ B (k, n)`` of a training step.

    ``a``, ``b`` and ``c`` name the operands (``"W2"``, ``"h1"``, ``"d2"`` ...) so that a product
    that reads a tensor another one writes or reads uses the same buffer in the GEMM-only run;
    ``a_transposed`` / ``b_transposed`` mark operands read through a ``.t()`` view (stored as
    (k, m) or (n, k), as in the rule path); ``accumulate`` marks ``C += A @ B`` into the weights
    (the fused SGD update) instead of a fresh result.
    """

    what: str
    m: int
    k: int
    n: int
    a: str
    b: str
    c: str
    a_transposed: bool = False
    b_transposed: bool = False
    accumulate: bool = False

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n


def step_gemms(rule: FeedbackRule, batch: int) -> list[Gemm]:
    """The matrix products one training step of ``rule`` computes, in order.

    Read off the rule's plan, so it counts exactly what the engine runs: the forward pass, the
    stacked ``e @ D`` of the output-error direct terms, each auxiliary classifier's two
    products, each above/below/backprop product, and one weight-update product per layer.
    The autograd baseline computes the same products as ``bp``.

    Example:
        >>> rule = FeedbackRule("dfa", (784, 800, 800, 10))
        >>> sum(g.flops for g in step_gemms(rule, 32)) == 2 * 32 * (
        ...     2 * (784 * 800 + 800 * 800 + 800 * 10) + 10 * 1600)
        True
    """
    sizes, plan, N = rule.sizes, rule.plan, batch
    L = len(sizes) - 1
    gemms = [
        Gemm(f"forward a{i} = h{i - 1} W{i}^T", N, sizes[i - 1], sizes[i], f"h{i - 1}", f"W{i}",
             f"a{i}", b_transposed=True)
        for i in range(1, L + 1)
    ]  # fmt: skip
    if plan.output_width:
        gemms.append(
            Gemm("direct e @ D (stacked)", N, sizes[L], plan.output_width, f"d{L}", "D", "P")
        )
    for layer in plan.layers:
        i = layer.layer
        for term in layer.values:
            if term.auxiliary:
                gemms += [
                    Gemm(f"auxiliary z{i} = h{i} D{i}^T", N, sizes[i], sizes[L], f"h{i}",
                         f"D{i}", f"z{i}", b_transposed=True),
                    Gemm(f"auxiliary e{i} @ D{i}", N, sizes[L], sizes[i], f"e{i}", f"D{i}",
                         f"P{i}"),
                ]  # fmt: skip
        for term in layer.products:
            j = term.source
            source = f"d{j}" if term.final else f"t{j}"
            matrix = f"W{j}" if term.kind == "backprop" else f"B{i}.{term.index}"
            gemms.append(
                Gemm(f"{term.kind} {source} @ {matrix}", N, sizes[j], sizes[i], source, matrix,
                     f"q{i}.{term.index}")
            )  # fmt: skip
    gemms += [
        Gemm(f"update W{i} += d{i}^T h{i - 1}", sizes[i], N, sizes[i - 1], f"d{i}", f"h{i - 1}",
             f"W{i}", a_transposed=True, accumulate=True)
        for i in range(1, L + 1)
    ]  # fmt: skip
    return gemms


def epoch_batches(examples: int, batch: int) -> list[int]:
    """The batch sizes of one epoch: full batches and the smaller last one."""
    full, rest = divmod(examples, batch)
    return [batch] * full + ([rest] if rest else [])


def epoch_flops(rule: FeedbackRule, examples: int, batch: int) -> int:
    """Matrix-product FLOPs of one epoch of ``rule``."""
    return sum(
        sum(g.flops for g in step_gemms(rule, size)) for size in epoch_batches(examples, batch)
    )


# ------------------------------------------------------------------------------ the machine


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, refusing a device this torch build or machine does not have."""
    try:
        device = torch.device(name)
    except RuntimeError as problem:
        raise BenchError(f"unknown device {name!r}: {problem}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = (
                "without CUDA" if torch.version.cuda is None else f"with CUDA {torch.version.cuda}"
            )
            raise BenchError(
                f"--device {name}: CUDA is not available (torch {torch.__version__} is built "
                f"{built}, and torch.cuda.is_available() is False). Use --device cpu, or "
                "install a CUDA build of torch on a machine with an NVIDIA GPU"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BenchError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise BenchError(f"--device {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise BenchError(f"--device {name}: only cpu, cuda and mps are supported")
    return device


def matmul_peak(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5
) -> float:
    """The best GFLOP/s of a square ``size`` matrix product, ``repeats`` times after a warm-up."""
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(size, size, generator=generator, dtype=dtype).to(device)
    b = torch.rand(size, size, generator=generator, dtype=dtype).to(device)
    c = torch.empty(size, size, dtype=dtype, device=device)
    torch.mm(a, b, out=c)
    _synchronize(device)
    # At least ~0.1 s per measurement, so small sizes are not timer noise.
    inner = max(1, math.ceil(0.1 / max(_time(lambda: torch.mm(a, b, out=c), device), 1e-6)))
    best = max(
        inner / _time(lambda: [torch.mm(a, b, out=c) for _ in range(inner)], device)
        for _ in range(repeats)
    )
    return best * 2 * size**3 / 1e9


def _time(function: Callable[[], object], device: torch.device) -> float:
    _synchronize(device)
    started = time.perf_counter()
    function()
    _synchronize(device)
    return time.perf_counter() - started


class PeakMemory:
    """Memory now and at its peak since ``reset``.

    CPU: the process's resident set (``VmRSS`` and ``VmHWM`` of ``/proc/self/status``, the peak
    reset through ``/proc/self/clear_refs``; they count torch's allocations, which
    ``tracemalloc`` does not), else the never-reset ``ru_maxrss``. CUDA:
    ``torch.cuda.memory_allocated`` and ``max_memory_allocated``. ``how`` says which.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.how = "torch.cuda.max_memory_allocated"
        elif _read_status("VmHWM") is not None and _reset_peak_rss():
            self.how = "resident set (VmRSS, VmHWM reset per chunk)"
        else:
            self.how = "peak resident set of the process (ru_maxrss)"
        self.resettable = device.type == "cuda" or self.how.startswith("resident set")

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            _reset_peak_rss()

    def current_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        current = _read_status("VmRSS") if self.resettable else None
        return current if current is not None else self.peak_bytes()

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        peak = _read_status("VmHWM")
        if peak is not None:
            return peak
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _tensor_bytes(*owners: nn.Module | torch.optim.Optimizer | torch.Tensor) -> int:
    """Bytes of the parameters, gradients, buffers and optimizer state of ``owners``."""
    seen: dict[int, int] = {}

    def add(tensor: torch.Tensor | None) -> None:
        if isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    for owner in owners:
        if isinstance(owner, torch.Tensor):
            add(owner)
        elif isinstance(owner, nn.Module):
            for parameter in owner.parameters():
                add(parameter)
                add(parameter.grad)
            for buffer in owner.buffers():
                add(buffer)
        else:
            for state in owner.state.values():
                for value in state.values():
                    add(value)
    return sum(seen.values())


def _read_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
        return True
    except OSError:
        return False


def machine(device: torch.device) -> dict[str, Any]:
    """Versions, threads and the processor, for the report."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gfalign": _version(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "processor": _processor(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gfalign")
    except PackageNotFoundError:
        return "unknown"


def _processor() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------- the data


@dataclass(frozen=True, eq=False)
class _Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.y.shape[0]


@dataclass(frozen=True, eq=False)
class _Dataset:
    name: str
    train: _Split
    test: _Split
    validation: None = None


def load_data(config: BenchConfig, device: torch.device, dtype: torch.dtype) -> tuple[Any, str]:
    """The training data and a line saying what it is.

    MNIST through ``gfalign.data.load`` (never downloading), else random tensors of MNIST's
    shape; ``synthetic`` draws ``gfalign.data.synthetic``. Only ``examples`` training examples
    and at most 1000 test examples are kept: the benchmark times training steps, not evaluation.
    """
    n_in, n_out = config.sizes[0], config.sizes[-1]
    note = ""
    dataset = None
    if config.data == "mnist":
        try:
            from gfalign.data import load

            dataset = load("mnist", root=config.data_root, download=False, quiet=True)
            note = "MNIST"
        except Exception as problem:  # any failure to load only changes the values, not timing
            note = f"random tensors of MNIST's shape (MNIST not loaded: {_first_line(problem)})"
        if dataset is not None and (n_in, n_out) != (dataset.train.x.shape[1], 10):
            dataset = None
            note = f"random tensors (sizes {n_in}->{n_out} do not fit MNIST)"
        if dataset is not None:
            train, test = dataset.train, dataset.test
        else:
            generator = torch.Generator().manual_seed(config.seed)
            train = _Split(
                torch.rand(60_000, n_in, generator=generator),
                torch.randint(0, n_out, (60_000,), generator=generator),
            )
            test = _Split(train.x[:1000], train.y[:1000])
    else:
        from gfalign.data import synthetic

        count = config.examples or 60_000
        dataset = synthetic(count, 200, seed=config.seed, features=n_in, classes=n_out)
        train, test = dataset.train, dataset.test
        note = f"synthetic ({count} examples)"
    examples = min(config.examples or len(train), len(train))
    train = _Split(train.x[:examples], train.y[:examples])
    test = _Split(test.x[:1000], test.y[:1000])
    on_device = _Dataset(
        "bench",
        _Split(train.x.to(device=device, dtype=dtype), train.y.to(device)),
        _Split(test.x.to(device=device, dtype=dtype), test.y.to(device)),
    )
    return on_device, note


def _first_line(problem: BaseException) -> str:
    text = str(problem).strip().splitlines()
    return (text[0] if text else type(problem).__name__)[:120]


# ------------------------------------------------------------------------------- the cases
#
# Every case runs an epoch as a generator: the first ``next`` prepares it (untimed), each
# further ``next`` runs the steps of one chunk, and ``run`` times chunk c of every case before
# chunk c + 1 of any. Noise of a shared machine, which comes and goes over seconds, then reaches
# every case alike instead of whole epochs of a few.

Chunks = Sequence[tuple[int, int]]


class _Case:
    """One timed row (or one GEMM-only bound): ``warm_up()`` once, then ``epoch(chunks)``."""

    name: str
    gemm_key: str | None = None  # the GEMM-only bound it is compared with

    def warm_up(self) -> None:
        raise NotImplementedError

    def epoch(self, chunks: Chunks) -> Iterator[None]:
        raise NotImplementedError

    def state_bytes(self) -> int:
        """Bytes of the run's own tensors: weights, gradients, feedback matrices, optimizer."""
        return 0


def _order(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randperm(n, generator=generator).to(device)


class _RuleCase(_Case):
    """A rule through gfalign's training step (``Trainer.step``, as ``Trainer.train_epoch``)."""

    def __init__(self, name, rule_config, data, config: BenchConfig, device, dtype, fused=True):
        net = MLP(config.sizes, config.activation, seed=config.seed, dtype=dtype, device=device)
        self.rule = FeedbackRule(rule_config, config.sizes, seed=config.seed, dtype=dtype,
                                 device=device)  # fmt: skip
        self.name = name.format(rule=self.rule.config.name)
        self.gemm_key = self.rule.config.name
        train_config = TrainConfig(
            batch_size=config.batch_size, lr=1e-4, seed=config.seed, evaluate_train=False
        )
        self.trainer = Trainer(net, self.rule, data, train_config, fused_sgd=fused)
        self.data, self.warmup, self.batch = data, config.warmup, config.batch_size

    def warm_up(self) -> None:
        x, y = self.data.train.x, self.data.train.y
        for batch in _warmup_batches(len(y), self.batch, self.warmup, x.device):
            self.trainer.step(x.index_select(0, batch), y.index_select(0, batch))

    def state_bytes(self) -> int:
        return _tensor_bytes(self.trainer.net, self.trainer.rule, self.trainer.optimizer)

    def epoch(self, chunks: Chunks) -> Iterator[None]:
        x_all, y_all, size, trainer = self.data.train.x, self.data.train.y, self.batch, self.trainer
        order = _order(len(y_all), trainer.generator, x_all.device)
        losses: list[torch.Tensor] = []
        yield
        for first, last in chunks:
            for step in range(first, last):
                batch = order[step * size : (step + 1) * size]
                losses.append(
                    trainer.step(x_all.index_select(0, batch), y_all.index_select(0, batch))
                )
            yield
        _check_finite(self.name, losses)


class _AutogradCase(_Case):
    """Plain PyTorch: ``nn.Sequential``, ``loss.backward()``, ``torch.optim.SGD``."""

    def __init__(self, data, config: BenchConfig, device, dtype):
        self.name, self.gemm_key = BASELINE, "bp"
        activation = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU}[config.activation]
        layers: list[nn.Module] = []
        for index, (fan_in, fan_out) in enumerate(
            zip(config.sizes[:-1], config.sizes[1:], strict=False)
        ):
            layers.append(nn.Linear(fan_in, fan_out))
            if index < len(config.sizes) - 2:
                layers.append(activation())
        self.model = nn.Sequential(*layers).to(device=device, dtype=dtype)
        start = MLP(config.sizes, config.activation, seed=config.seed, dtype=dtype, device=device)
        linear = [layer for layer in self.model if isinstance(layer, nn.Linear)]
        with torch.no_grad():
            for mine, theirs in zip(linear, start.layers, strict=True):
                mine.weight.copy_(theirs.weight)
                mine.bias.copy_(theirs.bias)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.data, self.batch, self.warmup = data, config.batch_size, config.warmup

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad()
        loss = functional.cross_entropy(self.model(x), y, reduction="sum")
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def warm_up(self) -> None:
        x, y = self.data.train.x, self.data.train.y
        for batch in _warmup_batches(len(y), self.batch, self.warmup, x.device):
            self._step(x.index_select(0, batch), y.index_select(0, batch))

    def state_bytes(self) -> int:
        return _tensor_bytes(self.model, self.optimizer)

    def epoch(self, chunks: Chunks) -> Iterator[None]:
        x_all, y_all, size = self.data.train.x, self.data.train.y, self.batch
        order = _order(len(y_all), self.generator, x_all.device)
        losses: list[torch.Tensor] = []
        yield
        for first, last in chunks:
            for step in range(first, last):
                batch = order[step * size : (step + 1) * size]
                losses.append(
                    self._step(x_all.index_select(0, batch), y_all.index_select(0, batch))
                )
            yield
        _check_finite(self.name, losses)


class _GemmCase(_Case):
    """The GEMM-only bound of a rule: its products alone (see ``gemm_only``), ``repeat`` times
    per step for K sequential members, or stacked over ``stack`` members."""

    def __init__(self, key, rule: FeedbackRule, batches, device, dtype, *, stack=0, repeat=1):
        self.name, self.gemm_key = f"GEMM-only {key}", key
        self.rule, self.repeat = rule, repeat
        self.run = gemm_only(lambda n: step_gemms(rule, n), batches, device, dtype, stack=stack)
        self.batches = list(batches)

    def warm_up(self) -> None:
        self.run(self.batches[:3])

    def epoch(self, chunks: Chunks) -> Iterator[None]:
        yield
        for first, last in chunks:
            for _ in range(self.repeat):
                self.run(self.batches[first:last])
            yield


class _SequentialCase(_Case):
    """K members trained one after the other, each with its own ``Trainer``.

    Every chunk runs the chunk's steps of member 1, then member 2, ...: K whole epochs in all.
    """

    def __init__(self, name, rule_config, data, config: BenchConfig, device, dtype):
        self.name = name
        self.gemm_key = name
        self.cases = [
            _RuleCase(name, rule_config, data, _with_seed(config, config.seed + k), device, dtype)
            for k in range(config.ensemble)
        ]

    def warm_up(self) -> None:
        for case in self.cases:
            case.warm_up()

    def state_bytes(self) -> int:
        return max(case.state_bytes() for case in self.cases)  # one run at a time

    def epoch(self, chunks: Chunks) -> Iterator[None]:
        members = [case.epoch(chunks) for case in self.cases]
        for _ in range(len(chunks) + 1):
            for member in members:
                next(member)
            yield
        for member in members:
            next(member, None)


class _EnsembleCase(_Case):
    """K members stacked in one ``EnsembleTrainer``."""

    def __init__(self, name, rule_config, data, config: BenchConfig, device, dtype):
        from gfalign.ensemble import EnsembleTrainer

        self.name = name
        self.gemm_key = name
        seeds = [config.seed + k for k in range(config.ensemble)]
        nets = [MLP(config.sizes, config.activation, seed=s, dtype=dtype, device=device)
                for s in seeds]  # fmt: skip
        rules = [FeedbackRule(rule_config, config.sizes, seed=s, dtype=dtype, device=device)
                 for s in seeds]  # fmt: skip
        configs = [
            TrainConfig(batch_size=config.batch_size, lr=1e-4, seed=s, evaluate_train=False)
            for s in seeds
        ]
        self.trainer = EnsembleTrainer(nets, rules, data, configs)
        self.warmup = config.warmup

    def state_bytes(self) -> int:
        trainer = self.trainer
        stacked = [*trainer._weights[1:], *trainer._biases[1:], *trainer._matrices.values()]
        members = [part for m in trainer.members for part in (m.net, m.rule, m.optimizer)]
        return _tensor_bytes(*members, *stacked)

    def warm_up(self) -> None:
        trainer = self.trainer
        epoch = trainer.begin_epoch()
        for step in range(min(self.warmup, epoch.steps)):
            trainer.train_step(epoch, step)
        trainer._unstack(list(epoch.active))

    def epoch(self, chunks: Chunks) -> Iterator[None]:
        trainer = self.trainer
        epoch = trainer.begin_epoch()
        losses: list[torch.Tensor] = []
        yield
        for first, last in chunks:
            for step in range(first, last):
                losses.append(trainer.train_step(epoch, step))
            yield
        trainer._unstack(list(epoch.active))
        _check_finite(self.name, losses)


def _check_finite(name: str, losses: list[torch.Tensor]) -> None:
    if not bool(torch.isfinite(torch.stack(losses)).all()):
        raise BenchError(f"{name}: the loss diverged during the benchmark")


def _warmup_batches(n: int, batch: int, steps: int, device: torch.device) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1)).to(device)
    return [order[(step * batch) % n :][:batch] for step in range(steps)]


def _with_seed(config: BenchConfig, seed: int) -> BenchConfig:
    values = asdict(config)
    values["seed"] = seed
    return BenchConfig(**values)


# ------------------------------------------------------------------------------ GEMM-only


def gemm_only(
    gemms_of: Callable[[int], Sequence[Gemm]],
    batches: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
    *,
    stack: int = 0,
) -> Callable[[Sequence[int]], None]:
    """A function running exactly the products of steps of the given batch sizes, nothing else.

    ``gemms_of(N)`` lists the products of a step of batch ``N`` (``step_gemms``); ``batches``
    the batch sizes that will be asked for. Operands named alike share one buffer (a step's
    forward reads the weights its update writes), transposed operands are read through
    ``.t()`` views like the rule path's, and the weight updates accumulate into the weights
    (``addmm_``, with a tiny step so the values stay put). ``stack=K`` runs every product as
    one batched product over K members (``bmm`` / ``baddbmm_``), as ``EnsembleTrainer`` does.
    All tensors are allocated here, none while it runs.
    """
    generator = torch.Generator().manual_seed(0)
    # Keyed by name and shape: the weights are shared by every batch size, activations not.
    buffers: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
    lead = (stack,) if stack else ()

    def operand(key: str, shape: tuple[int, int], transposed: bool) -> torch.Tensor:
        full = lead + ((shape[1], shape[0]) if transposed else shape)
        if (key, full) not in buffers:
            tensor = torch.rand(full, generator=generator, dtype=dtype).sub_(0.5)
            buffers[key, full] = tensor.to(device)
        tensor = buffers[key, full]
        return tensor.transpose(-1, -2) if transposed else tensor

    plans = {}
    for size in sorted(set(batches)):
        steps = []
        for g in gemms_of(size):
            a = operand(g.a, (g.m, g.k), g.a_transposed)
            b = operand(g.b, (g.k, g.n), g.b_transposed)
            if g.accumulate:
                c = operand(g.c, (g.m, g.n), False)
            else:
                c = torch.empty(lead + (g.m, g.n), dtype=dtype, device=device)
            steps.append((a, b, c, g.accumulate))
        plans[size] = steps

    def run(sizes: Sequence[int]) -> None:
        for size in sizes:
            for a, b, c, accumulate in plans[size]:
                if accumulate:
                    if stack:
                        c.baddbmm_(a, b, alpha=-1e-9)
                    else:
                        c.addmm_(a, b, alpha=-1e-9)
                elif stack:
                    torch.bmm(a, b, out=c)
                else:
                    torch.mm(a, b, out=c)

    return run


def gemm_only_seconds(
    gemms_of: Callable[[int], Sequence[Gemm]],
    batches: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
    *,
    stack: int = 0,
) -> float:
    """Seconds of ``gemm_only`` over ``batches``, after a three-step warm-up."""
    run_steps = gemm_only(gemms_of, batches, device, dtype, stack=stack)
    run_steps(list(batches[:3]))
    return _time(lambda: run_steps(batches), device)


# ------------------------------------------------------------------------------------ run


@dataclass
class Row:
    """The measurements of one case (medians over the repeats)."""

    name: str
    seconds: float
    examples_per_second: float
    gflop: float
    gflops: float
    peak_fraction: float
    gemm_seconds: float | None
    gemm_ratio: float | None
    speedup: float | None
    peak_memory_mib: float
    samples: list[float] = field(default_factory=list)
    gemm_samples: list[float] = field(default_factory=list)


def run(
    config: BenchConfig,
    *,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns the machine, the settings, the peak and one row per case.

    ``progress`` receives a line as each repeat finishes.
    """
    say = progress or (lambda line: None)
    load_before = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    device = resolve_device(config.device)
    dtype = DTYPES[config.dtype]
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    memory = PeakMemory(device)

    data, data_note = load_data(config, device, dtype)
    examples = len(data.train)
    batches = epoch_batches(examples, config.batch_size)
    per_chunk = math.ceil(len(batches) / config.chunks)
    chunks = [(first, min(first + per_chunk, len(batches)))
              for first in range(0, len(batches), per_chunk)]  # fmt: skip
    say(f"data: {data_note}; {examples} examples, {len(batches)} steps per epoch")

    peak = matmul_peak(device, torch.float32, config.peak_size)
    say(f"float32 matrix-product peak: {peak:.1f} GFLOP/s")

    cases: list[_Case] = []
    if config.baseline:
        cases.append(_AutogradCase(data, config, device, dtype))
    for name in config.rules:
        cases.append(_RuleCase("{rule}", name, data, config, device, dtype))
        if config.optimizer_path:
            cases.append(
                _RuleCase("{rule} (optimizer)", name, data, config, device, dtype, fused=False)
            )
    # One GEMM-only bound per distinct rule (the baseline's products are bp's), run beside it.
    bounds: dict[str, _Case] = {}
    for case in cases:
        if case.gemm_key not in bounds:
            rule = (
                case.rule
                if isinstance(case, _RuleCase)
                else FeedbackRule(case.gemm_key, config.sizes, dtype=dtype, device=device)
            )
            bounds[case.gemm_key] = _GemmCase(case.gemm_key, rule, batches, device, dtype)
    pairs: list[tuple[str, _SequentialCase, _EnsembleCase]] = []
    for name in config.rules if config.ensemble else ():
        label = (
            f"{name if isinstance(name, str) else name.get('name', 'custom')} x{config.ensemble}"
        )
        sequential = _SequentialCase(f"{label} sequential", name, data, config, device, dtype)
        ensemble = _EnsembleCase(f"{label} ensemble", name, data, config, device, dtype)
        rule = sequential.cases[0].rule
        bounds[sequential.gemm_key] = _GemmCase(
            sequential.gemm_key, rule, batches, device, dtype, repeat=config.ensemble
        )
        bounds[ensemble.gemm_key] = _GemmCase(
            ensemble.gemm_key, rule, batches, device, dtype, stack=config.ensemble
        )
        pairs.append((str(name), sequential, ensemble))

    everything: list[_Case] = []
    for case in cases + [case for _, *pair in pairs for case in pair]:
        everything.append(case)
        bound = bounds.get(case.gemm_key)
        if bound is not None and bound not in everything:
            everything.append(bound)
    seconds: dict[str, list[float]] = {case.name: [] for case in everything}
    # Growth of the resident set (CUDA: of the allocated memory) while a case runs: its
    # temporaries, on top of the memory after loading the data and of its own tensors.
    transient: dict[str, int] = dict.fromkeys(seconds, 0)
    base_bytes = memory.current_bytes()
    process_peak = memory.peak_bytes()

    def measured(case: _Case, function: Callable[[], object]) -> float:
        nonlocal process_peak
        memory.reset()
        start = memory.current_bytes()
        elapsed = _time(function, device)
        peak_now = memory.peak_bytes()
        transient[case.name] = max(transient[case.name], peak_now - start)
        process_peak = max(process_peak, peak_now)
        return elapsed

    for case in everything:
        measured(case, case.warm_up)
    for repeat in range(config.repeats):
        epochs = [case.epoch(chunks) for case in everything]
        for epoch in epochs:
            next(epoch)  # prepares the epoch, untimed
        for case in everything:
            seconds[case.name].append(0.0)
        for _ in chunks:
            for case, epoch in zip(everything, epochs, strict=True):
                seconds[case.name][-1] += measured(case, lambda e=epoch: next(e))
        for epoch in epochs:
            next(epoch, None)  # finishes the epoch
        say(
            f"repeat {repeat + 1}/{config.repeats}: "
            + ", ".join(f"{name} {values[-1]:.2f}s" for name, values in seconds.items())
        )
    peaks = {
        case.name: base_bytes + case.state_bytes() + transient[case.name] for case in everything
    }

    baseline = seconds[BASELINE] if config.baseline else None
    rows = []
    for case in cases:
        flop = epoch_flops(bounds[case.gemm_key].rule, examples, config.batch_size)
        bound = seconds[bounds[case.gemm_key].name]
        rows.append(_row(case.name, seconds[case.name], bound, flop, examples, peak, baseline,
                         peaks[case.name]))  # fmt: skip
    ensemble_rows = []
    for _, sequential, ensemble in pairs:
        flop = config.ensemble * epoch_flops(sequential.cases[0].rule, examples, config.batch_size)
        members = config.ensemble * examples
        base = seconds[sequential.name]
        for case in (sequential, ensemble):
            bound = seconds[bounds[case.gemm_key].name]
            ensemble_rows.append(_row(case.name, seconds[case.name], bound, flop, members, peak,
                                      base, peaks[case.name]))  # fmt: skip
    return {
        "machine": {**machine(device), "load_average_before": load_before},
        "config": asdict(config),
        "data": data_note,
        "examples": examples,
        "steps": len(batches),
        "chunks": len(chunks),
        "peak_gflops": peak,
        "memory": memory.how,
        "base_memory_mib": base_bytes / 2**20,
        "process_peak_memory_mib": process_peak / 2**20,
        "rows": [asdict(row) for row in rows],
        "ensemble": [asdict(row) for row in ensemble_rows],
    }


def _row(name, samples, gemm_samples, flop, examples, peak, baseline, peak_bytes) -> Row:
    """Medians; the ratios are medians of the per-repeat ratios (robust to drift)."""
    seconds = statistics.median(samples)
    gflops = flop / seconds / 1e9
    return Row(
        name=name,
        seconds=seconds,
        examples_per_second=examples / seconds,
        gflop=flop / 1e9,
        gflops=gflops,
        peak_fraction=gflops / peak,
        gemm_seconds=statistics.median(gemm_samples),
        gemm_ratio=statistics.median(g / s for g, s in zip(gemm_samples, samples, strict=True)),
        speedup=(
            statistics.median(b / s for b, s in zip(baseline, samples, strict=True))
            if baseline is not None
            else None
        ),
        peak_memory_mib=peak_bytes / 2**20,
        samples=list(samples),
        gemm_samples=list(gemm_samples),
    )


# ---------------------------------------------------------------------------------- output

COLUMNS = (
    ("rule", "name", "{}"),
    ("s/epoch", "seconds", "{:.4g}"),
    ("examples/s", "examples_per_second", "{:,.0f}"),
    ("GFLOP/s", "gflops", "{:.1f}"),
    ("of peak", "peak_fraction", "{:.0%}"),
    ("GEMM-only s", "gemm_seconds", "{:.4g}"),
    ("GEMM/epoch", "gemm_ratio", "{:.2f}"),
    ("speed-up", "speedup", "{:.2f}x"),
    ("peak MiB", "peak_memory_mib", "{:,.0f}"),
)


def format_table(result: dict[str, Any]) -> str:
    """The result as plain text: a header of settings and versions, then the tables."""
    m, c = result["machine"], result["config"]
    sizes = "-".join(str(n) for n in c["sizes"])
    lines = [
        f"gfalign {m['gfalign']} bench: {sizes} {c['activation']}, batch {c['batch_size']}, "
        f"{c['dtype']} on {m['device']}" + (f" ({m['gpu']})" if "gpu" in m else ""),
        f"torch {m['torch']}, python {m['python']}, {m['threads']} threads, {m['cpus']} CPUs "
        f"({m['processor']})" + (f", load average {m.get('load_average_before')} before, "
                                 f"{m['load_average']} after" if "load_average" in m else ""),
        f"data: {result['data']}; {result['examples']} examples, {result['steps']} steps per "
        f"epoch; median of {c['repeats']} epochs after {c['warmup']} warm-up steps, "
        f"interleaved in {result['chunks']} chunks",
        f"float32 matrix-product peak: {result['peak_gflops']:.1f} GFLOP/s",
        f"peak MiB of one run alone = {result['base_memory_mib']:,.0f} MiB after loading torch "
        "and the data + the run's own tensors + its largest growth while running (an upper "
        f"estimate; {result['memory']}); this process, all cases at once: "
        f"{result['process_peak_memory_mib']:,.0f} MiB",
    ]  # fmt: skip
    tables = [("", result["rows"])]
    if result["ensemble"]:
        tables.append(
            (
                f"ensemble: {c['ensemble']} members, K sequential Trainer runs against one "
                "EnsembleTrainer (speed-up over the sequential runs)",
                result["ensemble"],
            )
        )
    for title, rows in tables:
        lines.append("")
        if title:
            lines.append(title)
        cells = [[header for header, _, _ in COLUMNS]]
        for row in rows:
            cells.append(
                ["-" if row[key] is None else form.format(row[key]) for _, key, form in COLUMNS]
            )
        widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
        for index, line in enumerate(cells):
            lines.append(
                "  ".join(
                    cell.ljust(width) if i == 0 else cell.rjust(width)
                    for i, (cell, width) in enumerate(zip(line, widths, strict=True))
                )
            )
            if index == 0:
                lines.append("  ".join("-" * width for width in widths))
    lines += [
        "",
        "GFLOP/s counts the matrix products each rule computes; GEMM-only runs exactly those "
        "products back to back, timed beside the case chunk by chunk; GEMM/epoch is GEMM-only "
        f"time over epoch time; speed-up is over {BASELINE} (nn.Sequential, loss.backward(), "
        "torch.optim.SGD); both ratios are medians of the per-repeat ratios.",
    ]
    return "\n".join(lines)
