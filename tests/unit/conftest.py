"""The quick tier's guard: nothing under tests/unit may start Ray. A unit test that uses the
session's `ray_cluster` fixture or carries the `ray` marker is a usage error at collection, and a
unit test that leaves Ray initialised in this process, where it was not before, fails."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    on_ray = [
        item.nodeid for item in items
        if UNIT in Path(str(item.path)).resolve().parents
        and ("ray_cluster" in getattr(item, "fixturenames", ()) or item.get_closest_marker("ray") is not None)
    ]
    if on_ray:
        raise pytest.UsageError("tests/unit must start no Ray; move these to tests/e2e: " + ", ".join(on_ray))


def ray_initialised() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture(autouse=True)
def no_ray_started():
    """Test by test: in a whole-suite run the e2e tests' cluster is up before or after these."""
    before = ray_initialised()
    yield
    assert before or not ray_initialised(), "a test under tests/unit started Ray in the pytest process"
