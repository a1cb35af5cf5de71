"""What the data validation pass found: one list of problems per prepared dataset, shown once.

A dataset builder that reads a user's folder (COCO detection, COCO keypoints) checks every entry
while it prepares the data and records each problem as a `Problem`: the file, the image and
annotation ids, what is wrong and what was done with it (dropped, skipped, clipped, taken from
the segmentation, ...). `research.data.pipeline.prepare` writes the list next to the prepared data
(`<tfds data dir>/validation_report.json`), so a run that reuses prepared data still sees what it
was built from. Before a run starts, `research.modes.run` collects the task's problems
(`Task.data_problems()`), logs them as one list and writes `<workdir>/data_problems.json` (also
when there are none: the file then says so).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable

REPORT_FILE = "validation_report.json"
WORKDIR_FILE = "data_problems.json"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem of one entry of a dataset folder.

    Attributes:
      file: the file it is in (annotation json or image path).
      what: what is wrong ("annotation without a valid image_id", "cannot decode image", ...).
      action: what was done ("dropped", "skipped", "clipped to the image", "kept", ...).
      image_id / annotation_id: the entry's ids in the annotation file, when it has them.
    """

    file: str
    what: str
    action: str
    image_id: Any = None
    annotation_id: Any = None

    def line(self) -> str:
        """`file [image i, annotation a]: what; action` (one line)."""
        ids = ", ".join(f"{k} {v}" for k, v in (("image", self.image_id), ("annotation", self.annotation_id))
                        if v is not None)
        return f"{self.file}{f' [{ids}]' if ids else ''}: {self.what}; {self.action}"

    def to_json(self) -> dict:
        return {k: (v if isinstance(v, (int, float, str, type(None))) else str(v))
                for k, v in dataclasses.asdict(self).items()}


class Collector:
    """Problems found while preparing one dataset, in the order found."""

    def __init__(self):
        self.problems: list[Problem] = []

    def add(self, file, what: str, action: str, image_id=None, annotation_id=None) -> Problem:
        p = Problem(os.fspath(file), what, action, image_id, annotation_id)
        self.problems.append(p)
        return p

    def extend(self, problems: Iterable[Problem]) -> None:
        self.problems.extend(problems)


def write(problems: Iterable[Problem], path: str) -> str:
    """Writes the problems as json ({"count", "problems": [...]}) to `path` (via a temp file)."""
    problems = list(problems)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"count": len(problems), "problems": [p.to_json() for p in problems]}, f, indent=1)
    os.replace(tmp, path)
    return path


def read(data_dir: str) -> list[Problem]:
    """The problems recorded for the prepared dataset in `data_dir` ([] when none were recorded)."""
    path = os.path.join(os.fspath(data_dir), REPORT_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [Problem(**p) for p in json.load(f)["problems"]]


def publish(problems: Iterable[Problem], workdir: str, what: str = "data") -> str:
    """Logs the problems as one list (a warning when there are any) and writes them to
    `<workdir>/data_problems.json`; returns that path."""
    from absl import logging
    problems = list(problems)
    os.makedirs(workdir, exist_ok=True)
    path = write(problems, os.path.join(workdir, WORKDIR_FILE))
    if problems:
        lines = "\n".join(f"  {i + 1}. {p.line()}" for i, p in enumerate(problems))
        logging.warning("%s validation: %d problem(s) found before the run (also in %s):\n%s",
                        what, len(problems), path, lines)
    else:
        logging.info("%s validation: no problems found (%s)", what, path)
    return path
