"""Suite-wide fixtures: the embedded tiny checkpoint, built once per session in a private cache."""
from __future__ import annotations

import os

import pytest

# Triton reads TRITON_INTERPRET when its library is first imported, and diffusers imports Triton, so the
# switch is set here, before any test module loads: the kernel tests then run interpreted in this process.
# Tests that compile for sm_90/sm_80 run in subprocesses with the variable removed.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests' models are tiny: one thread per process beats two fighting over the 2 cores with the servers and CLI
# processes the tests start (which inherit this); every process of a bit-identity comparison runs the same.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` (make test) keeps the files sharing a session-scoped server on one worker
    (``tests/scheduling.py``); any other mode is xdist's own."""
    if config.getvalue("dist") == "loadfile":
        from tests.scheduling import scheduler

        return scheduler(config, log)
    return None


def pytest_collection_modifyitems(config, items):
    """Every test under tests/server/ starts (or shares) a real tritonserver: marked ``server`` by its folder."""
    for item in items:
        if "server" in item.path.relative_to(config.rootpath).parts[1:2]:
            item.add_marker(pytest.mark.server)


@pytest.fixture(scope="session")
def tiny_cache(request, tmp_path_factory):
    """A cache root (``$MVGEN_CACHE``) holding the built tiny pipeline at ``<root>/tiny-v2``. The xdist workers of one
    run share it (under the run's base temp, above each worker's), so each embedded model is built once per run
    rather than once per worker: ``engine.tiny.build_tiny`` stages a build and renames it into place, so two workers
    building the same model at once both end with one complete copy. No test writes into it."""
    from engine.tiny import ensure_tiny

    if hasattr(request.config, "workerinput"):  # an xdist worker
        root = tmp_path_factory.getbasetemp().parent / "mvgen-cache"
        root.mkdir(exist_ok=True)
    else:
        root = tmp_path_factory.mktemp("mvgen-cache")
    ensure_tiny(root)
    return root


@pytest.fixture
def tiny_env(tiny_cache, monkeypatch):
    """``$MVGEN_CACHE`` names the session's tiny build: ``mvgen ... --model tiny`` run here (``mvgen.cli.main``
    reads the environment at its entry) or as a subprocess (which inherits it) finds it there."""
    monkeypatch.setenv("MVGEN_CACHE", str(tiny_cache))
    return tiny_cache
