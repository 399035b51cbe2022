"""Training steps beside biotorch's, in one run: plain autograd, our rules, and biotorch's same
rules on its own model: ResNet-20 (a model graph) or LeNet-5 (biotorch's LeNetMNIST).

Every case takes the gradients of one batch of random inputs (3x32x32 for ResNet-20, 1x32x32
for LeNet-5) into ``.grad`` (no optimizer step): autograd's ``loss.backward()`` on the plain
module (``gfalign.architectures.resnet(20)``; biotorch's unconverted ``LeNetMNIST``);
``FeedbackRule(rule).backward`` on our model (that ResNet converted by ``gfalign.convert``;
the built-in ``lenet5``, the same network as blocks); biotorch's model converted by its
``BioModule`` to the rule's mode, stepped as ``biotorch.training.functions.train`` steps it
(``benchmarks.peers.biotorch_lenet.step``). The cases alternate, ``--repeats`` rounds after
``--warmup``, and each figure is the median over rounds of the seconds per step.

    python -m benchmarks.beside_biotorch --model resnet20 --batch-size 128 --repeats 5
    python -m benchmarks.beside_biotorch --model lenet5 --batch-size 128 --repeats 5

biotorch is needed (``pip install --no-deps biotorch==0.0.16``, as ``make install`` does).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import statistics
import time

import torch
from benchmarks.peers.biotorch_lenet import MODES, PeerError, biotorch_file, lenet, step, version
from torch import nn
from torch.nn import functional

from gfalign import FeedbackRule, convert
from gfalign.architectures import resnet
from gfalign.models import build, model_spec

RULES = ("bp", "fa", "dfa", "usf")


def biotorch_resnet20(mode: str, seed: int) -> nn.Module:
    """biotorch's ResNet-20 converted to ``mode``, as its benchmark builds it."""
    from biotorch.module.biomodule import BioModule

    small_resnet = biotorch_file("models/small_resnet.py")
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints what it converted
        return BioModule(
            small_resnet.resnet20(),
            mode=mode,
            copy_weights=False,
            layer_config={"type": mode},
            output_dim=10,
        )


def _ours(model: str, x: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    """``(plain module for autograd, our model)`` of ``model``."""
    torch.manual_seed(0)
    if model == "resnet20":
        module = resnet(20)
        return module, convert(module, x)
    plain = biotorch_file("models/le_net.py").LeNetMNIST()
    return plain, build(model_spec("lenet5"), "classification", seed=0)


def _theirs(model: str, mode: str) -> nn.Module:
    return biotorch_resnet20(mode, seed=0) if model == "resnet20" else lenet(mode, seed=0)


def cases(model: str, rules, x, y):
    """``name -> step function``, ours and (where installed) biotorch's."""
    module, net = _ours(model, x)

    def autograd():
        module.zero_grad()
        functional.cross_entropy(module(x), y).backward()

    found = {"autograd": autograd}
    for rule in rules:
        ours = FeedbackRule(rule, net, feedback="xavier")
        found[f"gfalign {rule}"] = lambda ours=ours: ours.backward(net, x, y)
    for rule in rules:
        mode = MODES.get(rule)
        if mode is None:
            continue
        peer = _theirs(model, mode)
        found[f"biotorch {rule}"] = lambda peer=peer, mode=mode: step(peer, mode, x, y)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["resnet20", "lenet5"], default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--device", default="cpu")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    device = torch.device(arguments.device)
    if device.type != "cpu":
        raise SystemExit("this script times CPU steps; run it with --device cpu")
    try:
        version()
    except PeerError as problem:
        raise SystemExit(f"biotorch is needed for its models and rules: {problem}") from None
    torch.manual_seed(1)
    channels = 3 if arguments.model == "resnet20" else 1
    x = torch.rand(arguments.batch_size, channels, 32, 32, device=device)
    y = torch.randint(10, (arguments.batch_size,), device=device)
    found = cases(arguments.model, arguments.rules.split(","), x, y)
    times: dict[str, list[float]] = {name: [] for name in found}
    for round_ in range(arguments.warmup + arguments.repeats):
        for name, run in found.items():
            start = time.perf_counter()
            run()
            if round_ >= arguments.warmup:
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"# {arguments.model}, batch {arguments.batch_size}, {arguments.threads} threads, "
        f"{platform.machine()} {platform.processor() or ''}, torch {torch.__version__}; "
        f"median of {arguments.repeats} rounds"
    )
    print(f"{'case':<16} {'s / step':>9} {'vs autograd':>12} {'vs biotorch':>12}")
    for name, seconds in median.items():
        speed = median["autograd"] / seconds
        rule = name.split()[-1]
        peer = median.get(f"biotorch {rule}")
        against = f"{peer / seconds:.2f}x" if peer and name.startswith("gfalign") else "-"
        print(f"{name:<16} {seconds:>9.3f} {speed:>11.2f}x {against:>12}")


if __name__ == "__main__":
    main()
