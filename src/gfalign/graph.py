"""Model graphs from a user's ``nn.Module``, traced by ``torch.fx`` (DESIGN.md section 12).

``convert(model, example_input)`` traces the module and reads the trace as blocks joined by
parameter-free edges: every call of a module with parameters is a block's part (with the
normalisation module it feeds or is fed by, when it is that block's only neighbour), the
element-wise activation right after it is the block's activation, the chain of single-input
parameter-free operations after that its tail; whatever else lies between blocks (a residual
``+``, a ``torch.cat``, a relu after an addition, a reshape) is the edge each block reads its
input through. The result is a ``gfalign.network.Network``: its ``forward`` computes what the
module computes, from the same parameters (shared, not copied), and every rule trains it.

    >>> class Residual(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.inner, self.skip, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
    ...     def forward(self, x):
    ...         h = torch.tanh(self.inner(x))
    ...         return self.out(torch.relu(self.skip(h) + h))
    >>> net = convert(Residual(), torch.zeros(1, 4))
    >>> [edge.producers for edge in net.edges]  # the output block reads blocks 1 and 2
    [(0,), (1,), (1, 2)]

A module ``torch.fx`` cannot trace (a branch on a tensor's value, say) is refused in one
line naming what failed; the way out is to make that module one block, a leaf of the trace:
``convert(model, x, leaves=(ThatModule,))``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional

from gfalign.blocks import Block, Tail
from gfalign.network import ACTIVATION_MODULES, ACTIVATIONS, IDENTITY, Activation, Edge, Network
from gfalign.plan import NORMALISATIONS
from gfalign.rules import ConfigError

__all__ = ["convert"]

_ACTIVATION_FUNCTIONS = {
    torch.relu: "relu",
    functional.relu: "relu",
    torch.tanh: "tanh",
    functional.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    functional.sigmoid: "sigmoid",
}
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


class _Tracer(fx.Tracer):
    """fx's tracer, stopping at the given leaves and at every module with parameters of its
    own (whose forward reads them directly, so it can only be one block)."""

    def __init__(self, leaves: tuple[type, ...]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if self.leaves and isinstance(module, self.leaves):
            return True
        if any(True for _ in module.parameters(recurse=False)):
            return True
        return super().is_leaf_module(module, qualified_name)


def _first_line(problem: BaseException) -> str:
    text = str(problem).strip().splitlines()
    return text[0] if text else type(problem).__name__


class _Reader:
    """One traced module, read as blocks and edges."""

    def __init__(self, module: fx.GraphModule) -> None:
        self.module = module
        self.nodes = list(module.graph.nodes)
        self.assigned: set[fx.Node] = set()

    def submodule(self, node: fx.Node) -> nn.Module | None:
        return self.module.get_submodule(node.target) if node.op == "call_module" else None

    def has_parameters(self, node: fx.Node) -> bool:
        module = self.submodule(node)
        return module is not None and any(True for _ in module.parameters())

    def is_norm(self, node: fx.Node) -> bool:
        return isinstance(self.submodule(node), NORMALISATIONS)

    def activation(self, node: fx.Node) -> Activation | None:
        """The activation ``node`` applies to its one input, or ``None``."""
        if len(node.all_input_nodes) != 1:
            return None
        module = self.submodule(node)
        if module is not None:
            return ACTIVATION_MODULES.get(type(module))
        if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
            return ACTIVATIONS[_ACTIVATION_FUNCTIONS[node.target]]
        if node.op == "call_method" and node.target in ACTIVATIONS and len(node.args) == 1:
            return ACTIVATIONS[node.target]
        return None

    def only_user(self, node: fx.Node) -> fx.Node | None:
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    def is_unary_free(self, node: fx.Node, source: fx.Node) -> bool:
        """A parameter-free operation on ``source`` alone: a tail step."""
        return (
            node.op in ("call_module", "call_function", "call_method")
            and node.all_input_nodes == [source]
            and not self.has_parameters(node)
            and not self.is_norm(node)
            and node not in self.assigned
        )

    def subgraph(self, nodes: Sequence[fx.Node], inputs: Sequence[fx.Node], out: fx.Node):
        """A module computing ``out`` from ``inputs`` (in order) through ``nodes``."""
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for number, node in enumerate(inputs):
            env[node] = graph.placeholder(f"input_{number}")
        for node in nodes:
            if node not in env:
                env[node] = copy = graph.node_copy(node, lambda n: env[n])
                _out_of_place(copy)
        graph.output(env[out])
        return fx.GraphModule(self.module, graph)


_OUT_OF_PLACE = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


def _out_of_place(node: fx.Node) -> None:
    """An in-place operation (``out += x``, ``relu(x, inplace=True)``) as its out-of-place
    twin: a piece run on a cached forward value must never write into it."""
    if node.op == "call_function" and node.target in _OUT_OF_PLACE:
        node.target = _OUT_OF_PLACE[node.target]
    if node.kwargs.get("inplace"):
        node.kwargs = {**node.kwargs, "inplace": False}
    method = node.target if node.op == "call_method" else ""
    if isinstance(method, str) and method.endswith("_") and not method.endswith("__"):
        node.target = method[:-1]  # x.add_(y) -> x.add(y)


def convert(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    objective: str = "classification",
    leaves: Sequence[type] = (),
    seed: int = 0,
) -> Network:
    """The model graph of ``model`` (DESIGN.md section 12), sharing its parameters.

    Args:
        model: any ``nn.Module`` whose ``forward`` takes one tensor and returns the logits
            (the output of its last module with parameters).
        example_input: a batch of its inputs, (N, ...): fixes the input shape and checks that
            the graph computes what the module does.
        objective: ``"classification"`` or ``"autoencoder"``.
        leaves: module types the trace does not enter: each call is one block (an attention
            module whose projections are to be one part, a module fx cannot trace).
        seed: seeds the dropout state (graphs take no dropout).

    Raises:
        ConfigError: in one line, naming what cannot be read and the way out.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(),
        ...                       nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
        >>> net = convert(model, torch.zeros(2, 1, 6, 6))
        >>> [type(block.linear).__name__ for block in net.blocks], net.blocks[0].activation.name
        (['GraphModule', 'Linear'], 'relu')
    """
    name = type(model).__name__
    try:
        graph = _Tracer(tuple(leaves)).trace(model)
    except Exception as problem:  # fx raises TraceError, TypeError, NotImplementedError ...
        raise ConfigError(
            f"cannot trace {name}: {_first_line(problem)}; make the module that does this one "
            "block, a leaf of the trace: convert(model, x, leaves=(ThatModule,))"
        ) from None
    reader = _Reader(fx.GraphModule(model, graph))
    inputs = [node for node in reader.nodes if node.op == "placeholder"]
    if len(inputs) != 1:
        raise ConfigError(f"{name}.forward takes {len(inputs)} inputs; a model takes one tensor")
    called: dict[Any, fx.Node] = {}
    parameters = dict(reader.module.named_parameters())
    for node in reader.nodes:
        if node.op == "get_attr" and node.target in parameters:
            raise ConfigError(
                f"{name} uses the parameter {node.target} outside a module's call; make the "
                "module that holds it a leaf block (leaves=(ThatModule,))"
            )
        module = reader.submodule(node)
        if isinstance(module, _DROPOUTS):
            raise ConfigError(
                f"{name} applies {type(module).__name__} ({node.target}); a model graph takes "
                "no dropout (a chain of blocks does: gfalign.models.from_modules)"
            )
        if module is not None and reader.has_parameters(node):
            if node.target in called:
                raise ConfigError(
                    f"{name} calls {node.target} twice; a block's parameters are its own: give "
                    "each call a module of its own"
                )
            called[node.target] = node
    blocks, outs = _blocks(reader, name)
    edges, parts = [], []
    for number, block in enumerate(blocks, start=1):
        x = block["input"]
        producers = _producers(x, inputs[0], outs)
        ordered = sorted(producers)
        if not ordered or ordered[-1] >= number:
            raise ConfigError(f"block {number} of {name} reads a later block; cannot order it")
        if len(ordered) == 1 and (outs.get(x) == ordered[0] or (x is inputs[0])):
            edges.append(Edge(tuple(ordered)))
        else:
            sources = [inputs[0] if p == 0 else blocks[p - 1]["out"] for p in ordered]
            between = _between(reader, sources, x)
            edges.append(Edge(tuple(ordered), reader.subgraph(between, sources, x)))
        parts.append(_part(reader, block))
    output = next(node for node in reader.nodes if node.op == "output")
    last = blocks[-1] if blocks else None
    if last is None or output.args[0] is not last["out"] or last["activation"] is not IDENTITY:
        raise ConfigError(
            f"{name}'s output is not its last module's output: a model returns the logits of "
            "its last module with parameters, with nothing applied after it"
        )
    net_blocks = [
        Block(part, block["activation"], Tail(tuple(block["tail"])))
        for part, block in zip(parts, blocks, strict=True)
    ]
    shape = tuple(example_input.shape[1:])
    net = Network(net_blocks, objective, input_shape=shape, seed=seed, edges=edges)
    _check_same(net, model, example_input, name)
    return net


def _blocks(reader: _Reader, name: str) -> tuple[list[dict], dict[fx.Node, int]]:
    """Every block's nodes, in the trace's (topological) order, and each block's output node
    with its number."""
    blocks: list[dict] = []
    outs: dict[fx.Node, int] = {}
    for node in reader.nodes:
        if node in reader.assigned or not reader.has_parameters(node):
            continue
        if reader.is_norm(node):
            user = reader.only_user(node)
            if user is not None and reader.has_parameters(user) and not reader.is_norm(user):
                continue  # a pre-norm: it joins the block it feeds
        part = [node]
        tensors = set(node.all_input_nodes)
        if len(tensors) != 1:
            raise ConfigError(
                f"{name}: {node.target} takes {len(tensors)} tensor inputs; a block's module "
                "takes one (make a module around it a leaf block)"
            )
        (source,) = tensors
        if (
            reader.is_norm(source)
            and reader.only_user(source) is node
            and source not in reader.assigned
            and len(source.all_input_nodes) == 1
        ):
            part.insert(0, source)  # pre-norm: attention(norm(x))
            source = source.all_input_nodes[0]
        last = node
        user = reader.only_user(last)
        if (
            user is not None
            and user.op == "call_function"
            and user.target is operator.getitem
            and user.args[1] == 0
        ):
            part.append(user)  # a module returning a tuple: its first output
            last = user
        user = reader.only_user(last)
        if user is not None and reader.is_norm(user) and user.all_input_nodes == [last]:
            part.append(user)  # post-norm: norm(conv(x))
            last = user
        activation, tail = IDENTITY, []
        user = reader.only_user(last)
        if user is not None and reader.activation(user) is not None:
            activation = reader.activation(user)
            last = user
            reader.assigned.add(user)
        while True:
            user = reader.only_user(last)
            if user is None or not reader.is_unary_free(user, last):
                break
            if any(u.op == "output" for u in user.users):
                break  # a step whose value is the model's output is not a hidden tail
            tail.append(_step(reader, user, last))
            reader.assigned.add(user)
            last = user
        reader.assigned.update(part)
        outs[last] = len(blocks) + 1
        blocks.append(
            {"nodes": part, "input": source, "activation": activation, "tail": tail, "out": last}
        )
    return blocks, outs


def _step(reader: _Reader, node: fx.Node, source: fx.Node) -> nn.Module:
    """A tail step's module: the parameter-free module itself (pooling, flatten: their direct
    products), else the traced operation as a module of its own."""
    module = reader.submodule(node)
    if module is not None and node.args == (source,) and not node.kwargs:
        return module
    return reader.subgraph([node], [source], node)


def _part(reader: _Reader, block: dict) -> nn.Module:
    """A block's part: the module itself where it is called on the input alone (a Linear's,
    a Conv2d's direct products), else its nodes as a module (torch.func's products)."""
    nodes = block["nodes"]
    (first, *rest) = nodes
    alone = not rest and first.op == "call_module" and not first.kwargs
    if alone and first.args == (block["input"],):
        return _opened(reader.submodule(first))
    return reader.subgraph(nodes, [block["input"]], nodes[-1])


def _opened(module: nn.Module) -> nn.Module:
    """A leaf whose parameters belong to its submodules (a transformer layer) traced on its
    own, so that its part is linearised at the forward pass's point like any composite part
    (DESIGN.md section 12); the module itself where it holds parameters of its own or fx
    cannot trace it (then a term runs the whole module with the feedback parameters)."""
    if any(True for _ in module.parameters(recurse=False)):
        return module
    try:
        graph = _Tracer(()).trace(module)
    except Exception:  # the reason it was made a leaf
        return module
    for node in graph.nodes:
        _out_of_place(node)
    return fx.GraphModule(module, graph, class_name=type(module).__name__)


def _producers(node: fx.Node, start: fx.Node, outs: dict[fx.Node, int]) -> set[int]:
    """The blocks (0: the input) whose outputs ``node`` is computed from through
    parameter-free operations."""
    found, stack, seen = set(), [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current is start:
            found.add(0)
        elif current in outs:
            found.add(outs[current])
        else:
            stack.extend(current.all_input_nodes)
    return found


def _between(reader: _Reader, sources: Sequence[fx.Node], node: fx.Node) -> list[fx.Node]:
    """The nodes on the way from ``sources`` to ``node``, in the trace's order."""
    wanted, stack = set(), [node]
    stops = set(sources)
    while stack:
        current = stack.pop()
        if current in wanted or current in stops:
            continue
        if reader.has_parameters(current):
            raise ConfigError(
                f"{current.target} lies between two blocks without being one; make it a block"
            )
        wanted.add(current)
        stack.extend(current.all_input_nodes)
    return [n for n in reader.nodes if n in wanted]


def _check_same(net: Network, model: nn.Module, x: torch.Tensor, name: str) -> None:
    """The graph computes the module's logits (evaluation mode, so no statistic moves)."""
    modes = {module: module.training for module in (*model.modules(), *net.modules())}
    try:
        model.eval()
        net.eval()
        with torch.no_grad():
            theirs, ours = model(x), net(x)
    finally:
        for module, training in modes.items():
            module.train(training)
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-5, atol=1e-6):
        raise ConfigError(
            f"the graph read from {name} computes other logits than its forward; make the "
            "modules it cannot follow leaf blocks (leaves=(...))"
        )
