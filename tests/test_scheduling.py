"""``tests/scheduling.py``'s units: every file that uses a session-scoped server fixture is in that fixture's unit,
so under ``make test`` the server starts on one worker only."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.scheduling import SHARED_SERVERS, UNITS, unit


@pytest.fixture(scope="module")
def server_fixtures(request) -> dict[str, set[str]]:
    """session-scoped server fixtures (those defined under tests/server that hand their server to ``stopping``) -> the
    files (relative paths) whose tests use them, read from this session's collection (every xdist worker collects the
    whole suite)."""
    root = Path(request.config.rootpath)
    used: dict[str, set[str]] = {}
    for item in request.session.items:
        for name in getattr(item, "fixturenames", ()):
            for definition in item._fixtureinfo.name2fixturedefs.get(name, ()):
                if (definition.scope == "session" and definition.baseid.startswith("tests/server")
                        and "stopping" in definition.argnames):
                    used.setdefault(name, set()).add(item.path.relative_to(root).as_posix())
    return used


def test_every_user_of_a_shared_server_runs_in_its_unit(server_fixtures, request):
    if not server_fixtures:
        pytest.skip("skipped: no test using a server fixture was collected in this session")
    assert set(server_fixtures) <= set(SHARED_SERVERS), "tests/scheduling.py must name every shared server fixture"
    for fixture, files in server_fixtures.items():
        assert {unit(f) for f in files} == {SHARED_SERVERS[fixture]}, (fixture, sorted(files))
    # no stale entry: each listed file exists and, when collected here, uses a shared server
    root = Path(request.config.rootpath)
    collected = {item.path.relative_to(root).as_posix() for item in request.session.items}
    users = {f for files in server_fixtures.values() for f in files}
    assert all((root / f).is_file() for f in UNITS), [f for f in UNITS if not (root / f).is_file()]
    assert not (set(UNITS) & collected) - users, sorted((set(UNITS) & collected) - users)


@pytest.mark.parametrize("nodeid, expected", [
    ("tests/server/test_api.py::test_x[a-b]", "tests/server/served"),
    ("tests/server/test_identity.py::test_y", "tests/server/served_cached"),
    ("tests/kernels/test_compile.py::test_z", "tests/kernels/test_compile.py"),
])
def test_a_test_outside_the_units_is_scheduled_by_its_file(nodeid, expected):
    assert unit(nodeid) == expected
