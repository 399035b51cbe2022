"""ResNet-20 training steps side by side, in one run: plain autograd, our rules on the model
graph, and biotorch's same rules on its own ResNet-20.

Every case takes the gradients of one batch of random 3x32x32 inputs into ``.grad`` (no
optimizer step): autograd's ``loss.backward()`` on ``gfalign.architectures.resnet(20)``;
``FeedbackRule(rule).backward`` on that module converted by ``gfalign.convert``; biotorch's
``resnet20`` (``models/small_resnet.py``) converted by its ``BioModule`` to the rule's mode,
stepped as ``biotorch.training.functions.train`` steps it (``benchmarks.peers.biotorch_lenet
.step``). The cases alternate, ``--repeats`` rounds after ``--warmup``, and each figure is the
median over rounds of the seconds per step.

    python -m benchmarks.resnet20 --batch-size 128 --repeats 5 --threads 2

biotorch is optional (``pip install --no-deps biotorch==0.0.16``); without it its column is
left out and the script says so.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import statistics
import time

import torch
from benchmarks.peers.biotorch_lenet import MODES, PeerError, biotorch_file, step, version
from torch import nn
from torch.nn import functional

from gfalign import FeedbackRule, convert
from gfalign.architectures import resnet

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


def cases(rules, x, y):
    """``name -> step function``, ours and (where installed) biotorch's."""
    torch.manual_seed(0)
    module = resnet(20)
    net = convert(module, x)

    def autograd():
        module.zero_grad()
        functional.cross_entropy(module(x), y).backward()

    found = {"autograd": autograd}
    for rule in rules:
        ours = FeedbackRule(rule, net, feedback="xavier")
        found[f"gfalign {rule}"] = lambda ours=ours: ours.backward(net, x, y)
    try:
        version()
    except PeerError as problem:
        print(f"# biotorch left out: {problem}")
        return found
    for rule in rules:
        mode = MODES.get(rule)
        if mode is None:
            continue
        model = biotorch_resnet20(mode, seed=0)
        found[f"biotorch {rule}"] = lambda model=model, mode=mode: step(model, mode, x, y)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--device", default="cpu")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    device = torch.device(arguments.device)
    torch.manual_seed(1)
    x = torch.rand(arguments.batch_size, 3, 32, 32, device=device)
    y = torch.randint(10, (arguments.batch_size,), device=device)
    found = cases(arguments.rules.split(","), x, y)
    if device.type != "cpu":
        raise SystemExit("this script times CPU steps; run it with --device cpu")
    times: dict[str, list[float]] = {name: [] for name in found}
    for round_ in range(arguments.warmup + arguments.repeats):
        for name, run in found.items():
            start = time.perf_counter()
            run()
            if round_ >= arguments.warmup:
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"# ResNet-20, batch {arguments.batch_size}, {arguments.threads} threads, "
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
