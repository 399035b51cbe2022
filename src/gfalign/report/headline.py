"""The README's headline result, computed from the results store.

The README quotes one result; ``tests/test_docs.py`` checks that the sentence between its
``<!-- headline -->`` markers is exactly what ``headline`` gives for the store exported in
``results/runs.jsonl.gz``, so a new run that moves a number fails the check until the sentence
is regenerated (``python -c "from gfalign.report.headline import print_headline;
print_headline()"``).

Example:
    >>> from gfalign.store import Store
    >>> with Store(":memory:") as store:  # doctest: +SKIP
    ...     headline(store)
    "On MNIST's 2x800 tanh network under the paper's protocol, s1 reaches — ..."
"""

from __future__ import annotations

from pathlib import Path

from gfalign.report.rows import experiment_rows
from gfalign.report.tables import PENDING, summarize

__all__ = ["CELL", "headline", "print_headline"]

CELL = "2x800 tanh"
"""The network the headline is about: the paper's largest tanh MLP."""


def _text(row) -> str:
    if row is None or row["mean"] is None:
        return PENDING
    spread = f" ± {row['std']:.2f}" if row["std"] is not None else ""
    return f"{row['mean']:.2f}{spread}%"


def headline(store) -> str:
    """One sentence: s1 on the 2x800 tanh network, beside the paper's value and backprop's."""
    from gfalign.experiments import load

    exp1 = load("exp1")
    summary = summarize(exp1, experiment_rows(store, exp1), store.list("baselines"))
    by_cell = {(row["cell"], row["baseline"]): row for row in summary}
    s1, bp = by_cell.get((f"{CELL} s1", False)), by_cell.get((f"{CELL} bp", True))
    seeds = f" over {s1['n']} seeds" if s1 and s1["n"] else ""
    paper = PENDING if not s1 or s1["paper"] is None else f"{s1['paper']:.2f}%"
    return (
        f"On MNIST's {CELL} network under the paper's protocol, s1 reaches {_text(s1)} test "
        f"error{seeds}, against the paper's {paper} and backprop's {_text(bp)} "
        "([results/exp1.md](results/exp1.md))."
    )


def print_headline(export: str | Path = "results/runs.jsonl.gz") -> None:
    """Print the headline of a store export (a temporary store is built from it)."""
    import tempfile

    from gfalign.store import Store

    with tempfile.TemporaryDirectory() as scratch, Store(Path(scratch) / "runs.sqlite") as store:
        store.import_file(export)
        print(headline(store))
