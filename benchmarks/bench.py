"""The benchmark as a script: the MLP table, then the LeNet-5 table, with ``gfalign bench``'s code.

    python benchmarks/bench.py --batch-size 32 --data-root /path/to/mnist
    python benchmarks/bench.py --batch-size 128 --examples 8192 --repeats 3
    python benchmarks/bench.py --model mlp --sizes 784,200,200,10 --rules dfa --ensemble 5
    python benchmarks/bench.py --tiny

Without ``--model`` it prints two tables: the MLP of the options (784-800-800-10 tanh by
default, every preset unless ``--rules``), then ``lenet5`` with the same options except the
MLP's own (``--sizes``, ``--activation``, ``--ensemble``), for the rules bp, fa, dfa, s1, s3 and
dfa-aux unless ``--rules``. With ``--model`` it is ``gfalign bench`` itself.
See ``gfalign.bench`` for what is measured and how.
"""

import sys

from gfalign.cli.bench import bench

LENET_RULES = "bp,fa,dfa,s1,s3,dfa-aux"
MLP_ONLY = ("--sizes", "--activation", "--ensemble")  # options that take a value


def _without_mlp_options(arguments: list[str]) -> list[str]:
    kept, skip = [], False
    for argument in arguments:
        if skip:
            skip = False
            continue
        name = argument.split("=", 1)[0]
        if name in MLP_ONLY:
            skip = "=" not in argument
            continue
        kept.append(argument)
    return kept


def main(arguments: list[str]) -> None:
    name = "benchmarks/bench.py"
    if any(a == "--model" or a.startswith("--model=") for a in arguments) or "--help" in arguments:
        bench(arguments, prog_name=name)
        return
    bench(arguments, prog_name=name, standalone_mode=False)
    print()
    lenet = _without_mlp_options(arguments)
    if not any(a == "--rules" or a.startswith("--rules=") for a in lenet):
        lenet += ["--rules", LENET_RULES]
    bench([*lenet, "--model", "lenet5"], prog_name=name)


if __name__ == "__main__":
    main(sys.argv[1:])
