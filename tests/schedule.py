"""The order in which the two xdist workers take the test files: the longest first.

``scripts/test.sh`` runs ``pytest -n 2 --dist loadgroup --no-loadscope-reorder``: each file (the
three Ray files together) is one unit of work that a single worker runs, and a worker takes the
next unit from the queue when it is nearly done with its own. xdist's default queue puts the
files with the most tests first, so a file of one long test (the demo, the bench) could come
last and leave the other worker idle for a minute. Here the queue is sorted by each file's
measured seconds, longest first (the classic longest-processing-time rule), from
``tests/durations.json``; a file not in it is estimated from its number of tests.

``pytest --store-durations`` (any worker count) writes the seconds each file took in that run
(setup, call and teardown of its tests) into ``tests/durations.json``, keeping the files it did
not run. Only the order depends on it: every test runs whatever the file says.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from medseg.utils import atomic_write_text

DURATIONS = Path(__file__).with_name("durations.json")

#: Test files that start a local Ray instance: one worker runs them all, one after the other.
RAY_FILES = {"test_cv_ray.py", "test_predict_ray.py", "test_promises.py"}


def group_of(nodeid: str) -> str:
    """The unit of work a test belongs to: its file (relative to the repository, as in the
    test's node id), or ``"ray"`` for the files that start Ray."""
    path = nodeid.split("::", 1)[0]
    return "ray" if Path(path).name in RAY_FILES else path


def read_durations(path: Path = DURATIONS) -> dict[str, float]:
    """Seconds per group from a previous ``--store-durations`` run ({} when there is none)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in data.items() if isinstance(v, (int, float))}


def order_groups(counts: dict[str, int], durations: dict[str, float]) -> list[str]:
    """The groups, longest first: measured seconds, or for a group without a measurement its
    number of tests times the median seconds per test of the measured groups (1 s when nothing
    is measured). Ties keep the order of ``counts``."""
    per_test = [durations[g] / n for g, n in counts.items() if g in durations and n]
    typical = statistics.median(per_test) if per_test else 1.0

    def seconds(group: str) -> float:
        return durations.get(group, counts[group] * typical)

    return sorted(counts, key=lambda g: -seconds(g))


def ordered(items: list, groups: list[str]) -> list:
    """``items`` (each in the group at the same place of ``groups``) regrouped: every group's
    tests together, the longest group first (:func:`order_groups`), each group's tests in their
    collected order (module fixtures rely on it)."""
    by_group: dict[str, list] = defaultdict(list)
    for item, group in zip(items, groups, strict=True):
        by_group[group].append(item)
    counts = {g: len(v) for g, v in by_group.items()}
    return [item for g in order_groups(counts, read_durations()) for item in by_group[g]]


class DurationRecorder:
    """A pytest plugin (on the controlling process) that sums each group's test durations and
    writes them into ``tests/durations.json`` when the session ends."""

    def __init__(self, path: Path = DURATIONS):
        self.path = path
        self.seconds: dict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report) -> None:
        self.seconds[group_of(report.nodeid)] += report.duration

    def pytest_sessionfinish(self, session, exitstatus) -> None:
        if not self.seconds:
            return
        merged = {**read_durations(self.path), **{g: round(s, 1) for g, s in self.seconds.items()}}
        atomic_write_text(self.path, json.dumps(dict(sorted(merged.items())), indent=1) + "\n")
