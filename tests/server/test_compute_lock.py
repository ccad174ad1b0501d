"""``server.compute_lock``: the CPU models of a served tree take turns (two holders never overlap)."""
from __future__ import annotations

import threading
import time

from server.compute_lock import ComputeLock


def test_two_models_never_compute_at_once(tmp_path):
    path = str(tmp_path / "compute.lock")
    spans: list[tuple[float, float]] = []

    def model():  # each "model" process opens the file on its own, as each python stub does
        lock = ComputeLock(path)
        for _ in range(5):
            with lock:
                start = time.perf_counter()
                time.sleep(0.01)
                spans.append((start, time.perf_counter()))
        lock.close()

    threads = [threading.Thread(target=model) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans.sort()
    assert len(spans) == 15
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))


def test_no_path_is_no_lock():
    lock = ComputeLock(None)
    with lock, lock:  # re-entering a disabled lock never blocks
        pass
    lock.close()
