"""How ``make test`` hands test files to its two xdist workers: by file, except that the files sharing a
session-scoped server run on one worker, so each of those servers starts once per run instead of once per worker
that happens to need it (a tiny server's start costs ~30 CPU-s: tritonserver, six python stubs, their imports).

xdist's own ``--dist loadgroup`` cannot do this with pytest 9: it renames each grouped test through
``item._nodeid``, which pytest no longer reads, so the groups are ignored. The grouping here is a scheduler
(``pytest_xdist_make_scheduler`` in ``tests/conftest.py``) that only chooses the unit a test file belongs to.
``tests/test_scheduling.py`` checks that every file using a shared server fixture is in that fixture's unit.
"""
from __future__ import annotations

# session-scoped server fixture -> the unit of the files that use it (tests/server/conftest.py defines the fixtures)
SHARED_SERVERS = {
    "served": "tests/server/served",
    "served_cached": "tests/server/served_cached",
    "served_uncached": "tests/server/served_cached",  # test_identity compares the two servers side by side
    "served_t2v": "tests/server/served_t2v",
}
# each file that uses a shared server fixture -> its unit (one per file: a file using two fixtures names one unit)
UNITS = {
    "tests/server/test_api.py": SHARED_SERVERS["served"],
    "tests/server/test_api_restart.py": SHARED_SERVERS["served"],
    "tests/server/test_bad_files.py": SHARED_SERVERS["served"],
    "tests/server/test_cli.py": SHARED_SERVERS["served"],
    "tests/server/test_load.py": SHARED_SERVERS["served"],
    "tests/server/test_parallel.py": SHARED_SERVERS["served"],
    "tests/server/test_requests.py": SHARED_SERVERS["served"],
    "tests/server/test_denoiser_model.py": SHARED_SERVERS["served_cached"],
    "tests/server/test_identity.py": SHARED_SERVERS["served_cached"],
    "tests/server/test_seed_modes.py": SHARED_SERVERS["served_t2v"],
    "tests/server/test_wan_family.py": SHARED_SERVERS["served_t2v"],
}


def unit(nodeid: str) -> str:
    """The work unit of a test: its file's shared-server unit, else its file (xdist's ``loadfile``)."""
    path = nodeid.split("::", 1)[0]
    return UNITS.get(path, path)


def scheduler(config, log):
    """``loadfile`` scheduling over ``unit``: xdist's scope scheduler, which groups tests by ``_split_scope``."""
    from xdist.scheduler import LoadScopeScheduling

    class SharedServerScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit(nodeid)

    return SharedServerScheduling(config, log)
