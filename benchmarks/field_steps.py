"""Step time of the field's rules against fa's, side by side in one run.

    python benchmarks/field_steps.py [--batch 128] [--threads 2] [--blocks 40]

Each rule's ``FeedbackRule.sgd_step`` on the 784-800-800-10 tanh MLP, timed in interleaved
blocks of 5 steps so a shared machine's noise reaches every rule alike; prints the median and
lower-quartile step time and each rule's ratio to fa's. Then each sign-concordant rule's
refresh of its feedback, timed alone through the rule itself: uSF's is the sign, brSF's adds
its new magnitudes, one random number per feedback weight per step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gfalign import MLP, FeedbackRule


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
    for name in ("usf", "brsf"):  # the rule's own refresh of its sign-concordant feedback
        if name in cases:
            net, rule = cases[name]
            times_ = []
            for _ in range(args.blocks):
                started = time.perf_counter()
                rule.feedback(1, 0, net=net)  # remakes every live term: sign, and brSF's draw
                times_.append((time.perf_counter() - started) * 1e3)
            refresh = statistics.median(times_)
            print(f"{name}'s refresh alone: {refresh:.2f} ms, {refresh / reference:.2f}x fa's step")


if __name__ == "__main__":
    main()
