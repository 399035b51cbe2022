"""Step time of the field's rules against fa's, side by side in one run.

    python benchmarks/field_steps.py [--batch 128] [--threads 2] [--blocks 40]

Each rule's ``FeedbackRule.sgd_step`` on the 784-800-800-10 tanh MLP, timed in interleaved
blocks of 5 steps so a shared machine's noise reaches every rule alike; prints the median and
lower-quartile step time and each rule's ratio to fa's. Then the part of brSF's step no
element-wise trick removes: drawing its new magnitudes, one random number per feedback weight
per step, timed alone with the rule's own family and generator.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gfalign import MLP, FeedbackRule
from gfalign import feedback as feedback_families
from gfalign.terms import step_generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--rules", default="fa,usf,frsf,brsf,kp")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = torch.rand(args.batch, 784), torch.randint(0, 10, (args.batch,))
    cases = {}
    for name in args.rules.split(","):
        net = MLP([784, 800, 800, 10], seed=0)
        rule = FeedbackRule(name, net)
        for _ in range(5):
            rule.sgd_step(net, x, y, lr=1e-4)
        cases[name] = (net, rule)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.blocks):
        for name, (net, rule) in cases.items():
            started = time.perf_counter()
            for _ in range(5):
                rule.sgd_step(net, x, y, lr=1e-4)
            times[name].append((time.perf_counter() - started) / 5 * 1e3)
    reference = statistics.median(times[next(iter(times))])
    print(f"batch {args.batch}, {args.threads} threads, {args.blocks} blocks of 5 steps")
    print(f"{'rule':<6} {'median ms':>10} {'quartile ms':>12} {'/ first':>8}")
    for name, values in times.items():
        median = statistics.median(values)
        quartile = sorted(values)[len(values) // 4]
        print(f"{name:<6} {median:>10.2f} {quartile:>12.2f} {median / reference:>7.2f}x")
    if "brsf" in cases:
        net, rule = cases["brsf"]
        shapes = [tuple(layer.weight.shape) for layer in net.layers[1:]]
        draws = []
        for _ in range(args.blocks):
            started = time.perf_counter()
            for step, shape in enumerate(shapes):
                generator = step_generator(0, step, "bench")
                feedback_families.draw(rule.config.feedback, shape, generator, dtype=x.dtype)
            draws.append((time.perf_counter() - started) * 1e3)
        numbers = sum(a * b for a, b in shapes)
        drawn = statistics.median(draws)
        print(
            f"brsf's redraw alone ({numbers:,} numbers from {rule.config.feedback}): "
            f"{drawn:.2f} ms, {drawn / reference:.2f}x fa's step"
        )


if __name__ == "__main__":
    main()
