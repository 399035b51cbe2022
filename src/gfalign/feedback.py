"""Families of fixed random feedback matrices.

A family is a function ``(shape, generator, **params) -> tensor`` registered by name (float64 on
the CPU, unless ``draw`` is asked for another dtype and device).
Adding a family is one decorated function here; rules, the CLI and the experiment files refer
to families by name, with parameters, e.g. ``"sparse:density=0.2"`` or
``FeedbackSpec("B1", {"std": 0.05})``.

Shapes follow the row convention: a feedback product is ``s @ B`` with ``s`` of shape
(N, rows), so ``rows`` is the fan-in of the product and ``cols`` the width of the layer that
receives the error.

Families B1..B7 are those of the paper's experiment 4 (DESIGN.md section 5.5): noise is
Gaussian with standard deviation ``std`` (default 0.01), sparsity keeps each entry with
probability ``density`` (default 0.1), and a non-square identity is ones on the main diagonal.
Other readings of the paper's text are parameters, whose defaults draw exactly what the
readings above draw: ``std = 0.1`` reads "N(0, 0.01)" as a variance; ``tiled = true`` (B2, B3)
repeats the identity block along the longer side, so that every unit of a wide layer receives
one entry of the error; B5's uniform noise takes its half-width ``width`` (default 0.01, the
paper's interval) or its standard deviation ``std`` (half-width ``std * sqrt(3)``).

    >>> draw("B2:tiled=true", (2, 5), generator_for(0))
    tensor([[1., 0., 1., 0., 1.],
            [0., 1., 0., 1., 0.]], dtype=torch.float64)
"""

from __future__ import annotations

import contextvars
import difflib
import hashlib
import inspect
import json
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

__all__ = [
    "FAMILIES",
    "FeedbackSpec",
    "draw",
    "family",
    "generator_for",
    "parse_named",
]

Family = Callable[..., torch.Tensor]
FAMILIES: dict[str, Family] = {}
DESCRIPTIONS: dict[str, str] = {}


def family(name: str, description: str) -> Callable[[Family], Family]:
    """Register a feedback-matrix family under ``name``."""

    def register(function: Family) -> Family:
        if name in FAMILIES:
            raise ValueError(f"feedback family {name!r} is registered twice")
        FAMILIES[name] = function
        DESCRIPTIONS[name] = description
        return function

    return register


# Where draws are made: float64 on the CPU, unless ``draw`` is asked for another dtype and device
# (a per-step redraw on the model's own device, say). The families' helpers read it.
_WHERE: contextvars.ContextVar[tuple] = contextvars.ContextVar(
    "where", default=(torch.float64, None)
)


def _where() -> dict:
    dtype, device = _WHERE.get()
    return {"dtype": dtype, "device": device}


def _uniform(shape, generator, low, high):
    return torch.empty(shape, **_where()).uniform_(low, high, generator=generator)


def _normal(shape, generator, std):
    return torch.empty(shape, **_where()).normal_(0.0, std, generator=generator)


def _identity(shape, tiled):
    """Ones where ``row % k == col % k``, ``k = min(rows, cols)``: the main diagonal when not
    ``tiled``; tiled, the k x k identity repeated along the longer side (for a square matrix
    both are the identity)."""
    if len(shape) != 2:
        raise ValueError(f"an identity matrix has two dimensions, not shape {list(shape)}")
    where = _where()
    if not tiled:
        return torch.eye(*shape, **where)
    rows, cols = shape
    k = min(rows, cols)
    device = where["device"]
    rows_, cols_ = torch.arange(rows, device=device), torch.arange(cols, device=device)
    return (rows_[:, None] % k == cols_[None, :] % k).to(where["dtype"])


def _mask(shape, generator, density):
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must lie in (0, 1], got {density}")
    where = _where()
    return (torch.rand(shape, generator=generator, **where) < density).to(where["dtype"])


@family("uniform", "U(low, high), default U(-1/2, 1/2): the paper's feedback")
def uniform(shape, generator, *, low: float = -0.5, high: float = 0.5) -> torch.Tensor:
    return _uniform(shape, generator, low, high)


@family("gaussian", "N(0, std^2), default std 1")
def gaussian(shape, generator, *, std: float = 1.0) -> torch.Tensor:
    return _normal(shape, generator, std)


@family("uniform-scaled", "U(-1/sqrt(rows), 1/sqrt(rows)): fan-in scaled, as Noekland uses")
def uniform_scaled(shape, generator) -> torch.Tensor:
    bound = 1.0 / math.sqrt(shape[0])
    return _uniform(shape, generator, -bound, bound)


@family("gaussian-scaled", "N(0, 1/rows): fan-in scaled, as Launay et al. use")
def gaussian_scaled(shape, generator) -> torch.Tensor:
    return _normal(shape, generator, 1.0 / math.sqrt(shape[0]))


@family(
    "xavier",
    "U(-a, a), a = sqrt(6 / (fan_in + fan_out)) of the shape (a kernel's fans count its "
    "receptive field): Glorot's uniform, as biotorch initialises feedback",
)
def xavier(shape, generator) -> torch.Tensor:
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    fan_in = (shape[1] if len(shape) > 1 else shape[0]) * receptive
    fan_out = shape[0] * receptive
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return _uniform(shape, generator, -bound, bound)


@family("sparse", "U(low, high) entries kept with probability density (default 0.1)")
def sparse(
    shape, generator, *, density: float = 0.1, low: float = -0.5, high: float = 0.5
) -> torch.Tensor:
    return _mask(shape, generator, density) * _uniform(shape, generator, low, high)


@family("B1", "ones + N(0, std^2) noise (std 0.01)")
def ones_noise(shape, generator, *, std: float = 0.01) -> torch.Tensor:
    return 1.0 + _normal(shape, generator, std)


@family(
    "B2",
    "non-square identity: ones on the main diagonal (tiled=true: the identity block repeated "
    "along the longer side)",
)
def identity(shape, generator, *, tiled: bool = False) -> torch.Tensor:
    return _identity(shape, tiled)


@family("B3", "non-square identity (tiled=true: repeated) + N(0, std^2) noise (std 0.01)")
def identity_noise(shape, generator, *, std: float = 0.01, tiled: bool = False) -> torch.Tensor:
    return _identity(shape, tiled) + _normal(shape, generator, std)


@family("B4", "sparse ones: each entry 1 with probability density (0.1), else 0")
def sparse_ones(shape, generator, *, density: float = 0.1) -> torch.Tensor:
    return _mask(shape, generator, density)


@family("B5", "ones + U(-width, width), width 0.01 (or std: width = std * sqrt(3))")
def ones_uniform(
    shape, generator, *, width: float = 0.01, std: float | None = None
) -> torch.Tensor:
    if std is not None:
        width = std * math.sqrt(3.0)  # U(-w, w) has standard deviation w / sqrt(3)
    return 1.0 + _uniform(shape, generator, -width, width)


@family("B6", "sparse ones (density 0.1) + N(0, std^2) noise (std 0.01)")
def sparse_ones_noise(shape, generator, *, density: float = 0.1, std: float = 0.01) -> torch.Tensor:
    return _mask(shape, generator, density) + _normal(shape, generator, std)


@family("B7", "noise alone: N(0, std^2), std 0.01")
def noise(shape, generator, *, std: float = 0.01) -> torch.Tensor:
    return _normal(shape, generator, std)


# What every family parameter of a name allows: (lower bound, inclusive?, upper bound).
_PARAMETER_RANGES: dict[str, tuple[float, bool, float]] = {
    "density": (0.0, False, 1.0),  # a probability of keeping an entry: (0, 1]
    "std": (0.0, False, math.inf),  # a standard deviation: > 0
    "width": (0.0, False, math.inf),  # the half-width of a uniform interval: > 0
}


def _range_text(name: str) -> str:
    low, inclusive, high = _PARAMETER_RANGES.get(name, (-math.inf, True, math.inf))
    if high < math.inf:
        return f"a number in {'[' if inclusive else '('}{low:g}, {high:g}]"
    if low > -math.inf:
        return f"a number {'>=' if inclusive else '>'} {low:g}"
    return "a finite number"


def _check_params(name: str, params: Mapping[str, object]) -> None:
    """Refuse parameters ``name``'s function does not take, and values out of their range."""
    signature = inspect.signature(FAMILIES[name])
    known = {
        p.name: p.default
        for p in signature.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    where = f"bad parameters for feedback family {name!r}: "
    for key, value in params.items():
        if key not in known:
            if not known:
                raise ValueError(f"{where}it takes none, got {key!r}")
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}unknown parameter {key!r}{hint}; known: {', '.join(known)}")
        shown = _show(value)
        if isinstance(known[key], bool):
            if not isinstance(value, bool):
                raise ValueError(f"{where}{key} = {shown} is not a boolean; allowed: true or false")
            continue
        allowed = _range_text(key)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{where}{key} = {shown} is not a number; allowed: {allowed}")
        low, inclusive, high = _PARAMETER_RANGES.get(key, (-math.inf, True, math.inf))
        inside = (value >= low if inclusive else value > low) and value <= high
        if not math.isfinite(value) or not inside:
            raise ValueError(f"{where}{key} = {shown} is out of range; allowed: {allowed}")
    if "width" in params and "std" in params:
        raise ValueError(
            f"{where}width = {_show(params['width'])} and std = {_show(params['std'])} both set "
            "the noise's scale; allowed: one of them"
        )
    if "low" in known and "high" in known:
        low, high = params.get("low", known["low"]), params.get("high", known["high"])
        if not low < high:
            raise ValueError(f"{where}low = {low} and high = {high}; allowed: low < high")


def _show(value: object) -> str:
    """A parameter value as it is written: ``true``, ``0.1``, ``"abc"``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else str(value)


def parse_named(text: str, what: str) -> tuple[str, dict[str, bool | float | int | str]]:
    """``"name:key=value,key=value"`` as ``(name, params)``, each value a number, a true/false
    switch or a string; a ``ValueError`` names an item that is not ``key=value``."""
    name, _, rest = text.partition(":")
    params = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, equals, value = item.partition("=")
        if not equals:
            raise ValueError(f"{what} parameter {item!r} in {text!r} is not key=value")
        params[key.strip()] = _parse_value(value.strip())
    return name.strip(), params


def _parse_value(text: str) -> bool | float | int | str:
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True)
class FeedbackSpec:
    """A family name with its parameters; ``FeedbackSpec.parse("sparse:density=0.2")``.

    Unknown families and parameters are refused with the known ones; a density must lie in
    (0, 1], a standard deviation (``std``) and a half-width (``width``) must be positive, a
    switch (``tiled``) is ``true`` or ``false``, every other parameter a finite number, and
    ``low < high``.
    """

    family: str = "uniform"
    params: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.family, str):
            raise ValueError(
                f"feedback family {self.family!r} is not a name; known: {', '.join(FAMILIES)}"
            )
        if self.family not in FAMILIES:
            close = difflib.get_close_matches(self.family, FAMILIES, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(
                f"unknown feedback family {self.family!r}{hint}; known: {', '.join(FAMILIES)}"
            )
        if not isinstance(self.params, Mapping):
            raise ValueError(f"feedback parameters must be a table, got {self.params!r}")
        object.__setattr__(self, "params", dict(self.params))
        _check_params(self.family, self.params)

    @classmethod
    def parse(cls, value: str | Mapping | FeedbackSpec) -> FeedbackSpec:
        """Read ``"name"``, ``"name:key=value,key=value"`` or ``{"family": ..., **params}``."""
        if isinstance(value, FeedbackSpec):
            return value
        if isinstance(value, Mapping):
            params = dict(value)
            name = params.pop("family", "uniform")
            return cls(name, params)
        name, params = parse_named(str(value), "feedback")
        return cls(name, params)

    def __str__(self) -> str:
        if not self.params:
            return self.family
        return self.family + ":" + ",".join(f"{k}={_show(v)}" for k, v in self.params.items())


def generator_for(seed: int, *labels: object) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and labels, independent of drawing order.

    Every feedback matrix gets its own generator, so a matrix's values depend only on the seed
    and its place in the network, not on which other matrices a configuration draws.
    """
    text = "/".join(str(part) for part in (seed, *labels))
    digest = hashlib.sha256(text.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def draw(
    spec: FeedbackSpec | str,
    shape: tuple[int, ...],
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
):
    """Draw one matrix of ``shape`` from a family; float64 on the CPU unless ``dtype`` and
    ``device`` say otherwise (``generator`` must then live on ``device``)."""
    spec = FeedbackSpec.parse(spec)
    token = _WHERE.set((dtype, device))
    try:
        matrix = FAMILIES[spec.family](tuple(shape), generator, **spec.params)
    except TypeError as error:
        raise ValueError(f"bad parameters for feedback family {spec}: {error}") from None
    finally:
        _WHERE.reset(token)
    return matrix
