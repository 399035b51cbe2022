"""The kinds of error term and the kinds of feedback: each declared once, here.

A rule (``gfalign.rules``) is a list of terms per hidden layer; the engine
(``gfalign.engine``) computes them. Neither looks at a kind's name: both read what it is
declared to be in ``KINDS`` and ``MODES``, so a new kind of term, error signal or feedback is
one declaration in this module.

**Term kinds** (DESIGN.md sections 3 and 9). A term of hidden layer ``i`` either projects an
error signal through a dense matrix (``direct``), or runs one block's linear part on a
neighbour's delta: backwards through block ``i + 1`` (``above``, ``backprop``) or forwards
through block ``i`` on the lower signal (``below``), with fixed feedback parameters in place of
the forward ones (``above``, ``below``) or with the forward ones themselves (``backprop``).

**Signals** of a direct term: the output error ``e``, the layer's own auxiliary error ``e^i``
(LAFS), or the one-hot target (DRTP, Frenkel et al. 2021), which needs no output at all.

**Feedback modes** of a term with feedback parameters: how its parameters are had each step.
``fixed`` draws them once (FA, the paper's rule); the sign-concordant modes read the sign of
the live forward parameters they stand for (Liao et al. 2016; biotorch's uSF, brSF, frSF);
``kp`` learns them with the forward parameters' own update (Kolen-Pollack, Akrout et al. 2019).

Example:
    >>> KINDS["above"].reads, KINDS["above"].part, KINDS["above"].backward
    (1, 1, True)
    >>> print(ModeSpec.parse("kp:decay=1e-4"))
    kp:decay=0.0001
"""

from __future__ import annotations

import difflib
import hashlib
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from gfalign.feedback import parse_named

__all__ = [
    "KINDS",
    "MODES",
    "SIGNALS",
    "SOURCES",
    "Mode",
    "ModeSpec",
    "Signal",
    "TermKind",
    "step_generator",
]

SOURCES = ("final", "direct-only")


@dataclass(frozen=True)
class TermKind:
    """What one kind of term is, for the rule and for the engine.

    Attributes:
        name: its name in configurations.
        value: its value at block ``i``, in DESIGN.md's notation (documentation).
        option: the option its short form ``kind:option`` sets (``"error"``, ``"source"``), or
            ``None``.
        reads: ``j - i`` for the neighbour ``j`` whose delta it reads; ``None`` for a term that
            reads an error signal (a ``Signal``) instead.
        part: ``k - i`` for the block ``k`` whose linear part it runs; ``None`` for a dense
            matrix from the error signal.
        backward: it runs that part backwards (a VJP, then back through block ``i``'s tail);
            else forwards (a JVP on the lower tail's linearisation).
        fixed: its parameters are feedback parameters standing in for block ``k``'s (drawn,
            sign-concordant or learned: ``MODES``); else the forward parameters themselves.
        symbol: the neighbour's name in ``describe()`` (``"i+1"``).
        always_final: it reads the neighbour's final delta whatever its source (backprop).
        tiled: it runs block ``k``'s part backwards on the output error ``e`` tiled over
            ``a^k``'s positions, with a fixed kernel of ``n_out`` output channels in place of
            the part's weight (biotorch's DFA for conv layers), instead of on a delta.
    """

    name: str
    value: str
    option: str | None
    reads: int | None
    part: int | None
    backward: bool = True
    fixed: bool = True
    symbol: str = ""
    always_final: bool = False
    tiled: bool = False

    @property
    def has_parameters(self) -> bool:
        """Whether the term holds feedback parameters of its own (a matrix or a part's)."""
        return self.fixed

    @property
    def is_direct(self) -> bool:
        return self.part is None


KINDS: dict[str, TermKind] = {
    kind.name: kind
    for kind in (
        TermKind(
            "direct",
            "reshape(eps^i D^i), D^i dense (n_out, numel(a^i))",
            option="error",
            reads=None,
            part=None,
        ),
        TermKind(
            "above",
            "J_tau_i^T J_phi_{i+1}(theta~)^T s^{i+1}: block i+1's backward, fixed parameters",
            option="source",
            reads=1,
            part=1,
            symbol="i+1",
        ),
        TermKind(
            "below",
            "J_phi_i(theta~) J_tau_{i-1} s^{i-1}: block i's part, fixed parameters, no bias",
            option="source",
            reads=-1,
            part=0,
            backward=False,
            symbol="i-1",
        ),
        TermKind(
            "tiled",
            "J_tau_i^T J_phi_{i+1}(K~)^T tile(e): block i+1's backward with a fixed kernel of "
            "n_out output channels, on the output error tiled over a^{i+1}'s positions",
            option=None,
            reads=None,
            part=1,
            symbol="i+1",
            tiled=True,
        ),
        TermKind(
            "backprop",
            "J_tau_i^T J_phi_{i+1}(theta_{i+1})^T d^{i+1}: weight transport",
            option=None,
            reads=1,
            part=1,
            fixed=False,
            symbol="i+1",
            always_final=True,
        ),
    )
}


@dataclass(frozen=True)
class Signal:
    """The error signal a direct term projects.

    Attributes:
        name: its name (the ``error`` option of a direct term).
        symbol: its symbol in ``describe()``.
        local: it is computed from the layer's own activity (an auxiliary classifier on
            ``h^i`` through ``D^i``), so its matrix has ``numel(h^i)`` columns and the value
            goes back through the block's tail; else it is one (N, n_out) signal for the whole
            batch, and its matrix has ``numel(a^i)`` columns.
        labels: it needs class labels (an autoencoder has none).
        make: for a non-local signal, ``make(e, target, n_out)`` gives it from the output
            error and the target (labels for classification).
        order: direct terms are stacked by signal in this order, so that one product per
            signal reaches every layer.
        reads: for a local signal, the layer activity its classifier reads: ``"post"``
            (``h^i``, after the block's activation and tail), ``"pre"`` (``a^i``, before
            them; the matrix then has ``numel(a^i)`` columns and the value stays in ``a^i``'s
            shape) or ``"input"`` (the block's input ``h^{i-1}``, through a fixed classifier
            matrix ``C^i`` of its own, (n_out, numel(h^{i-1})); ``D^i`` then projects the
            error to ``a^i``).
        against: for a local signal, what its classifier's prediction is compared with: the
            ``"target"`` (``e^i = softmax(logits) - y``) or the network's own ``"prediction"``
            (``e^i = softmax(logits) - softmax(z)``, ``z`` the output logits, held fixed).
    """

    name: str
    symbol: str
    local: bool = False
    labels: bool = False
    make: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None
    order: int = 0
    reads: str = "post"
    against: str = "target"


def _one_hot(e: torch.Tensor, target: torch.Tensor, n_out: int) -> torch.Tensor:
    """The one-hot target y* (DRTP's signal, with the sign of Frenkel et al.: ``+y*``)."""
    labels = target.expand(e.shape[:-1]).unsqueeze(-1)  # stacked members share the labels
    return torch.zeros_like(e).scatter_(-1, labels, 1.0)


SIGNALS: dict[str, Signal] = {
    signal.name: signal
    for signal in (
        Signal("output", "e", make=lambda e, target, n_out: e, order=0),
        Signal("target", "y*", labels=True, make=_one_hot, order=1),
        Signal("auxiliary", "e^i", local=True, labels=True, order=2),
        # A reading of LAFS's auxiliary classifier: its logits from a^i instead of h^i.
        Signal("auxiliary-pre", "e^i(a)", local=True, labels=True, order=2, reads="pre"),
        # Section 2.1.1's logits as written, a_x^i = (B^i)^T h^{i-1}: a classifier on the input.
        Signal("auxiliary-input", "e^i(h^{i-1})", local=True, labels=True, order=2, reads="input"),
        # Section 2.1.1's layer loss as written, L^i(y^i, y_hat): against the network's output.
        Signal(
            "auxiliary-prediction", "e^i(ŷ)", local=True, labels=True, order=2, against="prediction"
        ),
    )
}


# ---------------------------------------------------------------------------- feedback modes


def step_generator(seed: int, step: int, *labels: object, device=None) -> torch.Generator:
    """A generator for training step ``step`` of one term, independent of any other draw, so a
    per-step redraw (brSF) is reproducible under a seed and resumes exactly from a checkpoint."""
    text = "/".join(str(part) for part in (seed, "step", step, *labels))
    digest = hashlib.sha256(text.encode()).digest()
    generator = torch.Generator(device=device or "cpu")
    return generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _xavier_scale(shape: tuple[int, ...]) -> float:
    """``sqrt(2 / (fan_in + fan_out))`` of a parameter of ``shape`` (Xavier's std)."""
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    fan_out = shape[0] * receptive
    fan_in = (shape[1] if len(shape) > 1 else 1) * receptive
    return math.sqrt(2.0 / (fan_in + fan_out))


@dataclass(frozen=True)
class Mode:
    """How a term's feedback parameters are had each step.

    Attributes:
        name: its name (a term's ``mode``).
        description: one line for listings.
        params: its parameters and their defaults.
        stored: what the term's buffer keeps between steps: ``"draw"`` (a draw from the term's
            family), ``"magnitude"`` (``|R|``, R a draw from the family), or ``None`` (nothing:
            the value is made afresh every step).
        sign: the value each step is ``M * sign(theta)`` of the live forward parameters, with
            ``M`` the stored magnitude, a redrawn one (``redraw``) or a scale.
        redraw: ``M = |R|`` is drawn afresh every training step.
        learned: the parameters learn: they receive the forward parameters' gradient, so an
            optimizer takes the same step on both, and both shrink by ``1 - decay`` every
            training step (Kolen-Pollack: ``Delta theta = -eta g - decay theta``).
    """

    name: str
    description: str
    params: Mapping[str, float | str] = field(default_factory=dict)
    stored: str | None = "draw"
    sign: bool = False
    redraw: bool = False
    learned: bool = False

    @property
    def live(self) -> bool:
        """Its value depends on the forward parameters or the step: made every step."""
        return self.sign


MODES: dict[str, Mode] = {
    mode.name: mode
    for mode in (
        Mode("fixed", "drawn once from the term's family and kept (FA, DFA, the paper's rule)"),
        Mode(
            "usf",
            "uniform sign-concordant: scale * sign(theta), scale Xavier's std of theta's shape "
            "unless given",
            params={"scale": "xavier"},
            stored=None,
            sign=True,
        ),
        Mode(
            "frsf",
            "fixed random-magnitude sign-concordant: |R| * sign(theta), R drawn once",
            stored="magnitude",
            sign=True,
        ),
        Mode(
            "brsf",
            "batchwise random-magnitude sign-concordant: |R| * sign(theta), R redrawn every step",
            stored=None,
            sign=True,
            redraw=True,
        ),
        Mode(
            "kp",
            "Kolen-Pollack: learned, with the forward parameters' update; both shrink by "
            "(1 - decay) every step",
            params={"decay": 0.0},
            learned=True,
        ),
    )
}


def _suggest(word: object, known) -> str:
    known = list(known)
    close = difflib.get_close_matches(str(word), known, n=2, cutoff=0.4)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return f"{hint}; known: {', '.join(known)}"


@dataclass(frozen=True)
class ModeSpec:
    """A feedback mode with its parameters: ``ModeSpec.parse("usf:scale=0.05")``.

    Example:
        >>> ModeSpec.parse("usf").scale_for((800, 784)) == _xavier_scale((800, 784))
        True
        >>> ModeSpec.parse("kp:decay=-1")
        Traceback (most recent call last):
        ...
        ValueError: mode kp: decay = -1 is out of range; allowed: a number >= 0
    """

    name: str = "fixed"
    params: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in MODES:
            raise ValueError(f"unknown feedback mode {self.name!r}{_suggest(self.name, MODES)}")
        known = MODES[self.name].params
        params = dict(self.params)
        for key, value in params.items():
            if key not in known:
                takes = f"known: {', '.join(known)}" if known else "it takes none"
                raise ValueError(f"mode {self.name}: unknown parameter {key!r}; {takes}")
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"mode {self.name}: {key} = {value!r} is not a number")
            if not math.isfinite(value) or value < 0 or (key == "scale" and value == 0):
                bound = "> 0" if key == "scale" else ">= 0"
                raise ValueError(
                    f"mode {self.name}: {key} = {value:g} is out of range; allowed: a number "
                    f"{bound}"
                )
        object.__setattr__(self, "params", params)

    @classmethod
    def parse(cls, value: str | Mapping | ModeSpec) -> ModeSpec:
        """Read ``"name"``, ``"name:key=value"`` or ``{"name": ..., **params}``."""
        if isinstance(value, ModeSpec):
            return value
        if isinstance(value, Mapping):
            params = dict(value)
            return cls(str(params.pop("name", "fixed")), params)
        if not isinstance(value, str):
            raise ValueError(f"a feedback mode is a name such as 'kp', got {value!r}")
        return cls(*parse_named(value, "mode"))

    @property
    def mode(self) -> Mode:
        return MODES[self.name]

    def param(self, key: str):
        return self.params.get(key, self.mode.params[key])

    @property
    def decay(self) -> float:
        return float(self.param("decay")) if self.mode.learned else 0.0

    def scale_for(self, shape: tuple[int, ...]) -> float:
        """uSF's magnitude for a parameter of ``shape``."""
        scale = self.param("scale")
        return _xavier_scale(tuple(shape)) if scale == "xavier" else float(scale)

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v:g}" for k, v in self.params.items())
