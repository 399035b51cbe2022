"""Training speed of every rule against plain autograd backprop and against the machine itself.

For one model (an MLP of given widths, or a built-in block model such as ``lenet5``), batch
size, device and dtype, ``run`` times training epochs of

- every rule through gfalign's training loop (``Trainer``; plain SGD takes the fused in-place
  path of ``FeedbackRule.sgd_step``),
- a plain PyTorch baseline of the same model: for an MLP ``nn.Sequential`` of ``nn.Linear``
  layers, for a block model the ``BlockNet`` itself (its ``forward`` is plain PyTorch), each
  with ``loss.backward()`` and ``torch.optim.SGD``, on the same batches,
- the *GEMM-only* bound of every case: the matrix products and convolutions that one real step
  of the case called (recorded while it ran, with their shapes, strides and arguments),
  replayed back to back on tensors of the same layout, nothing else,

and measures the machine's matrix-product peak in the same process. Repeats are interleaved
chunk by chunk (chunk c of every case, GEMM-only runs included, before chunk c + 1 of any),
so drift of a shared machine reaches every case alike; the tables report medians, and the
ratios (GEMM-only over epoch, speed-up over the baseline) are medians of per-repeat ratios.

Nothing here models what a rule computes: FLOPs are counted on real steps of each case
(``record_products``, with ``torch.utils.flop_counter``'s formulas for ``mm``, ``addmm``,
``bmm``, ``baddbmm``, their in-place forms, ``convolution`` and ``convolution_backward``), so
the count follows the engine whatever it runs. Element-wise work is not counted. The share of
a step's time spent in those products is read off ``torch.profiler`` (``product_share``).

Example:
    >>> config = BenchConfig(sizes=(784, 64, 64, 10), examples=2048, repeats=3)
    >>> result = run(config)  # doctest: +SKIP
    >>> print(format_table(result))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

from gfalign.engine import FeedbackRule
from gfalign.models import MODELS, build, model_spec
from gfalign.network import ACTIVATIONS, mlp
from gfalign.rules import PRESETS
from gfalign.train import TrainConfig, Trainer

__all__ = [
    "BASELINE",
    "COLUMNS",
    "MODEL_NAMES",
    "BenchConfig",
    "BenchError",
    "Operand",
    "PeakMemory",
    "Product",
    "Row",
    "epoch_batches",
    "format_table",
    "load_data",
    "machine",
    "matmul_peak",
    "product_share",
    "record_products",
    "replay_products",
    "resolve_device",
    "run",
]

BASELINE = "autograd-bp"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
MODEL_NAMES = ("mlp", *MODELS)
"""``mlp`` (the widths of ``BenchConfig.sizes``) or a built-in block model of ``gfalign.models``."""


class BenchError(ValueError):
    """A benchmark that cannot run here (no such device, bad sizes); the message says why."""


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark; the fields are the defaults and the documentation.

    Attributes:
        model: ``mlp`` (of ``sizes`` and ``activation``) or a built-in block model
            (``lenet5``: biotorch's LeNetMNIST, 32x32 inputs, MNIST resized to them).
        sizes: layer widths ``[n_0, ..., n_L]`` of the MLP (the paper's 784-800-800-10).
        activation: hidden nonlinearity of the MLP.
        batch_size: examples per step.
        rules: preset names (or configuration dictionaries) to time through gfalign.
        baseline: also time the plain autograd backprop baseline.
        optimizer_path: also time every rule through ``.grad`` and ``torch.optim.SGD.step``
            (``Trainer(fused_sgd=False)``), to show what the fused update saves.
        gemm_only: also time every case's GEMM-only bound (its recorded products alone).
        device: ``cpu``, ``cuda``, ``cuda:1`` ...
        dtype: ``float32`` or ``float64``.
        data: ``mnist`` (random tensors of MNIST's shape when MNIST cannot be loaded; the
            timing does not depend on the values) or ``synthetic`` (``gfalign.data.synthetic``).
        data_root: directory holding MNIST's files (default ``$GFALIGN_DATA``, then the cache).
        examples: training examples timed per epoch (default: all of them); seconds per epoch
            are extrapolated to the whole training set.
        repeats: timed epochs per case; the tables report their median.
        warmup: untimed steps of every case before the first timed epoch.
        profile_steps: steps of every case run under ``torch.profiler`` after the timed epochs,
            for the share of time in products (0: skip it).
        threads: ``torch.set_num_threads`` (default: leave torch's choice).
        peak_size: side of the square matrices of the peak measurement.
        ensemble: K > 0 also times K members trained sequentially against one
            ``EnsembleTrainer`` of K members, for every rule (MLP members stack into one
            computation; a block model's members run one after the other inside it).
        chunks: every epoch is timed in this many chunks of steps, chunk c of every case
            before chunk c + 1 of any, so a shared machine's noise reaches all cases alike.
        seed: seeds the networks, rules, shuffling and random data.
    """

    model: str = "mlp"
    sizes: tuple[int, ...] = (784, 800, 800, 10)
    activation: str = "tanh"
    batch_size: int = 32
    rules: tuple[str, ...] = tuple(PRESETS)
    baseline: bool = True
    optimizer_path: bool = False
    gemm_only: bool = True
    device: str = "cpu"
    dtype: str = "float32"
    data: str = "mnist"
    data_root: str | None = None
    examples: int | None = None
    repeats: int = 5
    warmup: int = 20
    profile_steps: int = 20
    threads: int | None = None
    peak_size: int = 2048
    ensemble: int = 0
    chunks: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", tuple(int(n) for n in self.sizes))
        object.__setattr__(self, "rules", tuple(self.rules))
        if self.model not in MODEL_NAMES:
            raise BenchError(f"model must be one of {', '.join(MODEL_NAMES)}, got {self.model!r}")
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
        if self.ensemble < 0 or self.warmup < 0 or self.profile_steps < 0:
            raise BenchError("ensemble, warmup and profile_steps cannot be negative")

    @property
    def label(self) -> str:
        """The model in words: ``784-800-800-10 tanh`` or ``lenet5``."""
        if self.model == "mlp":
            return "-".join(str(n) for n in self.sizes) + f" {self.activation}"
        return self.model


# ------------------------------------------------------------------------- what a step runs

aten = torch.ops.aten

# Products counted and replayed: every op ``torch.utils.flop_counter`` has a formula for, and
# the in-place forms the fused update calls (``W.addmm_(d^T, h)``), counted by their
# out-of-place formula.
_IN_PLACE = {aten.addmm_: aten.addmm, aten.baddbmm_: aten.baddbmm}
_FORMULAS = {
    packet: formula
    for packet, formula in flop_counter.flop_registry.items()
    if isinstance(packet, torch._ops.OpOverloadPacket)
}
_FORMULAS.update({packet: _FORMULAS[base] for packet, base in _IN_PLACE.items()})


@dataclass(frozen=True)
class Operand:
    """A tensor argument of a recorded product: where it lives and its layout.

    ``storage`` identifies the memory it views (operands of one step that share memory, such
    as a weight its forward reads and its update writes, share it in the replay too).
    """

    storage: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype

    @property
    def extent(self) -> int:
        """Elements of the storage it reaches, from the start."""
        if 0 in self.shape:
            return self.offset
        return (
            self.offset + 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))
        )


@dataclass(frozen=True)
class Product:
    """One matrix product or convolution a step called: the ATen op, its arguments (tensors
    as ``Operand``) and its FLOPs by ``torch.utils.flop_counter``'s formula."""

    op: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    flops: int

    @property
    def name(self) -> str:
        return str(self.op)


def _operand(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return Operand(
            value.untyped_storage().data_ptr(),
            tuple(value.shape),
            tuple(value.stride()),
            value.storage_offset(),
            value.dtype,
        )
    if isinstance(value, (list, tuple)):
        return type(value)(_operand(item) for item in value)
    return value


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.products: list[Product] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Operands before the call: an in-place product changes its first argument.
        described = (_operand(args), _operand(kwargs))
        out = func(*args, **kwargs)
        formula = _FORMULAS.get(func.overloadpacket)
        if formula is not None:
            flops = int(formula(*args, **kwargs, out_val=out))
            self.products.append(Product(func, described[0], described[1], flops))
        return out


def record_products(step: Callable[[], object]) -> list[Product]:
    """The products ``step()`` calls, in order, while it really runs.

    Example:
        >>> net = mlp([784, 16, 10], seed=0)
        >>> rule = FeedbackRule("bp", net)
        >>> x, y = torch.rand(8, 784), torch.randint(0, 10, (8,))
        >>> products = record_products(lambda: rule.sgd_step(net, x, y, lr=1e-3))
        >>> sum(p.flops for p in products) == 2 * 8 * (3 * 784 * 16 + 3 * 16 * 10 - 784 * 16)
        True
    """
    with _Recorder() as recorder:
        step()
    return recorder.products


def replay_products(products: Sequence[Product], device: torch.device) -> Callable[[], None]:
    """A function calling exactly ``products`` again, with the same ops, shapes, strides and
    arguments, on tensors allocated here (operands that shared memory share it again). The
    values are small random numbers; the outputs are allocated as the step allocates them."""
    generator = torch.Generator().manual_seed(0)
    extents: dict[tuple[int, torch.dtype], int] = {}

    def operands(value: Any) -> Iterator[Operand]:
        if isinstance(value, Operand):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from operands(item)
        elif isinstance(value, dict):
            for item in value.values():
                yield from operands(item)

    for product in products:
        for operand in operands((product.args, product.kwargs)):
            key = (operand.storage, operand.dtype)
            extents[key] = max(extents.get(key, 1), operand.extent)
    buffers = {
        key: torch.rand(n, generator=generator, dtype=key[1]).sub_(0.5).mul_(0.1).to(device)
        for key, n in extents.items()
    }

    def materialise(value: Any) -> Any:
        if isinstance(value, Operand):
            buffer = buffers[value.storage, value.dtype]
            return buffer.as_strided(value.shape, value.stride, value.offset)
        if isinstance(value, (list, tuple)):
            return type(value)(materialise(item) for item in value)
        return value

    calls = [
        (p.op, materialise(p.args), {k: materialise(v) for k, v in p.kwargs.items()})
        for p in products
    ]

    def replay() -> None:
        for op, args, kwargs in calls:
            op(*args, **kwargs)

    return replay


# A profiler event of a product: the ATen ops the products dispatch to, their backends' kernels
# (mkldnn_convolution, _slow_conv2d_*, cudnn_*), and the wrappers above them.
_PRODUCT_EVENT = re.compile(r"^aten::(_?(add|b|badd)?mm_?|matmul|linear|\w*conv\w*)$")


def product_share(
    run_steps: Callable[[int], object], steps: int, device: torch.device, *, top: int = 8
) -> tuple[float, list[dict[str, Any]]]:
    """The share of ``run_steps(steps)`` (``steps`` training steps) spent in matrix products and
    convolutions, and the ops that took the most time.

    Under ``torch.profiler``: the time of every outermost product event (``aten::mm``,
    ``addmm``, ``addmm_``, ``bmm``, ``convolution``, ``convolution_backward`` ...: self time plus
    what they call), on the CPU its CPU time, on a GPU its kernels' device time, over the wall
    time of the same steps (which includes the profiler's own small per-op cost, so the share
    is if anything low). ``top`` ops by self time come back as ``{"op", "ms_per_step",
    "calls_per_step"}``.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    run_steps(1)
    _synchronize(device)
    with profile(activities=activities) as profiler:
        started = time.perf_counter()
        run_steps(steps)
        _synchronize(device)
        wall = time.perf_counter() - started
    inside = 0.0
    for event in profiler.events():
        if not _PRODUCT_EVENT.match(event.name):
            continue
        parent = event.cpu_parent
        while parent is not None and not _PRODUCT_EVENT.match(parent.name):
            parent = parent.cpu_parent
        if parent is None:
            inside += event.device_time_total if cuda else event.cpu_time_total
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    averages = sorted(profiler.key_averages(), key=lambda a: getattr(a, key), reverse=True)
    ops = [
        {
            "op": average.key,
            "ms_per_step": getattr(average, key) / 1e3 / steps,
            "calls_per_step": average.count / steps,
        }
        for average in averages[:top]
    ]
    return inside / 1e6 / wall, ops


def epoch_batches(examples: int, batch: int) -> list[int]:
    """The batch sizes of one epoch: full batches and the smaller last one."""
    full, rest = divmod(examples, batch)
    return [batch] * full + ([rest] if rest else [])


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
    full_examples: int = 0  # the training set's size, the epoch timings are extrapolated to


def _input_shape(config: BenchConfig) -> tuple[int, ...]:
    if config.model == "mlp":
        return (config.sizes[0],)
    return tuple(MODELS[config.model]["input"])


def _classes(config: BenchConfig) -> int:
    if config.model == "mlp":
        return config.sizes[-1]
    return model_spec(config.model).outputs


def _fit_images(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """MNIST's (N, 784) in the model's input shape: flat, or (N, 1, S, S) resized bilinearly
    (as ``gfalign.models`` says a ``resize`` model reads 28x28 images); ``None`` if neither."""
    if shape == (x.shape[1],):
        return x
    if len(shape) == 3 and shape[0] == 1 and shape[1] == shape[2] and x.shape[1] == 784:
        images = x.view(-1, 1, 28, 28)
        if shape[1] == 28:
            return images
        return functional.interpolate(images, size=shape[1:], mode="bilinear", align_corners=False)
    return None


def load_data(config: BenchConfig, device: torch.device, dtype: torch.dtype) -> tuple[Any, str]:
    """The training data and a line saying what it is.

    MNIST through ``gfalign.data.load`` (never downloading), in the model's input shape (for
    ``lenet5`` resized to 32x32), else random tensors of that shape; ``synthetic`` draws
    ``gfalign.data.synthetic``. Only ``examples`` training examples and at most 1000 test
    examples are kept: the benchmark times training steps, not evaluation.
    """
    shape, n_out = _input_shape(config), _classes(config)
    n_in = math.prod(shape)
    note = ""
    train = test = None
    if config.data == "mnist":
        try:
            from gfalign.data import load

            dataset = load("mnist", root=config.data_root, download=False, quiet=True)
            note = "MNIST"
        except Exception as problem:  # any failure to load only changes the values, not timing
            dataset = None
            note = f"random tensors of MNIST's shape (MNIST not loaded: {_first_line(problem)})"
        if dataset is not None:
            count = min(config.examples or len(dataset.train), len(dataset.train))
            x = _fit_images(dataset.train.x[:count], shape) if n_out == 10 else None
            if x is None:
                note = f"random tensors (a model of {list(shape)} -> {n_out} does not fit MNIST)"
            else:
                if x.shape[1:] != dataset.train.x.shape[1:]:
                    note += f", resized to {'x'.join(str(n) for n in shape[1:])}"
                train = _Split(x, dataset.train.y[:count])
                test_x = _fit_images(dataset.test.x[:1000], shape)
                test = _Split(test_x, dataset.test.y[:1000])
                full = len(dataset.train)
        if train is None:
            generator = torch.Generator().manual_seed(config.seed)
            full = 60_000
            count = min(config.examples or full, full)
            train = _Split(
                torch.rand(count, *shape, generator=generator),
                torch.randint(0, n_out, (count,), generator=generator),
            )
            test = _Split(train.x[:1000], train.y[:1000])
    else:
        from gfalign.data import synthetic

        full = count = config.examples or 60_000
        dataset = synthetic(count, 200, seed=config.seed, features=n_in, classes=n_out)
        train = _Split(dataset.train.x.view(-1, *shape), dataset.train.y)
        test = _Split(dataset.test.x.view(-1, *shape), dataset.test.y)
        note = f"synthetic ({count} examples)"
    on_device = _Dataset(
        "bench",
        _Split(train.x.to(device=device, dtype=dtype), train.y.to(device)),
        _Split(test.x.to(device=device, dtype=dtype), test.y.to(device)),
        None,
        full,
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
# every case alike instead of whole epochs of a few. ``steps(size, count)`` runs real steps
# outside the timed epochs: to record their products and to profile them.

Chunks = Sequence[tuple[int, int]]


class _Case:
    """One timed row (or one GEMM-only bound): ``warm_up()`` once, then ``epoch(chunks)``."""

    name: str
    bound_key: str | None = None  # cases with one key share one GEMM-only bound

    def warm_up(self) -> None:
        raise NotImplementedError

    def epoch(self, chunks: Chunks) -> Iterator[None]:
        raise NotImplementedError

    def steps(self, size: int, count: int) -> None:
        """``count`` training steps of batches of ``size`` examples, outside any epoch."""
        raise NotImplementedError

    def state_bytes(self) -> int:
        """Bytes of the run's own tensors: weights, gradients, feedback matrices, optimizer."""
        return 0


def _order(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randperm(n, generator=generator).to(device)


def _network(config: BenchConfig, device, dtype, seed: int | None = None) -> nn.Module:
    """The benchmarked model: the MLP of ``config.sizes`` or the built-in block model."""
    seed = config.seed if seed is None else seed
    if config.model == "mlp":
        return mlp(config.sizes, config.activation, seed=seed, dtype=dtype, device=device)
    return build(config.model, seed=seed, dtype=dtype, device=device)


class _BatchedCase(_Case):
    """A case whose training step is ``_step(x, y)`` on one batch."""

    data: Any
    batch: int
    warmup: int
    generator: torch.Generator

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def steps(self, size: int, count: int) -> None:
        x, y = self.data.train.x, self.data.train.y
        for batch in _probe_batches(len(y), size, count, x.device):
            self._step(x.index_select(0, batch), y.index_select(0, batch))

    def warm_up(self) -> None:
        self.steps(self.batch, self.warmup)

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


class _RuleCase(_BatchedCase):
    """A rule through gfalign's training step (``Trainer.step``, as ``Trainer.train_epoch``)."""

    def __init__(self, name, rule_config, data, config: BenchConfig, device, dtype, fused=True):
        net = _network(config, device, dtype)
        self.rule = FeedbackRule(rule_config, net, seed=config.seed, dtype=dtype, device=device)
        self.name = name.format(rule=self.rule.config.name)
        self.bound_key = self.rule.config.name
        train_config = TrainConfig(
            batch_size=config.batch_size, lr=1e-4, seed=config.seed, evaluate_train=False
        )
        self.trainer = Trainer(net, self.rule, data, train_config, fused_sgd=fused)
        self.generator = self.trainer.generator
        self.data, self.warmup, self.batch = data, config.warmup, config.batch_size

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.trainer.step(x, y)

    def state_bytes(self) -> int:
        return _tensor_bytes(self.trainer.net, self.trainer.rule, self.trainer.optimizer)


class _AutogradCase(_BatchedCase):
    """Plain PyTorch on the same model: ``loss.backward()``, ``torch.optim.SGD``.

    The MLP is an ``nn.Sequential`` of ``nn.Linear`` layers holding the MLP's initial weights (as
    docs/performance.md's figures were measured); a block model is the ``BlockNet`` itself,
    whose ``forward`` is plain PyTorch.
    """

    def __init__(self, data, config: BenchConfig, device, dtype):
        self.name = self.bound_key = BASELINE
        start = _network(config, device, dtype)
        if config.model == "mlp":
            activation = ACTIVATIONS[config.activation].module
            layers: list[nn.Module] = []
            for index, (fan_in, fan_out) in enumerate(
                zip(config.sizes[:-1], config.sizes[1:], strict=False)
            ):
                layers.append(nn.Linear(fan_in, fan_out))
                if index < len(config.sizes) - 2:
                    layers.append(activation())
            self.model: nn.Module = nn.Sequential(*layers).to(device=device, dtype=dtype)
            linear = [layer for layer in self.model if isinstance(layer, nn.Linear)]
            with torch.no_grad():
                for mine, theirs in zip(linear, start.layers, strict=True):
                    mine.weight.copy_(theirs.weight)
                    mine.bias.copy_(theirs.bias)
        else:
            self.model = start
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.data, self.batch, self.warmup = data, config.batch_size, config.warmup

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad()
        loss = functional.cross_entropy(self.model(x), y, reduction="sum")
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def state_bytes(self) -> int:
        return _tensor_bytes(self.model, self.optimizer)


class _ProductsCase(_Case):
    """The GEMM-only bound of a case: the products its steps called (``record_products``),
    replayed alone (``replay_products``) for the batch sizes of every chunk."""

    def __init__(self, key: str, recorded: dict[int, list[Product]], batches, device):
        self.name, self.bound_key = f"GEMM-only {key}", key
        self.replays = {size: replay_products(p, device) for size, p in recorded.items()}
        self.batches = list(batches)

    def warm_up(self) -> None:
        for size in self.batches[:3]:
            self.replays[size]()

    def epoch(self, chunks: Chunks) -> Iterator[None]:
        yield
        for first, last in chunks:
            for size in self.batches[first:last]:
                self.replays[size]()
            yield


class _SequentialCase(_Case):
    """K members trained one after the other, each with its own ``Trainer``.

    Every chunk runs the chunk's steps of member 1, then member 2, ...: K whole epochs in all.
    """

    def __init__(self, name, rule_config, data, config: BenchConfig, device, dtype):
        self.name = self.bound_key = name
        self.cases = [
            _RuleCase(name, rule_config, data, _with_seed(config, config.seed + k), device, dtype)
            for k in range(config.ensemble)
        ]

    def warm_up(self) -> None:
        for case in self.cases:
            case.warm_up()

    def steps(self, size: int, count: int) -> None:
        for case in self.cases:
            case.steps(size, count)

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

        self.name = self.bound_key = name
        seeds = [config.seed + k for k in range(config.ensemble)]
        nets = [_network(config, device, dtype, seed) for seed in seeds]
        rules = [FeedbackRule(rule_config, net, seed=seed, dtype=dtype, device=device)
                 for net, seed in zip(nets, seeds, strict=True)]  # fmt: skip
        configs = [
            TrainConfig(batch_size=config.batch_size, lr=1e-4, seed=s, evaluate_train=False)
            for s in seeds
        ]
        self.trainer = EnsembleTrainer(nets, rules, data, configs)
        self.warmup, self.batch = config.warmup, config.batch_size

    def state_bytes(self) -> int:
        trainer = self.trainer  # the members' own tensors and the stacked net and rule
        members = [part for m in trainer.members for part in (m.net, m.rule, m.optimizer)]
        if not trainer.stacks:  # a block model's members train one after the other
            return _tensor_bytes(*members)
        return _tensor_bytes(*members, trainer._net, trainer._rule)

    def steps(self, size: int, count: int) -> None:
        trainer = self.trainer
        epoch = trainer.begin_epoch()
        # The first step has a full batch, the last one the epoch's smaller rest.
        step = 0 if size == self.batch else epoch.steps - 1
        for _ in range(count):
            trainer.train_step(epoch, step)
        if trainer.stacks:
            trainer._unstack(list(epoch.active))

    def warm_up(self) -> None:
        trainer = self.trainer
        epoch = trainer.begin_epoch()
        for step in range(min(self.warmup, epoch.steps)):
            trainer.train_step(epoch, step)
        if trainer.stacks:
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
        if trainer.stacks:
            trainer._unstack(list(epoch.active))
        _check_finite(self.name, losses)


def _check_finite(name: str, losses: list[torch.Tensor]) -> None:
    if not bool(torch.isfinite(torch.stack(losses)).all()):
        raise BenchError(f"{name}: the loss diverged during the benchmark")


def _probe_batches(n: int, size: int, steps: int, device: torch.device) -> list[torch.Tensor]:
    """``steps`` batches of exactly ``size`` examples (``size <= n``) of a fixed shuffle."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1)).to(device)
    positions = torch.arange(size, device=device)
    return [order[(positions + step * size) % n] for step in range(steps)]


def _with_seed(config: BenchConfig, seed: int) -> BenchConfig:
    values = asdict(config)
    values["seed"] = seed
    return BenchConfig(**values)


# ------------------------------------------------------------------------------------ run


@dataclass
class Row:
    """The measurements of one case (medians over the repeats).

    ``seconds`` is per epoch of the whole training set (extrapolated from the timed examples
    when fewer were timed); ``samples`` are the timed seconds of each repeat.
    """

    name: str
    seconds: float
    examples_per_second: float
    gflop: float
    gflops: float
    peak_fraction: float
    gemm_seconds: float | None
    gemm_ratio: float | None
    speedup: float | None
    products_share: float | None
    peak_memory_mib: float
    samples: list[float] = field(default_factory=list)
    gemm_samples: list[float] = field(default_factory=list)
    top_ops: list[dict[str, Any]] = field(default_factory=list)


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
    pairs: list[tuple[_SequentialCase, _EnsembleCase]] = []
    for name in config.rules if config.ensemble else ():
        label = (
            f"{name if isinstance(name, str) else name.get('name', 'custom')} x{config.ensemble}"
        )
        pairs.append(
            (
                _SequentialCase(f"{label} sequential", name, data, config, device, dtype),
                _EnsembleCase(f"{label} ensemble", name, data, config, device, dtype),
            )
        )
    measured_cases = cases + [case for pair in pairs for case in pair]

    # One real step of every case at every batch size of an epoch, recorded: its FLOPs and
    # the products its GEMM-only bound replays.
    recorded: dict[str, dict[int, list[Product]]] = {}
    for case in measured_cases:
        recorded[case.name] = {
            size: record_products(lambda case=case, size=size: case.steps(size, 1))
            for size in sorted(set(batches))
        }
    flop = {
        name: sum(sum(p.flops for p in products[size]) for size in batches)
        for name, products in recorded.items()
    }
    bounds: dict[str, _Case] = {}
    for case in measured_cases if config.gemm_only else ():
        if case.bound_key not in bounds:
            bounds[case.bound_key] = _ProductsCase(
                case.bound_key, recorded[case.name], batches, device
            )

    everything: list[_Case] = []
    for case in measured_cases:
        everything.append(case)
        bound = bounds.get(case.bound_key)
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
    profiles: dict[str, tuple[float | None, list[dict[str, Any]]]] = {}
    for case in measured_cases:
        if config.profile_steps:
            profiles[case.name] = product_share(
                lambda count, case=case: case.steps(config.batch_size, count),
                config.profile_steps,
                device,
            )
        else:
            profiles[case.name] = (None, [])
    if config.profile_steps:
        say(f"profiled {config.profile_steps} steps of every case")

    scale = data.full_examples / examples  # timed epoch -> the whole training set

    def row(case: _Case, baseline: list[float] | None, members: int = 1) -> Row:
        bound = bounds.get(case.bound_key)
        share, ops = profiles[case.name]
        return _row(
            case.name,
            seconds[case.name],
            None if bound is None else seconds[bound.name],
            flop[case.name],
            members * examples,
            scale,
            peak,
            baseline,
            peaks[case.name],
            share,
            ops,
        )

    baseline = seconds[BASELINE] if config.baseline else None
    rows = [row(case, baseline) for case in cases]
    ensemble_rows = [
        row(case, seconds[sequential.name], config.ensemble)
        for sequential, ensemble in pairs
        for case in (sequential, ensemble)
    ]
    return {
        "machine": {**machine(device), "load_average_before": load_before},
        "config": asdict(config),
        "model": config.label,
        "data": data_note,
        "examples": examples,
        "epoch_examples": data.full_examples,
        "steps": len(batches),
        "chunks": len(chunks),
        "peak_gflops": peak,
        "memory": memory.how,
        "base_memory_mib": base_bytes / 2**20,
        "process_peak_memory_mib": process_peak / 2**20,
        "rows": [asdict(r) for r in rows],
        "ensemble": [asdict(r) for r in ensemble_rows],
    }


def _row(
    name, samples, gemm_samples, flop, examples, scale, peak, baseline, peak_bytes, share, ops
) -> Row:
    """Medians; the ratios are medians of the per-repeat ratios (robust to drift)."""
    timed = statistics.median(samples)
    gflops = flop / timed / 1e9
    return Row(
        name=name,
        seconds=timed * scale,
        examples_per_second=examples / timed,
        gflop=flop * scale / 1e9,
        gflops=gflops,
        peak_fraction=gflops / peak,
        gemm_seconds=None if gemm_samples is None else statistics.median(gemm_samples) * scale,
        gemm_ratio=(
            None
            if gemm_samples is None
            else statistics.median(g / s for g, s in zip(gemm_samples, samples, strict=True))
        ),
        speedup=(
            statistics.median(b / s for b, s in zip(baseline, samples, strict=True))
            if baseline is not None
            else None
        ),
        products_share=share,
        peak_memory_mib=peak_bytes / 2**20,
        samples=list(samples),
        gemm_samples=list(gemm_samples or []),
        top_ops=list(ops),
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
    ("in products", "products_share", "{:.0%}"),
    ("speed-up", "speedup", "{:.2f}x"),
    ("peak MiB", "peak_memory_mib", "{:,.0f}"),
)


def format_table(result: dict[str, Any], *, top_ops: int = 0) -> str:
    """The result as plain text: a header of settings and versions, then the tables, then
    (``top_ops`` > 0) the ops that took the most time in each case's profiled steps."""
    m, c = result["machine"], result["config"]
    timed, full = result["examples"], result.get("epoch_examples", result["examples"])
    epoch = f"{timed} examples, {result['steps']} steps per epoch"
    if full != timed:
        epoch = (
            f"{timed} examples ({result['steps']} steps) timed per epoch, seconds extrapolated "
            f"to the {full:,} of the training set"
        )
    lines = [
        f"gfalign {m['gfalign']} bench: {result.get('model', c['model'])}, batch "
        f"{c['batch_size']}, {c['dtype']} on {m['device']}"
        + (f" ({m['gpu']})" if "gpu" in m else ""),
        f"torch {m['torch']}, python {m['python']}, {m['threads']} threads, {m['cpus']} CPUs "
        f"({m['processor']})" + (f", load average {m.get('load_average_before')} before, "
                                 f"{m['load_average']} after" if "load_average" in m else ""),
        f"data: {result['data']}; {epoch}; median of {c['repeats']} epochs after {c['warmup']} "
        f"warm-up steps, interleaved in {result['chunks']} chunks",
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
        "GFLOP/s counts the matrix products and convolutions one real step of each case called "
        "(torch.utils.flop_counter's formulas); GEMM-only replays exactly those products back "
        "to back, timed beside the case chunk by chunk; GEMM/epoch is GEMM-only time over epoch "
        f"time; in products is the share of {c['profile_steps']} profiled steps (torch.profiler) "
        f"spent in them; speed-up is over {BASELINE} (plain autograd: loss.backward(), "
        "torch.optim.SGD); both ratios are medians of the per-repeat ratios.",
    ]
    if top_ops:
        for row in result["rows"] + result["ensemble"]:
            if not row["top_ops"]:
                continue
            lines += ["", f"{row['name']}: ops by self time per step (ms, calls)"]
            for op in row["top_ops"][:top_ops]:
                lines.append(
                    f"  {op['op']:<44} {op['ms_per_step']:8.3f}  {op['calls_per_step']:5.1f}"
                )
    return "\n".join(lines)
