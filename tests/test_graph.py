"""Rules on model graphs (DESIGN.md section 12), in float64: against autograd through the whole
module, and every preset against a term-by-term transcription built on autograd alone."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import fx, nn
from torch.func import functional_call
from torch.nn import functional

from gfalign.architectures import TRANSFORMER_LEAVES, resnet, transformer
from gfalign.engine import FeedbackRule
from gfalign.graph import convert
from gfalign.rules import PRESETS, ConfigError
from peer_files import biotorch_file

DTYPE = torch.float64
CLASSES = 3


class Residual(nn.Module):
    """A graph of Linear blocks: a residual +, a concatenation, a fan-out of three."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(5, 4)
        self.skip = nn.Linear(4, 4)
        self.side = nn.Linear(4, 2)
        self.out = nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inner(x))
        r = torch.relu(self.skip(h) + h)
        s = torch.sigmoid(self.side(h))
        return self.out(torch.cat([r, s], dim=1))


def _residual():
    torch.manual_seed(0)
    model = Residual().to(DTYPE)
    x = torch.rand(6, 5, dtype=DTYPE)
    return model, x


def _small_resnet():
    torch.manual_seed(1)
    model = resnet(8, classes=CLASSES).to(DTYPE)  # one basic block per stage, option A twice
    with torch.no_grad():  # BatchNorm's affine parameters away from 1 and 0
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    x = torch.rand(4, 3, 8, 8, dtype=DTYPE)
    return model, x


def _transformer():
    torch.manual_seed(5)
    model = transformer(vocabulary=CLASSES, context=5, width=8, layers=2, heads=2).to(DTYPE)
    with torch.no_grad():  # LayerNorm's affine parameters away from 1 and 0
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        model.embed.tokens.normal_()  # embeddings of the scale of the layers' inputs
        model.embed.positions.normal_()
    x = torch.randint(CLASSES, (4, 5)).to(DTYPE)  # character indices
    return model, x


MODELS = {"residual": _residual, "resnet8": _small_resnet, "transformer": _transformer}
LEAVES = {"transformer": TRANSFORMER_LEAVES}


def _converted(name):
    model, x = MODELS[name]()
    return model, x, convert(model, x, leaves=LEAVES.get(name, ()))


@contextlib.contextmanager
def _statistics_kept(model: nn.Module):
    """BatchNorm normalises by the batch's statistics without moving its running ones."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def _labels(n: int) -> torch.Tensor:
    return torch.arange(n) % CLASSES


def _grads(net, rule, x, y):
    for p in net.parameters():
        p.grad = None
    with _statistics_kept(net):
        step = rule.backward(net, x, y)
    return step, [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("name", MODELS)
def test_the_graph_computes_the_modules_logits(name):
    model, x, net = _converted(name)
    assert net.is_graph == (name != "transformer")  # its residuals lie within its layer blocks
    torch.testing.assert_close(net(x), model(x), rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", MODELS)
def test_bp_is_autograd_through_the_whole_module(name):
    model, x, net = _converted(name)
    y = _labels(len(x))
    _, ours = _grads(net, FeedbackRule("bp", net, dtype=DTYPE), x, y)
    for p in model.parameters():
        p.grad = None
    with _statistics_kept(model):
        functional.cross_entropy(model(x), y).backward()
    for mine, (label, p) in zip(ours, model.named_parameters(), strict=True):
        torch.testing.assert_close(mine, p.grad, rtol=0, atol=1e-10, msg=label)


@pytest.mark.parametrize("name", MODELS)
def test_fa_with_the_forward_parameters_as_feedback_is_bp(name):
    model, x, net = _converted(name)
    y = _labels(len(x))
    _, bp = _grads(net, FeedbackRule("bp", net, dtype=DTYPE), x, y)
    rule = FeedbackRule("fa", net, dtype=DTYPE)
    _, random = _grads(net, rule, x, y)
    assert max(float((a - b).abs().max()) for a, b in zip(bp, random, strict=True)) > 1e-3
    for key, slot in rule.slots.items():
        layer, index, *consumers = key  # a chain's slot (the transformer's) names none
        consumer = consumers[0] if consumers else layer + 1
        own = dict(net.blocks[consumer - 1].linear.named_parameters())
        rule.set_feedback(layer, index, {n: own[n] for n, _ in slot.buffers}, consumer=consumer)
    _, fa = _grads(net, rule, x, y)
    for a, b in zip(bp, fa, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", MODELS)
def test_dfa_aux_is_each_blocks_local_loss_gradient(name):
    model, x, net = _converted(name)
    y = _labels(len(x))
    rule = FeedbackRule("dfa-aux", net, dtype=DTYPE)
    with _statistics_kept(net):
        deltas = rule.deltas(net, x, y).deltas
        cache = net.forward_cache(x)
    for i, block in enumerate(net.blocks[:-1], start=1):
        D = rule.feedback(i, 0)["matrix"]
        a = cache.pre[i - 1].clone().requires_grad_(True)
        h = nn.Sequential(*block.tail.modules)(block.activation.function(a))
        loss = functional.cross_entropy(h.flatten(1) @ D.t(), y, reduction="sum")
        (expected,) = torch.autograd.grad(loss, a)
        torch.testing.assert_close(deltas[i], expected, rtol=0, atol=1e-12, msg=f"block {i}")


def _linearised(part, params):
    """``x -> phi(x)`` with ``params`` in place of the part's own: a part of one module runs
    with them; a composite part (a traced conv and its BatchNorm, a transformer layer) keeps
    its forward values and takes, at each Linear or Conv2d whose parameters are replaced, the
    derivative of that layer with the replacing ones (DESIGN.md section 12), by forward hooks."""
    own = dict(part.named_parameters())
    if not isinstance(part, fx.GraphModule) or set(params) == set(own):
        return lambda x: functional_call(part, params, (x,))
    owners = {}
    for name, value in params.items():
        owner, _, leaf = name.rpartition(".")
        owners.setdefault(owner, {})[leaf] = value

    def stand_in(layer, replacing):
        def hook(module, inputs, output):
            (z,) = inputs
            if isinstance(layer, nn.Linear):
                c = functional.linear(z, replacing["weight"], replacing.get("bias"))
            elif isinstance(layer, nn.Conv2d):
                c = functional.conv2d(
                    z, replacing["weight"], replacing.get("bias"), layer.stride, layer.padding
                )
            else:
                raise AssertionError(f"no transcription of a {type(layer).__name__}: write one")
            return output.detach() + (c - c.detach())

        return hook

    def call(x):
        hooks = [
            part.get_submodule(owner).register_forward_hook(stand_in(part.get_submodule(owner), r))
            for owner, r in owners.items()
        ]
        try:
            return part(x)
        finally:
            for hook in hooks:
                hook.remove()

    return call


def _part_vjp(part, params, point, g):
    """``J^T g`` of a block's part with ``params`` for its own at ``point``."""
    x = point.clone().requires_grad_(True)
    return torch.autograd.grad(_linearised(part, params)(x), x, g)[0]


def _part_jvp(part, params, point, v):
    """``J v``, as ``_part_vjp`` reads a part."""
    return torch.autograd.functional.jvp(_linearised(part, params), point, v)[1]


def _copied(values):
    """Feedback values as they are now (sign-concordant ones are remade in place each call)."""
    return {name: value.clone() for name, value in values.items()}


def transcription(net, rule, x, y) -> dict[int, torch.Tensor]:
    """Every delta of ``rule`` on the graph ``net`` from DESIGN.md section 12's table, each
    Jacobian product taken by autograd on the composed pieces (edge, part, tail)."""
    blocks, edges = net.blocks, net.edges
    L = len(blocks)
    post, inputs, a, z = [x], [], {}, {}
    with torch.no_grad():
        for c, (block, edge) in enumerate(zip(blocks, edges, strict=True), start=1):
            args = [post[p] for p in edge.producers]
            inputs.append(args[0] if edge.function is None else edge.function(*args))
            a[c] = block.linear(inputs[-1])
            if c < L:
                z[c] = block.activation.function(a[c])
                post.append(nn.Sequential(*block.tail.modules)(z[c]))
    one_hot = functional.one_hot(y, CLASSES).to(DTYPE)
    e = torch.softmax(a[L], 1) - one_hot

    def edge_in(c, values):
        edge = edges[c - 1]
        args = [values.get(p, post[p]) for p in edge.producers]
        return args[0] if edge.function is None else edge.function(*args)

    def tail_vjp(i, g):
        point = z[i].clone().requires_grad_(True)
        return torch.autograd.grad(nn.Sequential(*blocks[i - 1].tail.modules)(point), point, g)[0]

    def tail_jvp(i, v):
        return torch.autograd.functional.jvp(nn.Sequential(*blocks[i - 1].tail.modules), z[i], v)[1]

    def slope(i, g):
        point = a[i].clone().requires_grad_(True)
        return torch.autograd.grad(blocks[i - 1].activation.function(point), point, g)[0]

    def consumers(i):
        return [c for c, edge in enumerate(edges, start=1) if i in edge.producers]

    def above(i, params_of, signal_of):
        total = 0
        for c in consumers(i):
            point = post[i].clone().requires_grad_(True)
            back = _part_vjp(blocks[c - 1].linear, params_of(c), inputs[c - 1], signal_of(c))
            total = total + torch.autograd.grad(edge_in(c, {i: point}), point, back)[0]
        return tail_vjp(i, total)

    def below(i, params, signal_of):
        producers = [p for p in edges[i - 1].producers if p > 0]
        carried = tuple(tail_jvp(p, signal_of(p)) for p in producers)
        points = tuple(post[p] for p in producers)

        def edge_of(*values):
            return edge_in(i, dict(zip(producers, values, strict=True)))

        signal = torch.autograd.functional.jvp(edge_of, points, carried)[1]
        return _part_jvp(blocks[i - 1].linear, params, inputs[i - 1], signal)

    deltas = {L: e}

    def only(j):
        layer = rule.config.layer(j)
        (k,) = [k for k, term in enumerate(layer.terms) if term.kind == "direct"]
        return slope(j, value(j, k, layer.terms[k]))

    def signal(final):
        return lambda j: delta(j) if final or j == L else only(j)

    def value(i, k, term):
        if term.kind == "direct":
            D = rule.feedback(i, k)["matrix"]
            if term.error == "output":
                return (e @ D).view(a[i].shape)
            if term.error == "target":
                return (one_hot @ D).view(a[i].shape)
            if term.error != "auxiliary":
                raise AssertionError(f"no transcription of signal {term.error!r}: write one here")
            e_i = torch.softmax(post[i].flatten(1) @ D.t(), 1) - one_hot
            return tail_vjp(i, (e_i @ D).view(post[i].shape))
        if term.kind == "backprop":
            return above(i, lambda c: dict(blocks[c - 1].linear.named_parameters()), delta)
        if term.kind == "above":
            return above(
                i,
                lambda c: _copied(rule.feedback(i, k, net, consumer=c)),
                signal(term.source == "final"),
            )
        if term.kind == "below":
            return below(i, _copied(rule.feedback(i, k, net)), signal(term.source == "final"))
        raise AssertionError(f"no transcription of a {term.kind!r} term: write one here")

    def delta(i):
        if i not in deltas:
            layer = rule.config.layer(i)
            terms = zip(layer.terms, layer.coefficients(), strict=True)
            total = sum(c * value(i, k, term) for k, (term, c) in enumerate(terms))
            deltas[i] = slope(i, total)
        return deltas[i]

    for i in range(1, L):
        delta(i)
    return dict(sorted(deltas.items()))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_is_its_transcription(name, preset):
    model, x, net = _converted(name)
    y = _labels(len(x))
    if preset == "dfa-conv":  # a tiled term runs the one block above: defined on chains
        with pytest.raises(ConfigError, match="tiled"):
            FeedbackRule(preset, net, dtype=DTYPE, feedback="xavier", seed=3)
        return
    rule = FeedbackRule(preset, net, dtype=DTYPE, feedback="xavier", seed=3)
    with _statistics_kept(net):
        ours = rule.deltas(net, x, y).deltas
        expected = transcription(net, rule, x, y)
    assert sorted(ours) == sorted(expected)
    for i in expected:
        torch.testing.assert_close(ours[i], expected[i], rtol=0, atol=1e-11, msg=f"block {i}")


def test_the_forward_pass_alone_moves_batchnorms_running_statistics():
    model, x = _small_resnet()
    net = convert(model, x)
    rule = FeedbackRule("fa", net, dtype=DTYPE)  # its rehearsal keeps the statistics
    reference = resnet(8, classes=CLASSES).to(DTYPE)
    reference.load_state_dict(model.state_dict())
    rule.backward(net, x, _labels(len(x)))  # one forward pass, then every product
    reference(x)  # one plain training-mode forward pass
    for (label, mine), theirs in zip(model.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=label)


def test_a_module_fx_cannot_trace_is_refused_in_one_line_with_the_way_out():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            h = self.a(x)
            if h.sum() > 0:  # data-dependent control flow
                h = -h
            return self.b(h)

    with pytest.raises(ConfigError, match=r"cannot trace Branchy: .*leaves=\(ThatModule,\)"):
        convert(Branchy(), torch.zeros(2, 3))


def test_a_leaf_module_is_one_block():
    class Mixer(nn.Module):  # two projections and a product: one block when it is a leaf
        def __init__(self) -> None:
            super().__init__()
            self.p, self.q = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.p(x) * torch.sigmoid(self.q(x))

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Mixer(), nn.ReLU(), nn.Linear(4, 2))
    model = model.to(DTYPE)
    x = torch.rand(5, 3, dtype=DTYPE)
    net = convert(model, x, leaves=(Mixer,))
    assert [type(block.linear).__name__ for block in net.blocks] == ["Linear", "Mixer", "Linear"]
    y = torch.arange(5) % 2
    step = FeedbackRule("bp", net, dtype=DTYPE).backward(net, x, y)
    ours = [p.grad.clone() for p in net.parameters()]
    for p in model.parameters():
        p.grad = None
    functional.cross_entropy(model(x), y).backward()
    assert step.deltas[2].shape == (5, 4)
    for mine, p in zip(ours, model.parameters(), strict=True):
        torch.testing.assert_close(mine, p.grad, rtol=0, atol=1e-12)


def test_a_model_with_dropout_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="takes no dropout"):
        convert(model, torch.zeros(2, 3))


def _replaced(model: nn.Module, mode: str) -> dict[str, nn.Module]:
    """biotorch's own layer replacement: every Conv2d and Linear of ``model`` becomes its
    feedback layer of type ``mode``, with the same weights; the new layers by name."""
    import biotorch.layers.fa_constructor as layers

    replaced = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Conv2d:
                new = layers.Conv2d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    child.stride,
                    child.padding,
                    bias=child.bias is not None,
                    layer_config={"type": mode},
                )
            elif type(child) is nn.Linear:
                new = layers.Linear(
                    child.in_features, child.out_features, layer_config={"type": mode}
                )
            else:
                continue
            new = new.to(DTYPE)
            with torch.no_grad():
                new.weight.copy_(child.weight)
                if child.bias is not None:
                    new.bias.copy_(child.bias)
            setattr(module, child_name, new)
            replaced[f"{name}.{child_name}" if name else child_name] = new
    return replaced


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fa", "usf"])
def test_one_step_on_resnet20_equals_biotorchs_from_the_same_weights_and_kernels(mode):
    """biotorch's ResNet-20 (its small_resnet.py) with its own fa or uSF layers against our
    rule on the graph of the same module: every parameter's gradient, float64."""
    import copy

    torch.manual_seed(4)
    plain = biotorch_file("models/small_resnet.py").resnet20().to(DTYPE)
    x = torch.rand(4, 3, 32, 32, dtype=DTYPE)
    y = torch.arange(4) % 10
    theirs = copy.deepcopy(plain)
    layers = _replaced(theirs, mode)
    net = convert(plain, x)
    rule = FeedbackRule(mode, net, dtype=DTYPE)
    if mode == "fa":  # one kernel per layer, as biotorch keeps: ours set to theirs
        for key, slot in rule.slots.items():
            layer, index, consumer = key
            part = net.blocks[consumer - 1].linear
            values = {}
            for name, _ in slot.buffers:
                qualified = name[: -len(".weight")] if name != "weight" else None
                if qualified is None:  # the part is the layer itself
                    qualified = next(q for q, m in plain.named_modules() if m is part)
                values[name] = layers[qualified].weight_backward.detach()
            rule.set_feedback(layer, index, values, consumer=consumer)
    theirs.train()
    net.train()
    functional.cross_entropy(theirs(x), y).backward()
    rule.backward(net, x, y)
    expected = {
        name: p.grad
        for name, p in theirs.named_parameters()
        if not name.endswith("_backward") and p.grad is not None
    }
    ours = dict(plain.named_parameters())
    assert set(expected) == set(ours)
    for name, grad in expected.items():
        torch.testing.assert_close(ours[name].grad, grad, rtol=1e-10, atol=1e-12, msg=name)


def test_alignment_on_a_graph_reads_bp_as_the_true_gradient():
    """The alignment probe's autograd reference follows the graph's edges: bp's updates are at
    0 degrees from it, fa's random feedback away from it."""
    from gfalign.alignment import measure

    model, x = _residual()
    net = convert(model, x)
    y = _labels(len(x))
    bp = measure(net, FeedbackRule("bp", net, dtype=DTYPE), x, y)
    fa = measure(net, FeedbackRule("fa", net, dtype=DTYPE), x, y)
    for i in (1, 2, 3):
        assert bp[f"update_angle_{i}"] == pytest.approx(0.0, abs=1e-5)
    assert max(fa[f"update_angle_{i}"] for i in (1, 2, 3)) > 1.0


def test_dfa_on_the_transformer_gives_each_layer_one_direct_term_and_backprop_within_it():
    """Launay et al.'s placement: the output error projected to each transformer layer's
    output, and the layer's parameters trained by backpropagating that delta inside it."""
    model, x, net = _converted("transformer")
    assert [type(block.linear).__name__ for block in net.blocks] == [
        "Embedding",
        "Layer",
        "Layer",
        "GraphModule",  # the final LayerNorm and the head
    ]
    y = _labels(len(x))
    rule = FeedbackRule("dfa", net, dtype=DTYPE)
    for i in (1, 2, 3):
        assert [term.kind for term in rule.config.layer(i).terms] == ["direct"]
    step, ours = _grads(net, rule, x, y)
    with torch.no_grad():
        e = torch.softmax(model(x), 1) - functional.one_hot(y, CLASSES).to(DTYPE)
    inputs = [x]
    for block in net.blocks[:-1]:
        inputs.append(block.tail.forward(block.linear(inputs[-1]))[0])
    grads = dict(zip((name for name, _ in net.named_parameters()), ours, strict=True))
    for i, layer in enumerate(model.layers, start=2):
        d = (e @ rule.feedback(i, 0)["matrix"]).view(len(x), 5, 8)
        # the identity activation: the delta is the projection itself
        torch.testing.assert_close(step.deltas[i], d, rtol=0, atol=1e-14)
        out = layer(inputs[i - 1])
        expected = torch.autograd.grad(out, list(layer.parameters()), d)
        for (label, _), g in zip(layer.named_parameters(), expected, strict=True):
            mine = grads[f"layers.{i - 1}.{label}"]  # the batch's mean
            torch.testing.assert_close(mine, g / len(x), rtol=0, atol=1e-12, msg=label)


def test_each_consumer_has_one_draw_that_every_producer_it_reads_shares():
    """Along a residual stream a block reads every earlier block of its stage: its feedback
    kernel is one tensor, as biotorch's layer keeps one, whichever producer's term runs it."""
    _, x, net = _converted("resnet8")
    rule = FeedbackRule("fa", net, dtype=DTYPE)
    by_consumer: dict[int, set] = {}
    for (layer, index, consumer), slot in rule.slots.items():
        by_consumer.setdefault(consumer, set()).add(slot.buffers)
        value = rule.feedback(layer, index, consumer=consumer)
        first = min(i for i, _, c in rule.slots if c == consumer)
        assert all(
            torch.equal(v, rule.feedback(first, 0, consumer=consumer)[n]) for n, v in value.items()
        )
    assert all(len(buffers) == 1 for buffers in by_consumer.values())
    readers = [len([key for key in rule.slots if key[2] == c]) for c in by_consumer]
    assert max(readers) > 1  # a consumer read by several producers: the case at hand
    feedback_buffers = [name for name, _ in rule.named_buffers() if name != "direct"]
    assert len(feedback_buffers) == len(by_consumer)
