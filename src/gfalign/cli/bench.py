"""``gfalign bench``: seconds per epoch of every rule, against autograd backprop and the machine.

gfalign bench                                   # 784-800-800-10 tanh, batch 32, every preset
gfalign bench --batch-size 128 --data-root /data/mnist --json > bench128.json
gfalign bench --sizes 784,200,200,10 --rules dfa,s3 --ensemble 5
gfalign bench --model lenet5 --rules bp,fa,dfa,s1,s3,dfa-aux --top-ops 8
gfalign bench --tiny                            # seconds, synthetic data: a smoke test
"""

from __future__ import annotations

import json

import click

from gfalign.bench import MODEL_NAMES, BenchConfig, BenchError, format_table, run
from gfalign.rules import PRESETS, ConfigError


def _integers(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.replace("-", ",").split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a list of integers such as 784,800,800,10", param_hint=option
        ) from None


@click.command()
@click.option(
    "--model",
    type=click.Choice(MODEL_NAMES),
    default="mlp",
    show_default=True,
    help="mlp (of --sizes and --activation) or a built-in block model (lenet5: biotorch's "
    "LeNetMNIST on MNIST resized to 32x32).",
)
@click.option(
    "--sizes",
    default="784,800,800,10",
    show_default=True,
    help="Layer widths n_0,...,n_L of the MLP.",
)
@click.option(
    "--activation",
    type=click.Choice(["tanh", "sigmoid", "relu"]),
    default="tanh",
    show_default=True,
    help="Hidden nonlinearity of the MLP.",
)
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--rules",
    default="all",
    show_default=True,
    help=f"Comma-separated presets ({', '.join(PRESETS)}), or 'all'.",
)
@click.option(
    "--baseline/--no-baseline",
    default=True,
    show_default=True,
    help="Time the plain autograd backprop baseline.",
)
@click.option(
    "--optimizer-path",
    is_flag=True,
    help="Also time every rule through .grad and torch.optim.SGD.step.",
)
@click.option(
    "--gemm-only/--no-gemm-only",
    default=True,
    show_default=True,
    help="Time every case's GEMM-only bound: the products its real steps called, replayed alone.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, mps.")
@click.option(
    "--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True
)
@click.option(
    "--data",
    type=click.Choice(["mnist", "synthetic"]),
    default="mnist",
    show_default=True,
    help="mnist falls back to random tensors of its shape when it cannot be loaded.",
)
@click.option(
    "--data-root",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory of MNIST's files (default $GFALIGN_DATA, then the cache).",
)
@click.option(
    "--examples",
    type=click.IntRange(min=1),
    default=None,
    help="Training examples timed per epoch (default: the whole training set); seconds per "
    "epoch are extrapolated to the whole training set.",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Timed epochs per case; the table shows medians.",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Untimed steps per case first.",
)
@click.option(
    "--profile-steps",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Steps per case under torch.profiler, for the share of time in products (0: skip).",
)
@click.option(
    "--top-ops",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also print the N ops that took the most time in each case's profiled steps.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch.set_num_threads (default: torch's choice).",
)
@click.option(
    "--peak-size",
    type=click.IntRange(min=16),
    default=2048,
    show_default=True,
    help="Side of the square product that measures the peak.",
)
@click.option(
    "--ensemble",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="K > 0: also time K sequential runs against one K-member EnsembleTrainer (an "
    "MLP's members stack; a block model's run one after the other).",
)
@click.option(
    "--chunks",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Chunks per epoch; chunk c of every case runs before chunk c+1 of any.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--tiny",
    is_flag=True,
    help="A seconds-long smoke test: 784-16-16-10 (or the --model) on 256 (lenet5: 64) "
    "synthetic examples, 2 repeats.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines on stderr.")
def bench(
    model: str,
    sizes: str,
    activation: str,
    batch_size: int,
    rules: str,
    baseline: bool,
    optimizer_path: bool,
    gemm_only: bool,
    device: str,
    dtype: str,
    data: str,
    data_root: str | None,
    examples: int | None,
    repeats: int,
    warmup: int,
    profile_steps: int,
    top_ops: int,
    threads: int | None,
    peak_size: int,
    ensemble: int,
    chunks: int,
    seed: int,
    tiny: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Benchmark training speed: every rule, an autograd baseline, the GEMM-only bound.

    Times training epochs (after a warm-up) of each rule through gfalign's training loop and
    of a plain PyTorch autograd backprop baseline of the same model, measures the machine's
    float32 matrix-product peak, and prints seconds per epoch, examples per second, achieved
    GFLOP/s (the products and convolutions counted on a real step of each case), the fraction
    of the peak, the GEMM-only time (the same products replayed back to back) over the epoch
    time, the share of profiled steps spent in products, the speed-up over the baseline and
    the peak memory. Medians of interleaved repeats.
    """
    names = tuple(PRESETS) if rules.strip() == "all" else tuple(
        name.strip() for name in rules.split(",") if name.strip()
    )  # fmt: skip
    unknown = [name for name in names if name not in PRESETS]
    if unknown:
        raise click.BadParameter(
            f"unknown preset(s) {', '.join(unknown)}; known: {', '.join(PRESETS)}",
            param_hint="--rules",
        )
    settings = dict(
        model=model,
        sizes=_integers(sizes, "--sizes"),
        activation=activation,
        batch_size=batch_size,
        rules=names,
        baseline=baseline,
        optimizer_path=optimizer_path,
        gemm_only=gemm_only,
        device=device,
        dtype=dtype,
        data=data,
        data_root=data_root,
        examples=examples,
        repeats=repeats,
        warmup=warmup,
        profile_steps=profile_steps,
        threads=threads,
        peak_size=peak_size,
        ensemble=ensemble,
        chunks=chunks,
        seed=seed,
    )
    if tiny:
        settings.update(
            sizes=(784, 16, 16, 10),
            data="synthetic",
            examples=examples or (256 if model == "mlp" else 64),
            repeats=2,
            warmup=2,
            profile_steps=min(profile_steps, 2),
            peak_size=128,
        )
    try:
        config = BenchConfig(**settings)
        progress = None if quiet else (lambda line: click.echo(line, err=True))
        result = run(config, progress=progress)
    except (BenchError, ConfigError) as problem:
        raise click.ClickException(str(problem)) from None
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result, top_ops=top_ops))
