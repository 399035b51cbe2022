"""The benchmark as a script: the same code and options as ``gfalign bench``.

    python benchmarks/bench.py --batch-size 32 --data-root /path/to/mnist
    python benchmarks/bench.py --batch-size 128 --json > bench-128.json
    python benchmarks/bench.py --sizes 784,200,200,10 --rules dfa --ensemble 5
    python benchmarks/bench.py --tiny

See ``gfalign.bench`` for what is measured and how.
"""

from gfalign.cli.bench import bench

if __name__ == "__main__":
    bench(prog_name="benchmarks/bench.py")
