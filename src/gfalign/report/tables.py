"""Our numbers beside the paper's: statistics over seeds, one table row per cell and protocol.

For every cell the table gives the mean and sample standard deviation over seeds, the number
of seeds, a 95% confidence interval for the mean (Student's t over seeds), a one-sample t-test
of the seeds against the published value where there are at least three, the metric at each
seed's best epoch (from the per-epoch history) beside the last epoch's, the mean final
training error and a verdict: ``within 0.20`` points of the paper, ``explained by <reading>``
(a reading of the protocol, ``gfalign.report.readings``), ``unexplained``, or ``pending``
(no run yet).

    >>> s = describe([2.0, 2.2, 2.4], reference=1.96)
    >>> round(s.mean, 2), round(s.std, 2), s.n
    (2.2, 0.2, 3)
    >>> [round(v, 3) for v in s.ci], round(s.p, 3)
    ([1.703, 2.697], 0.173)
"""

from __future__ import annotations

import math
import statistics as stdlib_statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gfalign.experiments import Experiment, with_seed
from gfalign.report.render import Table
from gfalign.report.rows import (
    architecture,
    cells_of,
    config_of,
    planned_protocol,
    points_of,
    preset,
    protocol,
    series,
)

__all__ = [
    "TOLERANCE",
    "Statistics",
    "best_epoch",
    "describe",
    "is_autoencoder",
    "metric_sentence",
    "number_format",
    "summarize",
    "table",
    "verdict_text",
    "welch",
]

PENDING = "—"
BASELINES = "baselines"
TOLERANCE = 0.20
"""How far (points of the metric) ours may be from the paper's value and still agree."""
CONFIDENCE = 0.95

WITHIN = f"within {TOLERANCE:.2f}"
UNEXPLAINED = "unexplained"
WAITING = "pending"


@dataclass(frozen=True)
class Statistics:
    """A sample of one value per seed, described.

    Attributes:
        n: the number of values (seeds).
        mean: their mean.
        std: their sample standard deviation (n - 1 in the denominator), 0 for one value.
        ci: the 95% confidence interval of the mean, ``mean ± t_{0.975, n-1} std / sqrt(n)``;
            None for fewer than two values.
        p: the two-sided p-value of the one-sample t-test of the values against the
            reference, ``t = (mean - reference) / (std / sqrt(n))`` with n - 1 degrees of
            freedom; None without a reference or with fewer than three values. Values that
            are all equal give p = 0 (or 1 when they equal the reference).
    """

    n: int
    mean: float
    std: float
    ci: tuple[float, float] | None
    p: float | None


def describe(values: Sequence[float], reference: float | None = None) -> Statistics:
    """Mean, standard deviation, t-based 95% interval and a t-test against ``reference``.

    Args:
        values: one value per seed, at least one.
        reference: the published value to test against, or None.

    Returns:
        A ``Statistics``.

    >>> describe([1.81, 1.81, 1.81], reference=2.03).p  # no spread: t is infinite
    0.0
    >>> describe([2.5]).ci is None
    True
    """
    from scipy import stats

    values = [float(v) for v in values]
    if not values:
        raise ValueError("describe needs at least one value")
    n = len(values)
    mean = stdlib_statistics.fmean(values)
    std = stdlib_statistics.stdev(values) if n > 1 else 0.0
    flat = max(values) - min(values) <= 1e-9 * max(1.0, abs(mean))  # equal up to rounding
    ci = None
    if n > 1:
        if flat:
            ci = (mean, mean)
        else:
            low, high = stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=std / math.sqrt(n))
            ci = (float(low), float(high))
    p = None
    if reference is not None and n >= 3:
        if flat:
            p = 1.0 if abs(mean - reference) <= 1e-9 else 0.0
        else:
            p = float(stats.ttest_1samp(values, reference).pvalue)
    return Statistics(n, mean, std, ci, p)


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, tuple[float, float] | None]:
    """The difference of means a − b and its Welch 95% interval (None below 2 seeds each).

    >>> difference, interval = welch([1.0, 1.2, 1.1], [1.0, 1.0, 1.0])
    >>> round(difference, 6), [round(end, 3) for end in interval]
    (0.1, [-0.148, 0.348])
    """
    from scipy import stats

    difference = stdlib_statistics.fmean(a) - stdlib_statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return difference, None
    va = stdlib_statistics.variance(a) / len(a)
    vb = stdlib_statistics.variance(b) / len(b)
    if va + vb == 0:
        return difference, (difference, difference)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.975, df)) * math.sqrt(va + vb)
    return difference, (difference - half, difference + half)


def best_epoch(history: Sequence[Mapping[str, Any]], metric: str) -> tuple[float, float] | None:
    """(epoch, value) of a history's lowest ``metric`` (the first such epoch); None if none.

    >>> best_epoch([{"epoch": 1, "test_error": 3.0}, {"epoch": 2, "test_error": 2.5},
    ...             {"epoch": 3, "test_error": 2.7}], "test_error")
    (2.0, 2.5)
    """
    epochs, values = series(history, metric)
    if not values:
        return None
    n = min(range(len(values)), key=values.__getitem__)
    return epochs[n], values[n]


def selected_epoch(history: Sequence[Mapping[str, Any]], metric: str) -> tuple[int, float] | None:
    """(epoch, value) of ``metric`` at the epoch the validation split selected (the last
    record's ``best_epoch``, kept by ``keep_best``); None for a run that selected none.

    >>> selected_epoch([{"epoch": 1, "test_error": 3.0, "best_epoch": 1},
    ...                 {"epoch": 2, "test_error": 2.5, "best_epoch": 1}], "test_error")
    (1, 3.0)
    """
    if not history or not isinstance(history[-1].get("best_epoch"), int):
        return None
    epoch = history[-1]["best_epoch"]
    if not 1 <= epoch <= len(history):
        return None
    value = history[epoch - 1].get(metric)
    return None if not isinstance(value, (int, float)) else (epoch, float(value))


OUTSIDE = " (outside the plan)"
"""Appended to the name of a row whose runs the experiment's grid does not hold."""

# The training-set counterpart of each reported metric.
TRAIN_METRIC = {"test_error": "train_error"}


def _baseline_order() -> dict[str, int]:
    return {name: n for n, name in enumerate(cells_of(preset(BASELINES)))}


def outside_plan(experiment: Experiment, rows: Iterable[Mapping[str, Any]]) -> set[str]:
    """The keys of the rows that follow the experiment's protocol (epochs, training subset)
    but whose configuration, seed aside, its grid does not hold: runs of a superseded reading,
    which the table shows apart and the figures leave out."""
    first = experiment.seeds[0] if experiment.seeds else 0
    planned = {p.key() for p in points_of(experiment)}
    own = planned_protocol(experiment)
    out = set()
    for row in rows:
        config = config_of(row)
        if (config.train.epochs, config.train_subset) != own(experiment.cell(config)):
            continue
        if with_seed(config, first).key() not in planned:
            out.add(row["key"])
    return out


def summarize(
    experiment: Experiment,
    rows: Iterable[Mapping[str, Any]],
    baselines: Iterable[Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Table rows: one per (cell, protocol) with finished runs, and one per cell still pending.

    Each row holds ``cell``, ``paper`` (or None), ``mean``, ``std`` (sample standard deviation
    over seeds, 0 for one seed), ``n`` (seeds), ``ci`` (95% interval or None), ``p`` (t-test
    against the paper, >= 3 seeds, or None), ``values`` and ``seeds`` (per run), ``best`` (the
    mean over the seeds with a history of each one's lowest value), ``best_epochs`` (their
    epochs), ``best_n`` (how many seeds have a history), ``epochs``, ``subset`` (training
    examples, None for all), ``difference`` (ours − paper), ``diverged`` (runs of the cell that
    diverged), ``baseline``, ``train`` (the mean final training error, the paper's "below
    0.01%"; None where a run did not record it), ``verdict`` (``"within 0.20"``,
    ``"unexplained"``, ``"pending"``, or None for cells without a published value and runs of
    another protocol than the experiment's) and ``explained_by`` (reading names, filled by
    ``gfalign.report.readings.explain``). ``baselines``: the rows of the baselines experiment;
    those with an architecture of this experiment's grid are listed after that architecture's
    cells. Pending cells (no finished run) have ``n`` 0 and None for the numbers.
    """
    architectures = list(dict.fromkeys(architecture(c) for c in points_of(experiment)))
    cell_order = {name: n for n, name in enumerate(cells_of(experiment))}
    baseline_order = _baseline_order() if baselines is not None else {}
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    diverged: dict[str, int] = {}
    where = {experiment.cell(p): architecture(p) for p in points_of(experiment)}
    own = planned_protocol(experiment)
    rows = list(rows)
    outside = outside_plan(experiment, rows)

    def add(row: Mapping[str, Any], baseline: bool) -> None:
        config = config_of(row)
        if baseline and architecture(config) not in architectures:
            return
        name = experiment.cell(config)
        if not baseline and row["key"] in outside:
            # A run of the experiment's protocol that its grid no longer holds (a superseded
            # reading): a row of its own, never averaged into the planned cell's.
            shown = set(name.split())
            extra = [part for part in experiment.variant(config).split() if part not in shown]
            name = " ".join([name, *extra]) + OUTSIDE
        where.setdefault(name, architecture(config))
        if row["status"] == "diverged":
            diverged[name] = diverged.get(name, 0) + 1
            return
        if row["status"] != "finished" or row["final"].get(experiment.metric) is None:
            return
        groups.setdefault((name, baseline, protocol(row["config"])), []).append(row)

    for row in rows:
        add(row, False)
    for row in baselines or ():
        add(row, True)

    out = []
    for (name, baseline, (epochs, train_subset, _test)), members in groups.items():
        members = sorted(members, key=lambda r: r["config"].get("seed", 0))
        values = [float(r["final"][experiment.metric]) for r in members]
        trains = [r["final"].get(TRAIN_METRIC.get(experiment.metric, "")) for r in members]
        paper = None if baseline else experiment.paper.get(name)
        stats = describe(values, paper)
        bests = [best_epoch(r.get("history") or (), experiment.metric) for r in members]
        bests = [b for b in bests if b is not None]
        picks = [selected_epoch(r.get("history") or (), experiment.metric) for r in members]
        picks = [b for b in picks if b is not None]
        reference = None if baseline else experiment.reference.get("values", {}).get(name)
        difference = None if paper is None else stats.mean - paper
        verdict = None
        if paper is not None and (epochs, train_subset) == own(name):
            verdict = WITHIN if abs(difference) <= TOLERANCE + 1e-9 else UNEXPLAINED
        out.append(
            {
                "cell": name,
                "paper": paper,
                "mean": stats.mean,
                "std": stats.std,
                "n": stats.n,
                "ci": stats.ci,
                "p": stats.p,
                "values": values,
                "seeds": [int(r["config"].get("seed", 0)) for r in members],
                "best": stdlib_statistics.fmean(v for _e, v in bests) if bests else None,
                "best_epochs": [e for e, _v in bests],
                "best_n": len(bests),
                "selected": stdlib_statistics.fmean(v for _e, v in picks) if picks else None,
                "selected_epochs": [e for e, _v in picks],
                "selected_values": [v for _e, v in picks],
                "selected_n": len(picks),
                "reference": reference,
                "epochs": epochs,
                "subset": train_subset,
                "difference": difference,
                "diverged": diverged.get(name, 0),
                "baseline": baseline,
                "train": None if None in trains else stdlib_statistics.fmean(trains),
                "verdict": verdict,
                "explained_by": [],
            }
        )
    # A cell whose runs all follow another protocol is still pending under the experiment's.
    seen = {
        r["cell"] for r in out if not r["baseline"] and (r["epochs"], r["subset"]) == own(r["cell"])
    }
    for name in cells_of(experiment):
        if name not in seen:
            paper = experiment.paper.get(name)
            out.append(
                {
                    "cell": name,
                    "paper": paper,
                    "mean": None,
                    "std": None,
                    "n": 0,
                    "ci": None,
                    "p": None,
                    "values": [],
                    "seeds": [],
                    "best": None,
                    "best_epochs": [],
                    "best_n": 0,
                    "selected": None,
                    "selected_epochs": [],
                    "selected_values": [],
                    "selected_n": 0,
                    "reference": experiment.reference.get("values", {}).get(name),
                    "epochs": None,
                    "subset": None,
                    "difference": None,
                    "diverged": diverged.get(name, 0),
                    "baseline": False,
                    "train": None,
                    "verdict": None if paper is None else WAITING,
                    "explained_by": [],
                }
            )

    def position(r: dict[str, Any]) -> tuple:
        place = where.get(r["cell"])
        first = architectures.index(place) if place in architectures else 1 << 20
        order = baseline_order if r["baseline"] else cell_order
        return (
            first,
            r["baseline"],
            order.get(r["cell"], 1 << 20),
            r["cell"],
            -(r["epochs"] or 0),
            r["subset"] or 0,
        )

    return sorted(out, key=position)


def is_autoencoder(experiment: Experiment) -> bool:
    return experiment.base.objective == "autoencoder"


def number_format(experiment: Experiment) -> Callable[[float], str]:
    """How the experiment's metric is printed: 2 decimals, 5 for reconstruction errors."""
    return (lambda v: f"{v:.5f}") if is_autoencoder(experiment) else (lambda v: f"{v:.2f}")


def _p_text(p: float | None) -> str:
    if p is None:
        return PENDING
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _epochs_text(epochs: Sequence[float]) -> str:
    low, high = int(min(epochs)), int(max(epochs))
    return f"epoch {low}" if low == high else f"epochs {low}–{high}"


def verdict_text(row: Mapping[str, Any], link: Callable[[str], str] | None = None) -> str:
    """The verdict column: ``explained by`` names (and with ``link``, links) the readings."""
    if row.get("explained_by"):
        names = [link(s) if link else s for s in row["explained_by"]]
        return "explained by " + ", ".join(names)
    return row.get("verdict") or PENDING


def _page_link(name: str) -> str:
    return f"[{name}]({name}.md)"


def table(experiment: Experiment, summary: Sequence[Mapping[str, Any]]) -> Table:
    """The summary as a table; paper, difference, p and verdict columns only where the paper
    has numbers.

    Baseline cells carry ``(baseline)``; pending cells show "—" for the numbers and 0 seeds; a
    cell with one seed shows its value without a spread.
    """
    number = number_format(experiment)
    paper_columns = bool(experiment.paper)
    reference_columns = bool(experiment.reference)
    selected_column = any(r["selected"] is not None for r in summary)
    header = ["cell"] + (["paper"] if paper_columns else [])
    header += ["reference"] if reference_columns else []
    header += ["ours (mean ± std)", "seeds", "epochs"] + (["difference"] if paper_columns else [])
    header += ["− reference"] if reference_columns else []
    peers = next((r["peers"] for r in summary if "peers" in r), [])
    for peer in peers:
        header += [peer["column"], f"ours − {peer['name']}"]
    header += ["95% CI"] + (["p (t-test)"] if paper_columns else [])
    header += ["validation-selected epoch (mean)"] if selected_column else []
    header += ["best epoch (mean)", "train error (mean)"] + (["verdict"] if paper_columns else [])
    rows = []
    for r in summary:
        name = f"{r['cell']} (baseline)" if r["baseline"] else r["cell"]
        if r["mean"] is None:
            ours = PENDING
        elif r["n"] == 1:  # one seed has no spread to show
            ours = number(r["mean"])
        else:
            ours = f"{number(r['mean'])} ± {number(r['std'])}"
        seeds = str(r["n"]) + (f" (+{r['diverged']} diverged)" if r["diverged"] else "")
        epochs = PENDING if r["epochs"] is None else str(r["epochs"])
        if r["subset"] is not None:
            epochs += f" ({r['subset']} ex)"
        ci = PENDING if r["ci"] is None else f"{number(r['ci'][0])}–{number(r['ci'][1])}"
        best = PENDING
        if r["best"] is not None:
            best = f"{number(r['best'])} ({_epochs_text(r['best_epochs'])}"
            best += ")" if r["best_n"] == r["n"] else f"; {r['best_n']} of {r['n']} seeds)"
        row = [name]
        if paper_columns:
            row.append(PENDING if r["paper"] is None else f"{r['paper']:.2f}")
        if reference_columns:
            row.append(PENDING if r["reference"] is None else f"{r['reference']:.2f}")
        row += [ours, seeds, epochs]
        if paper_columns:
            row.append(PENDING if r["difference"] is None else f"{r['difference']:+.2f}")
        if reference_columns:
            gap = (
                None if r["reference"] is None or r["mean"] is None else r["mean"] - r["reference"]
            )
            row.append(PENDING if gap is None else f"{gap:+.2f}")
        for index in range(len(peers)):
            row += _peer_cells(r, index, number)
        row.append(ci)
        if paper_columns:
            row.append(_p_text(r["p"]))
        if selected_column:
            picked = PENDING
            if r["selected"] is not None:
                picked = f"{number(r['selected'])} ({_epochs_text(r['selected_epochs'])}"
                picked += ")" if r["selected_n"] == r["n"] else f"; {r['selected_n']} of {r['n']})"
            row.append(picked)
        row += [best, PENDING if r["train"] is None else number(r["train"])]
        if paper_columns:
            row.append(verdict_text(r, _page_link))
        rows.append(tuple(row))
    numeric = tuple(h not in ("cell", "verdict") for h in header)
    return Table(tuple(header), tuple(rows), numeric)


def _peer_cells(r: Mapping[str, Any], index: int, number: Callable[[float], str]) -> list[str]:
    """A peer's value for a row (mean ± std over its seeds, the count where it has fewer than
    ours) and ours − the peer's: "—" where its runs are pending, "n/a" where it lacks the rule."""
    if "peers" not in r:  # a baseline row
        return [PENDING, PENDING]
    stats = r["peers"][index]["stats"]
    if stats is None:
        return ["n/a", "n/a"]
    if not stats["n"]:
        return [PENDING, PENDING]
    text = number(stats["mean"])
    if stats["std"] is not None:
        text += f" ± {number(stats['std'])}"
    if stats["n"] < r["n"]:
        text += f" ({stats['n']} of {r['n']} seeds)"
    gap = PENDING if r["mean"] is None else f"{r['mean'] - stats['mean']:+.2f}"
    return [text, gap]


def metric_sentence(experiment: Experiment) -> str:
    """What the table's numbers are, in one paragraph."""
    split = "validation split" if experiment.metric == "validation_error" else "test set"
    best = (
        "Best epoch: each seed's lowest value over its per-epoch history (chosen on the "
        f"{split} it reports, so optimistic), averaged over the seeds that have a history."
    )
    if is_autoencoder(experiment):
        return (
            "Numbers: test reconstruction error, the mean squared error per pixel between the "
            "sigmoid output and the input (pixels in [0, 1]), after the last epoch; mean ± "
            "sample standard deviation over seeds, 95% CI: Student's t interval of the mean "
            f"over seeds. {best} The paper gives no numbers for this experiment, so the table "
            "shows ours only."
        )
    what = {"validation_error": "validation error (%)"}.get(experiment.metric, "test error (%)")
    text = (
        f"Numbers: {what} after the last epoch; ours is the mean ± sample standard "
        "deviation over seeds; 95% CI: Student's t interval of the mean over seeds. "
    )
    if experiment.reference:
        text += (
            f"Reference: {experiment.reference['source']}; − reference = ours − reference "
            "(another protocol: a comparison, not a verdict). "
        )
    if experiment.paper:
        text += (
            "Difference = ours − paper; p: two-sided one-sample t-test of the seeds against "
            "the published value (three seeds or more). "
            f"Verdict: *within {TOLERANCE:.2f}* when the mean is at most {TOLERANCE:.2f} points "
            "from the paper; *explained by* a reading of the protocol when that one change, "
            "judged on every cell it reads, brings more of them within "
            f"{TOLERANCE:.2f} than the paper's protocol does and this cell among them; "
            "*unexplained* otherwise. "
        )
    if experiment.base.train.keep_best:
        text += (
            "Validation-selected epoch: each seed's value at the epoch of its lowest "
            "validation error (the test set plays no part in the choice), averaged over seeds. "
        )
    return text + best
