"""The learning benchmark's reports a server can show its admins.

`ratchet eval zsre` writes each run into a folder `zsre-*` of the reports directory
(settings.reports_dir): results.json, report.md and PNG plots. Only what the listing names can be
read: a report is a folder found by the listing, a plot one of PLOTS inside it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ratchet.reports")

PLOTS = ("accuracy_per_cycle.png", "first_cycle_over_time.png", "neighbourhood.png")  # what evals/zsre.py draws
PATTERN = "zsre-*"  # the folders `ratchet eval zsre` writes


class UnknownReport(LookupError):
    """No report (or no plot of it) of that name in the listing."""


@dataclass(frozen=True)
class LearningReport:
    """One run of the learning benchmark, as its results.json and report.md describe it."""

    name: str  # its folder's name
    title: str  # report.md's first heading
    split: str | None  # the zsRE records it ran on: tune or report (older runs do not say)
    n: int | None  # records corrected
    cycle_every: int | None  # corrections between cycles
    engine: str | None
    tiers: str | None  # all, or memory (no consolidation)
    seconds: float | None  # wall time of the run
    created_at: str  # when results.json was written (UTC)
    plots: tuple[str, ...]  # the PLOTS this run has


class LearningReports:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def list(self) -> list[LearningReport]:
        """Every readable report in the folder, newest first; a missing folder has none."""
        if not self.folder.is_dir():
            return []
        found = []
        for results in self.folder.glob(f"{PATTERN}/results.json"):
            try:
                found.append(_report(results.parent))
            except (OSError, ValueError) as e:  # a run still writing, or a file that is not its JSON
                log.warning("skipping the report in %s: %s", results.parent, e)
        return sorted(found, key=lambda r: (r.created_at, r.name), reverse=True)

    def plot(self, name: str, plot: str) -> Path:
        """The file of one plot of one listed report (UnknownReport for anything else)."""
        for report in self.list():
            if report.name == name and plot in report.plots:
                return self.folder / report.name / plot
        raise UnknownReport(f"{name}/{plot}")


def _report(folder: Path) -> LearningReport:
    results = folder / "results.json"
    data = json.loads(results.read_text())
    if not isinstance(data, dict):
        raise ValueError("results.json is not an object")
    title = folder.name
    report_md = folder / "report.md"
    if report_md.is_file():
        first = report_md.read_text(errors="replace").lstrip().splitlines()[:1]
        if first and first[0].startswith("# "):
            title = first[0][2:].strip()
    written = dt.datetime.fromtimestamp(results.stat().st_mtime, dt.timezone.utc)
    return LearningReport(
        name=folder.name, title=title, split=data.get("split"), n=data.get("n"), cycle_every=data.get("cycle_every"),
        engine=data.get("engine"), tiers=data.get("tiers"), seconds=data.get("seconds"),
        created_at=written.isoformat(timespec="seconds"),
        plots=tuple(p for p in PLOTS if (folder / p).is_file()),
    )
