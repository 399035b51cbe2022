"""Applying a rule's deltas: the local updates, kept apart from computing them.

Every parameter's update is local (DESIGN.md sections 2 and 9):

    grad theta^i = J_theta phi_i(h^{i-1})^T d^i,   for a Linear block  grad W^i = (d^i)^T h^{i-1},
                                                                     grad b^i = sum_n d^i_n,

``write_gradients`` puts them into ``.grad`` for any ``torch.optim`` optimizer; ``sgd_apply``
takes a plain SGD step in place without writing a gradient at all (for a Linear weight one
``addmm_`` into ``W^i``). Kolen-Pollack's learned feedback (DESIGN.md section 10) takes the
forward parameters' update, on either path: ``learn`` hands it their gradient, ``decay``
shrinks both, and ``mirrored_step`` is the in-place step on a block that feedback mirrors.
``linear_update`` is the one place a Linear block's ``d^T h`` is written.
"""

from __future__ import annotations

import torch
from torch import nn

from gfalign.blocks import LINEAR
from gfalign.execute import addmm_

__all__ = ["linear_update", "sgd_apply", "write_gradients"]


def linear_update(
    out: torch.Tensor, d: torch.Tensor, h: torch.Tensor, *, alpha: float, beta: float
) -> torch.Tensor:
    """``out <- beta out + alpha (d^T h)`` in place: a Linear block's weight update, (n_i, N) @
    (N, n_{i-1}) (stacked members: batched), written into ``out`` (its ``.grad`` with
    ``beta = 0``, which ignores what it held, or the weight itself)."""
    return addmm_(out, d.transpose(-1, -2), h, alpha=alpha, beta=beta)


def _param_grads(cache, i: int, shape, part: nn.Module, h: torch.Tensor, d: torch.Tensor):
    """``J_theta^T d`` of block ``i``'s part: from the forward pass's kept graph where there is
    one (``gfalign.blocks.PartGraph``), else by the part's product. New tensors either way."""
    graph = cache.graphs.get(i) if cache.graphs else None
    if graph is None:
        return shape.products.param_vjp(part, h, d)
    return {name: grad.clone() for name, grad in graph.pull(d, inputs=False)[0].items()}


def write_gradients(rule, net: nn.Module, cache, deltas, scale: float) -> None:
    """Every parameter's local gradient, times ``scale`` (``1/N`` or 1), into its ``.grad``
    (overwriting), and learned feedback's (``learn``)."""
    for i, (part, shape) in enumerate(zip(net.layers, rule.structure, strict=True), 1):
        d, h = deltas[i], cache.input(i)
        if shape.products is LINEAR:
            weight, bias = part.weight, part.bias
            if weight.grad is None:
                weight.grad = torch.empty_like(weight)
            linear_update(weight.grad, d, h, alpha=scale, beta=0.0)
            if bias is not None:
                if bias.grad is None:
                    bias.grad = torch.empty_like(bias)
                torch.sum(d, dim=-2, out=bias.grad)
                if scale != 1.0:
                    bias.grad.mul_(scale)
        else:
            grads = _param_grads(cache, i, shape, part, h, d)
            for name, parameter in part.named_parameters():
                grad = grads[name] if scale == 1.0 else grads[name].mul_(scale)
                if parameter.grad is None:
                    parameter.grad = grad.contiguous()
                else:
                    parameter.grad.copy_(grad)
        if i in rule.mirrored:
            learn(rule, i, part)


def sgd_apply(rule, net: nn.Module, cache, deltas, alpha: float, rates) -> None:
    """``theta <- theta + alpha * update`` in place for every block (``alpha = -lr * scale``;
    stacked members with their own rates: ``rates``, (K, 1, 1), scales their deltas and
    ``alpha = -scale``)."""
    for i, (part, shape) in enumerate(zip(net.layers, rule.structure, strict=True), 1):
        d = deltas[i] if rates is None else deltas[i] * rates
        h = cache.input(i)
        if i in rule.mirrored:
            mirrored_step(rule, i, part, shape, h, d, alpha)
        elif shape.products is LINEAR:
            linear_update(part.weight, d, h, alpha=alpha, beta=1.0)
            if part.bias is not None:
                part.bias.add_(d.sum(dim=-2), alpha=alpha)
        else:
            grads = _param_grads(cache, i, shape, part, h, d)
            forward = dict(part.named_parameters())
            torch._foreach_add_(list(forward.values()), [grads[n] for n in forward], alpha=alpha)


def learn(rule, block: int, part: nn.Module) -> None:
    """Learned feedback standing in for ``block``'s parameters gets their gradient (the
    rule's update), so an optimizer takes the same step on both; ``decay`` first."""
    decay(rule, block, part)
    forward = dict(part.named_parameters())
    for slot in rule.learned_slots(block):
        for name, buffer in slot.buffers:
            rule.get_parameter(buffer).grad = slot.stored(forward[name].grad).clone()


def decay(rule, block: int, part: nn.Module) -> None:
    """Kolen-Pollack's decay, ``theta <- (1 - decay) theta`` on the learned feedback and the
    forward parameters it stands in for, once per training step, before the optimizer's
    step: together ``Delta theta = -eta g - decay theta`` for both (DESIGN.md section 10),
    so their difference shrinks by ``1 - decay`` every step whatever the optimizer."""
    rate = rule.decays.get(block, 0.0)
    if not rate:
        return
    transported = rule.structure[block - 1].transported
    for name, parameter in part.named_parameters():
        if name in transported:
            parameter.mul_(1.0 - rate)
    for slot in rule.learned_slots(block):
        for _, buffer in slot.buffers:
            rule.get_parameter(buffer).mul_(1.0 - rate)


def mirrored_step(
    rule, block: int, part: nn.Module, shape, h: torch.Tensor, d: torch.Tensor, alpha: float
) -> None:
    """The in-place SGD step on a block whose parameters learned feedback mirrors.

    The forward parameter ``theta`` and its mirror ``V`` take the same step
    ``x <- (1 - decay) x + alpha g``, so only their difference needs the decay:
    ``V <- theta' + (1 - decay) (V - theta)``, with ``theta'`` the stepped parameter (the
    Kolen-Pollack theorem, DESIGN.md section 10). The forward step is the plain one (a Linear
    weight's is one ``addmm_`` with ``beta = 1 - decay``: no gradient tensor is written), and
    the mirror takes two element-wise passes, before and after it. Nothing is kept between
    steps but the parameters. Equal to ``write_gradients``, the decay and ``torch.optim.SGD``
    up to rounding."""
    rate = rule.decays.get(block, 0.0)
    transported = shape.transported
    forward = dict(part.named_parameters())
    mirrors = [  # (V, theta in V's layout)
        (rule.get_parameter(buffer), slot.stored(forward[name]))
        for slot in rule.learned_slots(block)
        for name, buffer in slot.buffers
    ]
    for mirror, weight in mirrors:
        mirror.sub_(weight)  # V - theta, before theta moves
    if shape.products is LINEAR:  # the weight is transported and decays, the bias not
        linear_update(part.weight, d, h, alpha=alpha, beta=1.0 - rate)
        if part.bias is not None:
            part.bias.add_(d.sum(dim=-2), alpha=alpha)
    else:
        grads = shape.products.param_vjp(part, h, d)
        if rate:
            torch._foreach_mul_([forward[n] for n in forward if n in transported], 1.0 - rate)
        torch._foreach_add_(list(forward.values()), [grads[n] for n in forward], alpha=alpha)
    for mirror, weight in mirrors:  # each stands for a transported parameter
        torch.add(weight, mirror, alpha=1.0 - rate, out=mirror)
