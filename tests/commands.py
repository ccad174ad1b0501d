"""``mvgen ARGS`` run the way a test asks: as a shell runs it (its own process), or through ``mvgen.cli.main`` in the
test's process, which spares the ~5 s of imports a fresh process pays."""
from __future__ import annotations

import subprocess


def run_mvgen(command: list[str], process: bool) -> None:
    """``command`` is ``[MVGEN, *args]``; either way it must exit 0 (a process's stderr tail is the message)."""
    if process:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        from mvgen.cli import main

        assert main(command[1:]) == 0
