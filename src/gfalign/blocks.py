"""The Jacobian products of a block's pieces, for rules on any model (DESIGN.md section 9).

A block ``i`` is a parametrised *linear part* ``phi_i`` (``nn.Linear``, ``nn.Conv2d`` or any
module with parameters), an element-wise activation and a parameter-free *tail* ``tau_i``
(flatten, max or average pooling, identity, or any parameter-free module):

    a^i = phi_i(h^{i-1}; theta_i),    h^i = tau_i(f_i(a^i)).

Every term of a rule is one of a few products at the forward pass's point:

    input_vjp(params, x, g) = J_x phi(x; params)^T g      above (params fixed, random) and
                                                          backprop (params = theta) terms
    input_jvp(params, x, v) = J_x phi(x; params) v        below terms
    param_vjp(x, d)         = J_theta phi(x; theta)^T d   the block's own, local gradient
    tail.vjp(g) = J_tau^T g,   tail.jvp(v) = J_tau v      a signal through a tail

``linear_products(module)`` gives the products of a linear part: direct ones for ``nn.Linear``
and ``nn.Conv2d`` (the kernels autograd itself calls), ``torch.func`` ones for anything else.
``Tail.forward`` runs a tail and returns, beside its output, what its linearisation needs (a
max-pool's argmax positions, a flatten's shape), so a signal routed back or forward through it
takes the forward pass's path. Tails carry no weights: routing a signal through them
transports none.

    >>> conv = nn.Conv2d(1, 2, 3)
    >>> x, g = torch.rand(4, 1, 6, 6), torch.rand(4, 2, 4, 4)
    >>> products = linear_products(conv)
    >>> products.input_vjp(conv, dict(conv.named_parameters()), x, g).shape
    torch.Size([4, 1, 6, 6])
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.func import functional_call, jvp, vjp
from torch.nn import functional

from gfalign.rules import ConfigError

__all__ = [
    "Block",
    "LinearProducts",
    "PartGraph",
    "TAIL_STEPS",
    "Tail",
    "TailStep",
    "check_dropout_rate",
    "linear_products",
]

Parameters = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class LinearProducts:
    """The three products of one kind of linear part (see the module docstring).

    Attributes:
        input_vjp: ``(module, params, x, g) -> J_x^T g``, in the shape of ``x``.
        input_jvp: ``(module, params, x, v) -> J_x v``, in the shape of the output. For an
            affine part it is the part applied to ``v`` without its bias.
        param_vjp: ``(module, x, d) -> {name: J_theta^T d}`` for every parameter of the module,
            summed over the batch.
    """

    input_vjp: Callable[[nn.Module, Parameters, torch.Tensor, torch.Tensor], torch.Tensor]
    input_jvp: Callable[[nn.Module, Parameters, torch.Tensor, torch.Tensor], torch.Tensor]
    param_vjp: Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def _linear_param_vjp(module: nn.Module, x: torch.Tensor, d: torch.Tensor) -> dict:
    # (out, N) @ (N, in): the batch folded into one product
    grads = {"weight": d.reshape(-1, d.shape[-1]).t() @ x.reshape(-1, x.shape[-1])}
    if module.bias is not None:
        grads["bias"] = d.reshape(-1, d.shape[-1]).sum(0)
    return grads


LINEAR = LinearProducts(
    input_vjp=lambda module, params, x, g: g @ params["weight"],
    input_jvp=lambda module, params, x, v: v @ params["weight"].t(),
    param_vjp=_linear_param_vjp,
)


def _conv_options(module: nn.Conv2d) -> dict[str, Any]:
    return {
        "stride": module.stride,
        "padding": module.padding,
        "dilation": module.dilation,
        "groups": module.groups,
    }


def _conv_backward(
    module: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, g: torch.Tensor, mask: list[bool]
) -> tuple:
    """The kernel autograd runs for a convolution's backward: ``(grad input, grad weight,
    grad bias)`` for the parts ``mask`` asks for, at input ``x`` with ``weight``."""
    bias = [weight.shape[0]] if mask[2] else None
    return torch.ops.aten.convolution_backward(
        g,
        x,
        weight,
        bias,
        list(module.stride),
        list(module.padding),
        list(module.dilation),
        False,
        [0, 0],
        module.groups,
        mask,
    )


def _conv_param_vjp(module: nn.Conv2d, x: torch.Tensor, d: torch.Tensor) -> dict:
    has_bias = module.bias is not None
    _, weight, bias = _conv_backward(module, x, module.weight, d, [False, True, has_bias])
    return {"weight": weight, "bias": bias} if has_bias else {"weight": weight}


CONV2D = LinearProducts(
    # The transposed convolution autograd runs for conv2d's input gradient.
    input_vjp=lambda module, params, x, g: _conv_backward(
        module, x, params["weight"], g, [True, False, False]
    )[0],
    input_jvp=lambda module, params, x, v: functional.conv2d(
        v, params["weight"], None, **_conv_options(module)
    ),
    param_vjp=_conv_param_vjp,
)


@contextlib.contextmanager
def _statistics_kept(module: nn.Module):
    """Within the block, a normalisation layer in training mode normalises by the batch's
    statistics without updating its running ones: a product must not move them (only the
    forward pass does, once a step; DESIGN.md section 12)."""
    switched = [
        m for m in module.modules() if m.training and getattr(m, "track_running_stats", False)
    ]
    for m in switched:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


def _feedback_call(module: nn.Module, params: Parameters) -> Callable:
    """``x -> phi(x)`` whose derivative is the part's with ``params`` in place of its own.

    A part of one module runs with ``params`` (its Jacobian at ``x``). A composite part (a
    traced piece of a model graph: a conv and its BatchNorm, say) is linearised at the forward
    pass's point: each submodule whose parameters ``params`` replaces computes its own output
    (so the modules after it, a normalisation, see the forward's values and statistics), with
    the derivative of the same submodule run with the replacing parameters,
    ``own(z).detach() + (c - c.detach())``, ``c`` its output with them (DESIGN.md section
    12)."""
    if not isinstance(module, fx.GraphModule) or not params:
        return lambda inputs: functional_call(module, dict(params), (inputs,))
    mine = dict(module.named_parameters())
    owners: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in params.items():
        if value is not mine.get(name):  # the forward's own parameters need no stand-in
            owner, _, own = name.rpartition(".")
            owners.setdefault(owner, {})[own] = value

    def call(inputs: torch.Tensor) -> torch.Tensor:
        with contextlib.ExitStack() as stack:
            for owner, replacing in owners.items():
                stack.enter_context(_surrogate(module.get_submodule(owner), replacing))
            return module(inputs)

    return call


@contextlib.contextmanager
def _surrogate(module: nn.Module, replacing: Parameters):
    """Within the block, ``module`` returns its own output with the derivative it has with
    ``replacing`` as its parameters."""
    original = module.forward
    inside = []

    def forward(z: torch.Tensor) -> torch.Tensor:
        if inside:  # functional_call's own call of the module, below
            return original(z)
        inside.append(True)
        try:
            c = functional_call(module, dict(replacing), (z,))
        finally:
            inside.pop()
        return original(z).detach() + (c - c.detach())

    module.forward = forward
    try:
        yield
    finally:
        del module.forward  # the class's forward again


def _generic_input_vjp(module, params, x, g):
    with _statistics_kept(module):
        _, pullback = vjp(_feedback_call(module, params), x)
    return pullback(g)[0]


def forward_mode(function: Callable, primals: tuple, tangents: tuple) -> torch.Tensor:
    """``J v`` of ``function`` at ``primals`` along ``tangents`` by forward-mode autodiff
    (``torch.func.jvp``)."""
    with warnings.catch_warnings():
        # torch.func's first jvp scripts its decompositions through the deprecated jit: torch's
        # own warning, not ours.
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        return jvp(function, primals, tangents)[1]


def _forward_mode(function: Callable, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return forward_mode(function, (x,), (v,))


def _generic_input_jvp(module, params, x, v):
    with _statistics_kept(module):
        return _forward_mode(_feedback_call(module, params), x, v)


def _generic_param_vjp(module, x, d):
    own = {name: p.detach() for name, p in module.named_parameters()}
    with _statistics_kept(module):
        _, pullback = vjp(lambda values: functional_call(module, values, (x,)), own)
    return dict(pullback(d)[0])


GENERIC = LinearProducts(_generic_input_vjp, _generic_input_jvp, _generic_param_vjp)


class PartGraph:
    """A part's forward pass at one point with its autograd graph kept, so that every product
    the step takes at that point backwards reuses it instead of running the part again: the
    parameter gradient, the input vjp with the part's own parameters (a backprop term), and,
    for a composite part whose input enters through one Linear or Conv2d (a conv and its
    BatchNorm), the input vjp with fixed parameters in that module's place: the rest of the
    part backwards at the forward pass's point, then that module's direct product with the
    fixed parameters (the value ``GENERIC.input_vjp`` computes, DESIGN.md section 12).

    Products asked for the same cotangent (the same tensor) are computed once, together.

        >>> part = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
        >>> graph = PartGraph(part, torch.rand(4, 1, 6, 6))
        >>> g = torch.rand(4, 2, 4, 4)
        >>> grads, back = graph.pull(g, inputs=True)
        >>> sorted(grads), back.shape
        (['0.bias', '0.weight', '1.bias', '1.weight'], torch.Size([4, 1, 6, 6]))
    """

    def __init__(self, part: nn.Module, x: torch.Tensor) -> None:
        self.part = part
        self.names = [name for name, _ in part.named_parameters()]
        self.params = [p for _, p in part.named_parameters()]
        self.x = x.detach().requires_grad_(x.is_floating_point())
        self.entry, self.entry_name, self._u = _entry(part), "", None
        hook = None
        if self.entry is not None:
            self.entry_name = next(n for n, m in part.named_modules() if m is self.entry)
            hook = self.entry.register_forward_hook(self._keep)
        try:
            with torch.enable_grad():
                self.a = part(self.x)
        finally:
            if hook is not None:
                hook.remove()
        self._memo: dict[int, tuple] = {}

    def _keep(self, module, inputs, output) -> None:
        self._u = output

    def pull(self, g: torch.Tensor, *, inputs: bool) -> tuple[dict[str, torch.Tensor], Any]:
        """``({name: J_theta^T g}, J_x^T g or None)`` at the kept point, the input's only where
        ``inputs`` asks for it."""
        memo = self._pulled(g, inputs)
        return memo[1], memo[2]

    def _pulled(self, g: torch.Tensor, inputs: bool) -> tuple:
        """``(g, parameter grads, input grad or None, grad at the entry module's output or
        None)``, from one backward pass on the kept graph per cotangent."""
        memo = self._memo.get(id(g))
        if memo is not None and memo[0] is g and (memo[2] is not None or not inputs):
            return memo
        entry = [] if self._u is None else [self._u]
        wanted = [*self.params, *entry, *([self.x] if inputs else [])]
        grads = torch.autograd.grad(self.a, wanted, g, retain_graph=True, allow_unused=True)
        count = len(self.params)
        own = {
            name: grad if grad is not None else torch.zeros_like(p)
            for name, p, grad in zip(self.names, self.params, grads[:count], strict=True)
        }
        at_entry = grads[count] if entry else None
        back = grads[-1] if inputs else None
        self._memo[id(g)] = memo = (g, own, back, at_entry)
        return memo

    def feedback_vjp(self, params: Parameters, g: torch.Tensor) -> torch.Tensor | None:
        """``J_x phi(x; params)^T g`` through the kept graph, where ``params`` replace the
        entry module's own parameters alone; ``None`` where they replace others too."""
        if self._u is None:
            return None
        prefix = f"{self.entry_name}."
        own = {n[len(prefix) :]: value for n, value in params.items() if n.startswith(prefix)}
        if len(own) != len(params):
            return None
        at_entry = self._pulled(g, inputs=False)[3]  # the block's own update's pass, too
        products = linear_products(self.entry)
        entry = {**dict(self.entry.named_parameters()), **own}
        return products.input_vjp(self.entry, entry, self.x.detach(), at_entry)


def _entry(part: nn.Module) -> nn.Module | None:
    """The Linear or Conv2d of a traced composite part through which alone its input enters
    (its first operation), or ``None``."""
    if not isinstance(part, fx.GraphModule):
        return None
    nodes = list(part.graph.nodes)
    inputs = [node for node in nodes if node.op == "placeholder"]
    if len(inputs) != 1 or len(inputs[0].users) != 1:
        return None
    (first,) = inputs[0].users
    if first.op != "call_module" or first.args != (inputs[0],) or first.kwargs:
        return None
    module = part.get_submodule(first.target)
    return module if linear_products(module) is not GENERIC else None


def linear_products(module: nn.Module) -> LinearProducts:
    """The products of ``module``: direct ones for a plain ``nn.Linear`` or a zero-padded
    ``nn.Conv2d`` with numeric padding, ``torch.func`` ones for any other module.

    Exact types only: a subclass may change ``forward``, so it takes the general path.
    """
    kind = type(module)
    if kind is nn.Linear:
        return LINEAR
    if kind is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return CONV2D
    return GENERIC


# ------------------------------------------------------------------------------------ tails


@dataclass(frozen=True)
class TailStep:
    """One parameter-free step of a tail.

    ``forward(module, z) -> (h, state)`` runs it and keeps what its linearisation at ``z``
    needs; ``vjp(module, state, g)`` and ``jvp(module, state, v)`` are ``J^T g`` (in ``z``'s
    shape) and ``J v`` (in ``h``'s shape) at that point.
    """

    forward: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, Any]]
    vjp: Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]
    jvp: Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]


def _max_pool_options(module: nn.MaxPool2d) -> tuple:
    return module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode


def _max_pool_forward(module: nn.MaxPool2d, z: torch.Tensor):
    h, indices = functional.max_pool2d(
        z,
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        ceil_mode=module.ceil_mode,
        return_indices=True,
    )
    return h, (z, indices)


def _max_pool_vjp(module: nn.MaxPool2d, state, g: torch.Tensor) -> torch.Tensor:
    z, indices = state
    kernel, stride, padding, dilation, ceil_mode = _max_pool_options(module)
    return torch.ops.aten.max_pool2d_with_indices_backward(
        g,
        z,
        _pair(kernel),
        _pair(stride if stride is not None else kernel),
        _pair(padding),
        _pair(dilation),
        ceil_mode,
        indices,
    )


def _max_pool_jvp(module: nn.MaxPool2d, state, v: torch.Tensor) -> torch.Tensor:
    _, indices = state  # (N, C, H', W') positions in each (H, W) plane
    return v.flatten(2).gather(2, indices.flatten(2)).view(indices.shape)


def _avg_pool(module: nn.AvgPool2d, z: torch.Tensor) -> torch.Tensor:
    return functional.avg_pool2d(
        z,
        module.kernel_size,
        module.stride,
        module.padding,
        module.ceil_mode,
        module.count_include_pad,
        module.divisor_override,
    )


def _avg_pool_vjp(module: nn.AvgPool2d, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    kernel = _pair(module.kernel_size)
    return torch.ops.aten.avg_pool2d_backward(
        g,
        z,
        kernel,
        _pair(module.stride) if module.stride else kernel,
        _pair(module.padding),
        module.ceil_mode,
        module.count_include_pad,
        module.divisor_override,
    )


def _pair(value) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


def _generic_tail_forward(module: nn.Module, z: torch.Tensor):
    h, pullback = vjp(module, z)
    return h, (z, pullback)


TAIL_STEPS: dict[type[nn.Module], TailStep] = {
    nn.Identity: TailStep(
        lambda module, z: (z, None), lambda module, s, g: g, lambda module, s, v: v
    ),
    nn.Flatten: TailStep(
        lambda module, z: (module(z), z.shape),
        lambda module, shape, g: g.reshape(shape),
        lambda module, shape, v: module(v),
    ),
    nn.MaxPool2d: TailStep(_max_pool_forward, _max_pool_vjp, _max_pool_jvp),
    nn.AvgPool2d: TailStep(
        lambda module, z: (_avg_pool(module, z), z),
        _avg_pool_vjp,
        lambda module, z, v: _avg_pool(module, v),
    ),
}
"""The tail steps with direct products, by exact module type; any other parameter-free module
goes through ``torch.func`` at the forward point."""

GENERIC_TAIL = TailStep(
    _generic_tail_forward,
    lambda module, state, g: state[1](g)[0],
    lambda module, state, v: _forward_mode(module, state[0], v),
)


@dataclass(frozen=True)
class Tail:
    """A block's parameter-free tail: its steps, applied in order.

    ``forward`` returns the output and the state of every step at that point, which ``vjp``
    and ``jvp`` take back, so a tail holds no state of its own.

    Example:
        >>> tail = Tail((nn.MaxPool2d(2), nn.Flatten()))
        >>> h, state = tail.forward(torch.rand(3, 2, 4, 4))  # h: (3, 8)
        >>> tail.vjp(state, torch.ones_like(h)).shape         # to the argmax positions
        torch.Size([3, 2, 4, 4])
    """

    modules: tuple[nn.Module, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", tuple(self.modules))
        for module in self.modules:
            if any(True for _ in module.parameters()):
                raise ValueError(
                    f"a tail is parameter-free; {type(module).__name__} has parameters: make "
                    "it the linear part of a block of its own"
                )

    @staticmethod
    def _step(module: nn.Module) -> TailStep:
        return TAIL_STEPS.get(type(module), GENERIC_TAIL)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """``(tau(z), state)``, the state being what ``vjp`` and ``jvp`` need at ``z``."""
        states = []
        for module in self.modules:
            z, state = self._step(module).forward(module, z)
            states.append(state)
        return z, tuple(states)

    def vjp(self, state: tuple, g: torch.Tensor) -> torch.Tensor:
        """``J_tau^T g`` at the forward point: from ``h``'s shape back to ``z``'s."""
        for module, step_state in zip(reversed(self.modules), reversed(state), strict=True):
            g = self._step(module).vjp(module, step_state, g)
        return g

    def jvp(self, state: tuple, v: torch.Tensor) -> torch.Tensor:
        """``J_tau v`` at the forward point: from ``z``'s shape forward to ``h``'s."""
        for module, step_state in zip(self.modules, state, strict=True):
            v = self._step(module).jvp(module, step_state, v)
        return v


def check_dropout_rate(rate: Any, name: str = "dropout") -> float:
    """``rate`` as a float when it is a dropout probability in [0, 1), else a ``ConfigError``.

    Example:
        >>> check_dropout_rate(0.5)
        0.5
    """
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate < 1:
        raise ConfigError(
            f"{name} = {rate!r}: not a dropout rate; allowed: a number in [0, 1), the "
            "probability of dropping a unit"
        )
    return float(rate)


@dataclass(frozen=True)
class Block:
    """One block of a model: a linear part (any module with parameters), an element-wise
    activation (a ``gfalign.network.Activation``), a parameter-free tail, and the dropout rate
    of its activation (in training mode, ``h^i = tau_i(m^i * f(a^i))`` with an inverted-dropout
    mask ``m^i`` in ``a^i``'s shape; see ``gfalign.network``)."""

    linear: nn.Module
    activation: Any
    tail: Tail = Tail()
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "dropout", check_dropout_rate(self.dropout))
