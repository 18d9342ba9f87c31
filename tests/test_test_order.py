"""The order in which the xdist workers take the test files (tests/schedule.py)."""

from __future__ import annotations

import json

from tests.schedule import DurationRecorder, group_of, order_groups


def test_groups_are_files_and_the_ray_files_share_one():
    assert group_of("tests/cli/test_bench.py::test_x[a-b]") == "tests/cli/test_bench.py"
    assert group_of("tests/training/test_cv_ray.py::test_y") == "ray"
    assert group_of("tests/test_promises.py::test_z") == "ray"


def test_longest_first_and_unmeasured_files_estimated_from_their_test_count():
    counts = {"a.py": 10, "b.py": 1, "c.py": 4, "new.py": 3}
    durations = {"a.py": 20.0, "b.py": 60.0, "c.py": 8.0}  # 2 s, 60 s, 2 s per test
    # new.py: 3 tests x the median 2 s per test = 6 s, after c.py's 8 s
    assert order_groups(counts, durations) == ["b.py", "a.py", "c.py", "new.py"]
    # nothing measured: by number of tests (xdist's own order), ties as collected
    assert order_groups({"x": 1, "y": 5, "z": 1}, {}) == ["y", "x", "z"]


def test_recorder_sums_a_files_reports_and_keeps_the_files_it_did_not_run(tmp_path):
    path = tmp_path / "durations.json"
    path.write_text(json.dumps({"tests/old.py": 5.0, "tests/a.py": 1.0}))

    class Report:
        def __init__(self, nodeid, duration):
            self.nodeid, self.duration = nodeid, duration

    rec = DurationRecorder(path)
    for nodeid, seconds in [("tests/a.py::t1", 1.25), ("tests/a.py::t2", 2.0)]:
        rec.pytest_runtest_logreport(Report(nodeid, seconds))
    rec.pytest_sessionfinish(None, 0)
    assert json.loads(path.read_text()) == {"tests/a.py": 3.2, "tests/old.py": 5.0}
