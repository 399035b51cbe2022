"""Shared makings of the report tests: synthetic store rows and a presets directory.

No tests here; the report's test files import these helpers.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from gfalign import experiments
from gfalign.report import studies as report_studies
from gfalign.store import Store

MACHINE = {
    "processor": "x86_64",
    "cpu_count": 2,
    "torch_threads": 2,
    "device": "cpu",
    "torch": "2.13.0",
    "python": "3.11.7",
    "gfalign": "0.1.0",
    "platform": "Linux",
}


def history(
    final: float,
    epochs: int = 5,
    angles: bool = False,
    train: float | None = None,
    metric: str = "test_error",
) -> list[dict]:
    """A falling ``metric`` curve ending at ``final`` (its lowest value, at the last epoch);
    with ``train``, a training error falling by 1 point an epoch to ``train``."""
    out = []
    for epoch in range(1, epochs + 1):
        record = {"epoch": epoch, metric: final + 2.0 * (epochs - epoch), "seconds": 1.0}
        if angles:
            record |= {"update_angle_1": 60.0 - epoch, "update_angle_2": 40.0 - epoch}
        if train is not None:
            record["train_error"] = train + 1.0 * (epochs - epoch)
        out.append(record)
    return out


def fill(
    store: Store,
    name: str,
    values: dict[str, list[float]],
    *,
    status: str = "finished",
    angles: bool = False,
    seconds: float = 1200.0,
    curves: bool = True,
    experiment=None,
    metric: str = "test_error",
    **overrides,
) -> None:
    """Rows for the cells of ``values``, one per seed (0, 1, ...), final ``metric`` as given.

    ``curves=False`` stores final metrics only, as a CSV import does; ``experiment``: the
    preset to expand (default ``experiments.load(name)``), its runs stored as ``name``'s.
    """
    experiment = experiment or experiments.load(name)
    for config in experiment.expand(seeds=5, **overrides):
        cell = experiment.cell(config)
        if cell in values and config.seed < len(values[cell]):
            records = history(values[cell][config.seed], angles=angles, metric=metric)
            store.upsert(
                config.key(),
                experiment=name,
                label=config.label(),
                config=config.to_data(),
                status=status,
                epochs_done=len(records),
                final=records[-1],
                history=records if curves else [],
                seconds=seconds,
                versions=MACHINE,
            )


def line(text: str, start: str) -> str:
    """The one line of ``text`` starting with ``start``."""
    lines = [row for row in text.splitlines() if row.startswith(start)]
    assert len(lines) == 1, (start, lines)
    return lines[0]


def presets(monkeypatch, directory: Path, extra: dict[str, str] | None = None) -> Path:
    """Point the report at a presets directory: the package's experiment presets (no study)
    and ``extra`` (name -> TOML text), so a test sees exactly the studies it writes."""
    directory.mkdir(parents=True, exist_ok=True)
    source = resources.files("gfalign.experiments").joinpath("presets")
    for name in experiments.EXPERIMENTS:
        with resources.as_file(source.joinpath(f"{name}.toml")) as path:
            shutil.copy(path, directory / f"{name}.toml")
    for name, text in (extra or {}).items():
        (directory / f"{name}.toml").write_text(text)
    monkeypatch.setattr(report_studies, "_presets", lambda: directory)
    return directory
