"""The Jacobian products of linear parts and tails, against autograd, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from gfalign.blocks import CONV2D, GENERIC, LINEAR, TAIL_STEPS, Tail, linear_products


@pytest.fixture(autouse=True)
def _float64():
    """Every tensor and module of these tests in float64, for this module's tests only."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class Gated(nn.Module):
    """A user module that is not affine: ``tanh(x A^T) * (x C^T) + b``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.c = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.b = nn.Parameter(torch.randn(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.a.t()) * (x @ self.c.t()) + self.b


def _parts():
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(7, 5), torch.randn(4, 7, generator=generator)),
        "linear without bias": (
            nn.Linear(7, 5, bias=False),
            torch.randn(4, 7, generator=generator),
        ),
        "conv": (nn.Conv2d(2, 3, 3), torch.randn(4, 2, 6, 6, generator=generator)),
        "conv strided padded": (
            nn.Conv2d(2, 4, 3, stride=2, padding=1),
            torch.randn(3, 2, 7, 7, generator=generator),
        ),
        "conv grouped dilated": (
            nn.Conv2d(4, 6, 3, dilation=2, groups=2, bias=False),
            torch.randn(2, 4, 9, 8, generator=generator),
        ),
        "conv same": (
            nn.Conv2d(2, 3, 3, padding="same"),
            torch.randn(2, 2, 5, 5, generator=generator),
        ),
        "user module": (Gated(6, 4), torch.randn(5, 6, generator=generator)),
    }


PARTS = [
    "linear",
    "linear without bias",
    "conv",
    "conv strided padded",
    "conv grouped dilated",
    "conv same",
    "user module",
]


def _random_like(module: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(p.shape, generator=generator) for name, p in module.named_parameters()
    }


def _jacobian_times(function, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``J v`` from the full Jacobian (an independent reference to torch.func's jvp)."""
    jacobian = torch.autograd.functional.jacobian(function, x)  # out shape + x shape
    out = jacobian.reshape(-1, x.numel()) @ v.reshape(-1)
    return out.reshape(jacobian.shape[: jacobian.dim() - x.dim()])


@pytest.mark.parametrize("name", PARTS)
def test_linear_part_products_equal_autograd(name):
    module, x = _parts()[name]
    products = linear_products(module)
    params = _random_like(module)  # fixed random parameters of the same shapes, as a rule uses
    out = functional_call(module, params, (x,))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))

    inputs = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(functional_call(module, params, (inputs,)), inputs, g)
    torch.testing.assert_close(
        products.input_vjp(module, params, x, g), expected, rtol=0, atol=1e-12
    )

    expected = _jacobian_times(lambda z: functional_call(module, params, (z,)), x, v)
    torch.testing.assert_close(
        products.input_jvp(module, params, x, v), expected, rtol=0, atol=1e-12
    )

    own = dict(module.named_parameters())
    expected = torch.autograd.grad(module(x), list(own.values()), g)
    grads = products.param_vjp(module, x, g)
    assert sorted(grads) == sorted(own)
    for parameter, reference in zip(own, expected, strict=True):
        torch.testing.assert_close(grads[parameter], reference, rtol=0, atol=1e-12)


def test_the_direct_paths_are_chosen_and_equal_the_general_one():
    parts = _parts()
    assert linear_products(parts["linear"][0]) is LINEAR
    assert linear_products(parts["conv strided padded"][0]) is CONV2D
    assert linear_products(parts["conv same"][0]) is GENERIC  # string padding: general path
    assert linear_products(parts["user module"][0]) is GENERIC
    for name in ("linear", "conv strided padded", "conv grouped dilated"):
        module, x = parts[name]
        fast, params = linear_products(module), _random_like(module)
        g = torch.randn(functional_call(module, params, (x,)).shape)
        torch.testing.assert_close(
            fast.input_vjp(module, params, x, g), GENERIC.input_vjp(module, params, x, g)
        )
        torch.testing.assert_close(
            fast.input_jvp(module, params, x, x), GENERIC.input_jvp(module, params, x, x)
        )
        for key, value in fast.param_vjp(module, x, g).items():
            torch.testing.assert_close(value, GENERIC.param_vjp(module, x, g)[key])


def test_an_affine_jvp_is_the_part_without_its_bias():
    module, x = _parts()["conv strided padded"]
    params = _random_like(module)
    without_bias = {**params, "bias": torch.zeros_like(params["bias"])}
    torch.testing.assert_close(
        CONV2D.input_jvp(module, params, x, x), functional_call(module, without_bias, (x,))
    )


TAILS = {
    "max pool": ((nn.MaxPool2d(2),), (3, 2, 6, 6)),
    "max pool overlapping padded": ((nn.MaxPool2d(3, stride=2, padding=1),), (2, 3, 7, 7)),
    "max pool ceil": ((nn.MaxPool2d(2, ceil_mode=True),), (2, 2, 5, 5)),
    "avg pool": ((nn.AvgPool2d(2),), (3, 2, 6, 6)),
    "avg pool padded exclusive": (
        (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),),
        (2, 2, 7, 7),
    ),
    "flatten": ((nn.Flatten(),), (3, 2, 4, 4)),
    "identity": ((nn.Identity(),), (3, 5)),
    "pool then flatten": ((nn.MaxPool2d(2), nn.Flatten()), (2, 3, 4, 4)),
    "general module": ((nn.AdaptiveAvgPool2d(2),), (2, 2, 5, 5)),
}


@pytest.mark.parametrize("name", list(TAILS))
def test_tail_products_equal_autograd(name):
    modules, shape = TAILS[name]
    tail = Tail(modules)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    h, state = tail.forward(z)
    reference = nn.Sequential(*modules)
    torch.testing.assert_close(h, reference(z), rtol=0, atol=0)
    g = torch.randn(h.shape, generator=torch.Generator().manual_seed(5))
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(6))
    inputs = z.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference(inputs), inputs, g)
    torch.testing.assert_close(tail.vjp(state, g), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        tail.jvp(state, v), _jacobian_times(reference, z, v), rtol=0, atol=1e-12
    )


def test_a_max_pool_routes_signals_through_the_forward_argmax():
    tail = Tail((nn.MaxPool2d(2),))
    z = torch.tensor([[[[1.0, 5.0], [2.0, 3.0]]]])
    _, state = tail.forward(z)
    torch.testing.assert_close(
        tail.vjp(state, torch.tensor([[[[7.0]]]])), torch.tensor([[[[0.0, 7.0], [0.0, 0.0]]]])
    )
    # Forward, a signal is read at the argmax of the forward pass, not at its own maximum.
    torch.testing.assert_close(
        tail.jvp(state, torch.tensor([[[[9.0, 1.0], [0.0, 0.0]]]])), torch.tensor([[[[1.0]]]])
    )


def test_every_direct_tail_step_is_tested():
    tested = {type(module) for modules, _ in TAILS.values() for module in modules}
    assert set(TAIL_STEPS) <= tested


def test_a_tail_with_parameters_is_refused():
    with pytest.raises(ValueError, match="a tail is parameter-free; Linear has parameters"):
        Tail((nn.Linear(3, 3),))


def test_every_part_is_tested():
    assert list(_parts()) == PARTS
