"""The "beyond the paper" page: tuned configurations beside the paper's protocol.

Its inputs are what ``gfalign tune`` leaves: each study's ``summary.json`` (the search: trial
counts, their times, the best trial) and ``final.json`` (the best trial trained on several
seeds, the test set measured once per run), and the final runs themselves, which the results
store holds under the experiment ``tune:<study>``. The page gives

- the searches: trials by state, compute, the best validation error and its values;
- the final runs: test error mean ± std over seeds with a t-interval, beside the same network
  and rule under the paper's protocol (our runs of exp1, exp2, baselines or fashion) and the
  published references (the paper's value where it has one, and the numbers each study file's
  ``[expected]`` table sets beside its runs);
- each tuned rule's gap to tuned bp on the same dataset, with a Welch 95% interval;
- where one search's best was trained for several lengths, the length the validation error
  prefers; a goal a study file declares is judged on the runs of its rule's family
  (``gfalign.rule_families``) chosen on validation, never on the best test error;
- the final runs' validation error per epoch.

Nothing is typed in: a study without final runs is listed as searched, one without a summary
as not searched yet, and the goals and published numbers are read from the study files
(``read_expected``). ``welch`` (the gap's interval) lives in ``gfalign.report.tables``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gfalign.experiments import cell
from gfalign.experiments import network as network_of
from gfalign.report.facts import Fact
from gfalign.report.provenance import duration, total_seconds
from gfalign.report.render import Block, Bullets, Heading, Image, Paragraph, Table
from gfalign.report.rows import config_of, count, series
from gfalign.report.tables import best_epoch, describe, welch
from gfalign.rule_families import rule_family
from gfalign.tune import Expected, Goal

__all__ = ["PAGE", "beyond_blocks", "read_expected", "read_studies", "welch"]

PAGE = "beyond"
PREFIX = "tune:"  # gfalign.tune.EXPERIMENT_PREFIX
# The experiments whose runs are the paper's protocol for a tuned study's network and rule.
_PROTOCOL_EXPERIMENTS = ("exp1", "exp2", "baselines", "fashion")


def read_studies(directory: str | Path) -> dict[str, dict[str, Any]]:
    """Every study's ``summary.json`` and ``final.json`` under ``directory`` (its
    ``*.tune/`` folders, or folders named after the studies), by study name. A file that does
    not parse is skipped and named in the study's ``problems``."""
    out: dict[str, dict[str, Any]] = {}
    root = Path(directory)
    if not root.is_dir():
        return out
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        found: dict[str, Any] = {"problems": []}
        for name in ("summary", "final"):
            path = folder / f"{name}.json"
            if not path.is_file():
                continue
            try:
                found[name] = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                found["problems"].append(f"{path}: {error}")
        study = (found.get("summary") or found.get("final") or {}).get("study")
        if study:
            found["directory"] = str(folder)
            out[str(study)] = found
    return out


def read_expected(directory: str | Path) -> tuple[dict[str, Expected], list[str]]:
    """Every study file's ``[expected]`` table under ``directory`` (its ``*.toml``), by study
    name, and the files that could not be read (named, with why)."""
    from gfalign.rules import ConfigError
    from gfalign.tune import load

    out: dict[str, Expected] = {}
    problems = []
    root = Path(directory)
    for path in sorted(root.glob("*.toml")) if root.is_dir() else ():
        try:
            study = load(path)
        except (ConfigError, OSError, ValueError) as error:
            problems.append(f"{path}: {error}")
            continue
        out[study.name] = study.expected
    return out, problems


def _finished_errors(rows: Iterable[Mapping[str, Any]]) -> list[float]:
    return [
        float(r["final"]["test_error"])
        for r in rows
        if r["status"] == "finished" and isinstance(r["final"].get("test_error"), (int, float))
    ]


def _protocol_rows(store, config) -> list[Mapping[str, Any]]:
    """Our runs of the same dataset, network and rule under the paper's protocol."""
    out = []
    for name in _PROTOCOL_EXPERIMENTS:
        for row in store.list(name):
            other = config_of(row)
            if (
                other.dataset == config.dataset
                and other.hidden == config.hidden
                and other.activation == config.activation
                and other.model == config.model
                and other.rule_name == config.rule_name
                and other.feedback == "uniform"
                and other.train.epochs == 100
                and other.train_subset is None
            ):
                out.append(row)
    return out


def _paper_value(config) -> float | None:
    from gfalign.experiments import load

    if config.dataset != "mnist":
        return None
    for name in ("exp1", "exp2"):
        value = load(name).paper.get(cell(config))
        if value is not None:
            return value
    return None


def _stats_text(values: Sequence[float]) -> tuple[str, str]:
    if not values:
        return "—", "—"
    s = describe(values)
    ours = f"{s.mean:.2f}" + (f" ± {s.std:.2f}" if s.n > 1 else "")
    ci = "—" if s.ci is None else f"{s.ci[0]:.2f}–{s.ci[1]:.2f}"
    return f"{ours} ({count(s.n, 'seed')})", ci


def beyond_facts(
    store, studies: Mapping[str, Mapping[str, Any]], expected: Mapping[str, Expected] | None = None
) -> list[Fact]:
    """Every number the page prints, as facts (``gfalign.report.facts``): each search's best
    validation error and values, each final's statistics, gaps, and the goal's and published
    numbers the study files expect (``expected``; default: those of ``tune/`` here)."""
    if expected is None:
        expected = read_expected(Path("tune"))[0] if Path("tune").is_dir() else {}
    out: list[Fact] = []
    beyond_blocks(store, studies, None, expected, out)
    return out


def _stats_facts(subject: str, values: Sequence[float], out: list[Fact] | None) -> None:
    if out is None or not values:
        return
    s = describe(values)
    out += [Fact(PAGE, subject, "mean", s.mean), Fact(PAGE, subject, "std", s.std)]
    if s.ci is not None:
        out += [
            Fact(PAGE, subject, "95% CI low", s.ci[0]),
            Fact(PAGE, subject, "95% CI high", s.ci[1]),
        ]


def beyond_blocks(
    store,
    studies: Mapping[str, Mapping[str, Any]],
    figures: Path | None = None,
    expected: Mapping[str, Expected] | None = None,
    facts: list[Fact] | None = None,
) -> list[Block]:
    """The page's blocks from the store's ``tune:*`` runs, the studies' summaries and what
    their files expect (``read_expected``).

    ``facts``: a list that receives every number the blocks print (``beyond_facts``).
    """
    expected = expected or {}
    if facts is not None:
        for entry in expected.values():
            for published in entry.published:
                facts.append(Fact(PAGE, published.source, "published", published.value))
            if entry.goal is not None:
                facts.append(Fact(PAGE, "goal", "test", entry.goal.error))
    rows: dict[str, list[Mapping[str, Any]]] = {}
    for row in store.list():
        if (row.get("experiment") or "").startswith(PREFIX):
            rows.setdefault(row["experiment"][len(PREFIX) :], []).append(row)
    names = sorted(set(studies) | set(rows))
    blocks: list[Block] = [
        Heading(1, "Beyond the paper: tuned on validation", PAGE),
        Paragraph("[All experiments](README.md)"),
        Paragraph(
            "Each rule searched with `gfalign tune` over the same space on a validation split "
            "held out of the training set (the test set never seen during a search), then its "
            "best configuration trained on several seeds, the test set measured once per run. "
            "The final runs keep the validation split: the epoch they report is chosen on it "
            "(`keep_best`), which a retraining on all 60,000 examples could not do without "
            "fixing the epoch count blind. A study's trials are drawn one after another by "
            "Optuna's TPE sampler whatever their target number, so a longer search only adds "
            "trials after the shorter one's: the best trial's number says how much of a search "
            "its result needed. A study whose final runs train another study's best trial "
            'again, longer (`search = "other.toml"` in its file), has no search of its own: '
            "its row in the final runs names the epochs it trained, and each rule's gap to bp "
            "compares runs of the same length. Where one search's best was trained for more "
            "than one length, the length kept is the one with the lower validation error, and "
            "the goal is judged on the general-rule runs chosen so, never on the lowest test "
            "error."
        ),
    ]
    if not names:
        blocks.append(
            Paragraph(
                "No study has run yet: `gfalign tune tune/mnist-2x800-s1.toml --jobs 2`, then "
                "`--final`, fills this page."
            )
        )
        return blocks
    search_rows, final_rows, notes = [], [], []
    searched_seconds, final_seconds = 0.0, 0.0
    finals: list[Final] = []
    curves: dict[str, list[Any]] = {}
    for name in names:
        found = studies.get(name, {})
        summary, final = found.get("summary"), found.get("final")
        notes += found.get("problems", [])
        study_rows = rows.get(name, [])
        config = config_of(study_rows[0]) if study_rows else None
        if summary:
            states = ", ".join(f"{n} {s}" for s, n in sorted(summary.get("states", {}).items()))
            trials = summary.get("trials", [])
            timed = [t["seconds"] for t in trials if isinstance(t.get("seconds"), (int, float))]
            searched_seconds += sum(timed)
            cost = duration(sum(timed)) if timed else "not recorded"
            if facts is not None and timed:
                facts.append(_duration_fact(name, "search compute", sum(timed)))
            killed = sum(1 for t in trials if t.get("state") == "fail" and t.get("seconds") is None)
            if timed and killed:
                cost += f" (and {killed} killed trials, untimed)"
            best = summary.get("best") or {}
            values = ", ".join(f"{k}={_short(v)}" for k, v in (best.get("params") or {}).items())
            value = best.get("validation_error")
            if facts is not None:
                if isinstance(value, (int, float)):
                    facts.append(Fact(PAGE, name, "best validation error", float(value)))
                for key, given in (best.get("params") or {}).items():
                    if isinstance(given, float):
                        facts.append(Fact(PAGE, name, key, given, -3))
            search_rows.append(
                (
                    name,
                    f"{summary.get('counted', '?')} of {summary.get('target_trials', '?')}",
                    states or "—",
                    cost,
                    "—" if value is None else f"{value:.2f}",
                    "—" if best.get("number") is None else str(best["number"]),
                    str(best.get("best_epoch") or best.get("epochs") or "—"),
                    values or "—",
                )
            )
        elif not (final or {}).get("search"):  # a study training another's best has no search
            search_rows.append((name, "not searched yet", "—", "—", "—", "—", "—", "—"))
        errors = _finished_errors(study_rows)
        if config is not None:
            finished = [r for r in study_rows if r["status"] == "finished"]
            validation = _best_validation(finished)
            ours, ci = _stats_text(errors)
            protocol = _finished_errors(_protocol_rows(store, config))
            baseline, _ = _stats_text(protocol)
            paper = _paper_value(config)
            _stats_facts(name, errors, facts)
            _stats_facts(f"{name} (paper's protocol)", protocol, facts)
            if facts is not None and validation is not None:
                facts.append(Fact(PAGE, name, "validation", validation))
            if facts is not None and paper is not None:
                facts.append(Fact(PAGE, name, "paper", paper))
            spent = total_seconds(finished)
            if facts is not None and spent is not None:
                facts.append(_duration_fact(name, "final compute", spent))
            final_seconds += spent or 0.0
            final_rows.append(
                (
                    name,
                    config.dataset,
                    cell(config),
                    str(config.train.epochs),
                    ours,
                    ci,
                    "—" if validation is None else f"{validation:.2f}",
                    "—" if spent is None else duration(spent),
                    baseline,
                    "—" if paper is None else f"{paper:.2f}",
                )
            )
            finals.append(
                Final(
                    study=name,
                    search=(final or {}).get("search") or name,
                    dataset=config.dataset,
                    network=network_of(config),
                    epochs=config.train.epochs,
                    rule=config.rule_name,
                    errors=tuple(errors),
                    validation=validation,
                    goal=expected.get(name, Expected()).goal,
                )
            )
            curves[name] = [series(r.get("history") or (), "validation_error") for r in finished]
        elif final:
            notes.append(f"{name}: final.json exists but the store has no `tune:{name}` runs.")
    blocks += [
        Heading(2, "Searches"),
        Table(
            (
                "study",
                "trials counted",
                "states",
                "compute",
                "best validation error",
                "its trial",
                "its epoch",
                "best values",
            ),
            tuple(search_rows),
            (False, True, False, True, True, True, True, False),
        ),
    ]
    if searched_seconds or final_seconds:
        if facts is not None:
            facts += [
                _duration_fact("all", "search compute", searched_seconds),
                _duration_fact("all", "final compute", final_seconds),
                _duration_fact("all", "compute", searched_seconds + final_seconds),
            ]
        blocks.append(
            Paragraph(
                f"Compute, all studies: {duration(searched_seconds)} of timed search trials "
                f"and {duration(final_seconds)} of final-run training, "
                f"{duration(searched_seconds + final_seconds)} in all (killed trials untimed; "
                "a stacked final run counts its share of the stack)."
            )
        )
    blocks.append(Heading(2, "Final runs"))
    if final_rows:
        blocks += [
            Paragraph(
                "Test error (%) of the best configuration, mean ± sample std over seeds, 95% "
                "CI: Student's t interval. Compute: the final runs' training time, summed. "
                "Paper's protocol: our runs of the same network and rule under the paper's "
                "protocol (100 epochs of plain SGD, lr 0.001, batch 32, "
                "summed loss; experiments exp1, exp2, baselines, fashion). Validation: each "
                "run's best validation error (the epoch it reports), mean over seeds. "
                "Published: the paper's value." + _expectations(finals, expected)
            ),
            Table(
                (
                    "study",
                    "dataset",
                    "cell",
                    "epochs",
                    "tuned (mean ± std)",
                    "95% CI",
                    "validation",
                    "compute",
                    "paper's protocol (ours)",
                    "published",
                ),
                tuple(final_rows),
                (False, False, False, True, True, True, True, True, True, True),
            ),
        ]
        lengths = _lengths(finals)
        if lengths:
            blocks += [Heading(2, "Training length, chosen on validation"), Bullets(lengths)]
        gaps = _gaps(finals, facts)
        if gaps:
            blocks += [Heading(2, "Gap to tuned backprop"), Bullets(tuple(gaps))]
        goal = _goal(finals)
        if goal:
            blocks.append(Paragraph(goal))
    else:
        blocks.append(Paragraph("No final runs yet: `gfalign tune STUDY --final` makes them."))
    if figures is not None and any(curves.values()):
        image = _curves(curves, figures)
        if image is not None:
            blocks += [Heading(2, "Curves"), image]
    if notes:
        blocks.append(Bullets(tuple(notes)))
    return blocks


def _expectations(finals: Sequence[Final], expected: Mapping[str, Expected]) -> str:
    """What the study files of the final runs set beside them: each published number once,
    then each goal once, as one sentence (empty when none does)."""
    parts: list[str] = []
    for entry in finals:
        for published in expected.get(entry.study, Expected()).published:
            what = f" for {published.what}" if published.what else ""
            parts.append(f"{published.source} reports {published.value:.2f}%{what}")
    for entry in finals:
        if entry.goal is not None:
            family = rule_family(entry.rule)
            whose = f"the {family} rule" if family else entry.rule
            parts.append(f"the goal set for {whose} is {entry.goal.error:.2f}% or below")
    parts = list(dict.fromkeys(parts))
    if not parts:
        return ""
    text = "; ".join(parts)
    return " " + text[0].upper() + text[1:] + "."


def _duration_fact(subject: str, quantity: str, seconds: float) -> Fact:
    """A duration as the page prints it (``duration``: ``"53.0 min"``, ``"1.2 h"``)."""
    return Fact(PAGE, subject, quantity, float(duration(seconds).split()[0]), 1)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Final:
    """One study's final runs: the search whose best they train, their cell and length, their
    test errors, the mean of their best validation errors, and the goal its file declares."""

    study: str
    search: str
    dataset: str
    network: str
    epochs: int
    rule: str
    errors: tuple[float, ...]
    validation: float | None
    goal: Goal | None = None


def _best_validation(rows: Iterable[Mapping[str, Any]]) -> float | None:
    """The mean over runs of each run's lowest validation error (the epoch ``keep_best``
    reports), or None when no run recorded one."""
    best = [best_epoch(r.get("history") or (), "validation_error") for r in rows]
    values = [value for _, value in filter(None, best)]
    return statistics.fmean(values) if values else None


def _by_search(finals: Sequence[Final]) -> dict[str, list[Final]]:
    """The final runs with test errors, grouped by the search whose best they train."""
    out: dict[str, list[Final]] = {}
    for entry in finals:
        if entry.errors:
            out.setdefault(entry.search, []).append(entry)
    return out


def _pick(group: Sequence[Final]) -> Final:
    """Of one search's final runs, the length with the lowest mean best validation error (the
    shorter on a tie): what a choice blind to the test set takes."""
    rated = [e for e in group if e.validation is not None]
    return min(rated, key=lambda e: (e.validation, e.epochs)) if rated else group[0]


def _lengths(finals: Sequence[Final]) -> tuple[str, ...]:
    """A line for each search whose best was trained for more than one length."""
    out = []
    for search, group in sorted(_by_search(finals).items()):
        rated = [e for e in group if e.validation is not None]
        if len({e.epochs for e in rated}) < 2:
            continue
        best = _pick(rated)
        others = ", ".join(
            f"{e.validation:.2f} at {e.epochs}"
            for e in sorted(rated, key=lambda e: e.epochs)
            if e is not best
        )
        out.append(
            f"{search} ({best.rule}): the validation error prefers {best.epochs} epochs "
            f"({best.study}, mean best validation error {best.validation:.2f}, against "
            f"{others}); its test error {statistics.fmean(best.errors):.2f}%"
        )
    return tuple(out)


def _gaps(finals: Sequence[Final], facts: list[Fact] | None = None) -> list[str]:
    """Each rule's gap to bp trained as long on the same dataset and network, each study
    named (two searches of one rule each get their line)."""
    out = []
    by_cell: dict[tuple[str, str, int], list[Final]] = {}
    for entry in finals:
        if entry.errors:
            by_cell.setdefault((entry.dataset, entry.network, entry.epochs), []).append(entry)
    for (dataset, network, epochs), group in by_cell.items():
        for bp in (e for e in group if e.rule == "bp"):
            for entry in (e for e in group if e.rule != "bp"):
                difference, ci = welch(list(entry.errors), list(bp.errors))
                interval = "" if ci is None else f" (95% CI {ci[0]:+.2f} to {ci[1]:+.2f})"
                if facts is not None:
                    subject = f"{entry.study} − {bp.study}"
                    facts.append(Fact(PAGE, subject, "difference", difference))
                    if ci is not None:
                        facts += [
                            Fact(PAGE, subject, "low", ci[0]),
                            Fact(PAGE, subject, "high", ci[1]),
                        ]
                out.append(
                    f"{dataset} {network} {entry.rule} − bp, {epochs} epochs: "
                    f"{difference:+.2f} points{interval}, "
                    f"{count(len(entry.errors), 'seed')} against {len(bp.errors)} "
                    f"({entry.study} − {bp.study})"
                )
    return out


def _goal(finals: Sequence[Final]) -> str:
    """Each declared goal's verdict, judged on the runs of the declaring studies' rule family
    chosen on validation: of each search's lengths the one validation prefers, then the lowest
    mean best validation error among the family's runs that declare that goal."""
    groups: dict[tuple[Goal, str | None, str], list[Final]] = {}
    for entry in (_pick(group) for group in _by_search(finals).values()):
        if entry.goal is not None:
            key = (entry.goal, rule_family(entry.rule), entry.dataset)
            groups.setdefault(key, []).append(entry)
    out = []
    for (goal, family, dataset), group in groups.items():
        best = min(group, key=lambda e: math.inf if e.validation is None else e.validation)
        stats = describe(best.errors)
        mean = stats.mean
        verdict = (
            "reached"
            if mean <= goal.error + 1e-9
            else f"not reached ({mean - goal.error:+.2f} points)"
        )
        if stats.ci is not None and stats.ci[0] <= goal.error + 1e-9 < stats.ci[1]:
            verdict += f" by the mean, not by its 95% interval, which reaches {stats.ci[1]:.2f}"
        interval = "" if stats.ci is None else f", 95% CI {stats.ci[0]:.2f}–{stats.ci[1]:.2f}"
        on = (
            "" if best.validation is None else f", mean best validation error {best.validation:.2f}"
        )
        whose = f"{family}-rule" if family else best.rule
        out.append(
            f"Goal, a {whose} network at or below {goal.error:.2f}% on {goal.on or dataset}: "
            f"{verdict}. The {whose} runs chosen on validation are {best.rule} trained "
            f"{best.epochs} epochs ({best.study}{on}): {mean:.2f}% test error over "
            f"{count(len(best.errors), 'seed')}{interval}."
        )
        others = [e for e in _by_search(finals)[best.search] if e.epochs != best.epochs]
        for other in sorted(others, key=lambda e: e.epochs):
            missed = statistics.fmean(other.errors)
            outcome = "reaches the goal" if missed <= goal.error + 1e-9 else "misses the goal"
            out.append(
                f"The same trial trained {other.epochs} epochs ({other.study}) gives "
                f"{missed:.2f}% and {outcome}: the goal is read at the length the validation "
                "error prefers, after both were trained."
            )
    return " ".join(out)


def _curves(curves: Mapping[str, list[Any]], figures: Path) -> Image | None:
    from gfalign import plots

    panels = []
    for name, members in curves.items():
        lines = tuple((tuple(e), tuple(v)) for e, v in members if v)
        if lines:
            panels.append(
                plots.Panel(name, (plots.Series(name, curves=lines),), "validation error (%)")
            )
    if not panels:
        return None
    path = plots.plot_panels(panels, figures / f"{PAGE}-curves.png", title="Final runs")
    return Image(
        path,
        "Final runs of each study: validation error (%) per epoch, mean over seeds, band from "
        "min to max, log scale.",
    )
