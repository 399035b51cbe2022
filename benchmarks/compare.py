"""Two revisions of gfalign side by side: the same ``gfalign bench`` run of each, one table.

Each revision is exported with ``git archive`` into a temporary directory and benchmarked with
its own code (``PYTHONPATH``), in alternation, so both meet the same machine. Prints seconds
per epoch and speed-up over the autograd baseline of every rule, revision by revision.

    python benchmarks/compare.py HEAD~1 HEAD --batch-size 32 --examples 20000 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROW = re.compile(r"^(\S+)\s+([\d.]+)\s+[\d,]+\s+.*?\s([\d.]+)x\s+\d+\s*$")


def export(revision: str, into: Path) -> Path:
    """The source tree of ``revision`` under ``into``; returns its ``src`` directory."""
    archive = subprocess.run(
        ["git", "archive", revision, "src"], check=True, capture_output=True
    ).stdout
    path = into / revision.replace("/", "_").replace("~", "-")
    path.mkdir(parents=True)
    archive_file = path / "src.tar"
    archive_file.write_bytes(archive)
    with tarfile.open(archive_file) as tar:
        tar.extractall(path, filter="data")
    return path / "src"


def bench(source: Path, arguments: list[str]) -> dict[str, tuple[float, float]]:
    """``rule -> (seconds per epoch, speed-up)`` of one ``gfalign bench`` run."""
    environment = {**os.environ, "PYTHONPATH": str(source)}
    command = [sys.executable, "-m", "gfalign", "bench", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} ({source}) failed:\n{result.stderr[-2000:]}")
    output = result.stdout
    rows = {}
    for line in output.splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group(1)] = (float(match.group(2)), float(match.group(3)))
    if not rows:
        raise SystemExit(f"no table in the output of {' '.join(command)}:\n{output}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revisions", nargs=2, metavar="REV")
    parser.add_argument("--rounds", type=int, default=1, help="alternations (medians shown)")
    arguments, rest = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as scratch:
        sources = [export(revision, Path(scratch)) for revision in arguments.revisions]
        runs: list[list[dict[str, tuple[float, float]]]] = [[], []]
        for _ in range(arguments.rounds):
            for k, source in enumerate(sources):
                runs[k].append(bench(source, rest))
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    first, second = arguments.revisions
    print(f"gfalign bench {' '.join(rest)}; {arguments.rounds} alternation(s), medians")
    print(f"{'rule':<12} {first + ' s/epoch':>16} {second + ' s/epoch':>16} "
          f"{first + ' speed-up':>16} {second + ' speed-up':>16}")  # fmt: skip
    for rule in runs[0][0]:
        cells = []
        for column in (0, 1):
            for k in (0, 1):
                values = [run[rule][column] for run in runs[k] if rule in run]
                cells.append(f"{median(values):.3f}" if values else "-")
        speedups = [f"{cells[2]}x", f"{cells[3]}x"]
        print(f"{rule:<12} {cells[0]:>16} {cells[1]:>16} {speedups[0]:>16} {speedups[1]:>16}")


if __name__ == "__main__":
    main()
