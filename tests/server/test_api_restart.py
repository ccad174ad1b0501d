"""Jobs that outlive the API process: kill ``mvgen api`` while a job runs and after one finished, start it again on
the same data directory; plus the bounded queue (429) and one process per data directory."""
from __future__ import annotations

import signal
import subprocess

import pytest

from server.launcher import free_port
from tests.server.api_process import start_api, wait_for, wait_idle
from tests.server.conftest import MVGEN, png

openai = pytest.importorskip("openai", reason="the openai package is not installed (pip install 'mvgen[test]')")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # openai marks its video API deprecated

SMALL = {"size": "32x32", "num_frames": "5", "steps": "2", "seed": "3"}


def _submit(http, first: bytes, **changes):
    return http.post("/v1/videos", data={"prompt": "a person turns", **SMALL, **changes},
                     files={"input_reference": ("first.png", first, "image/png")})


def _finished(client, job_id: str):
    return wait_for(lambda: (v := client.videos.retrieve(job_id)).status in ("completed", "failed") and v,
                    what=f"{job_id} to finish")


def test_kill_and_restart_loses_no_finished_video_and_fails_the_running_job(served, images, tmp_path):
    first = png(images[0])
    data = tmp_path / "data"
    api = start_api(served.url, data, "--concurrency", "1", "--max-queue", "1")
    try:
        with api.http() as http:
            done = _finished(api.openai(), _submit(http, first).json()["id"])
            assert done.status == "completed"
            video = api.openai().videos.download_content(done.id).content
            steps = served.metric("mvgen_step_duration_seconds_count", model="mvgen_stream")
            running = _submit(http, first, steps="400").json()["id"]
            wait_for(lambda: served.metric("mvgen_step_duration_seconds_count", model="mvgen_stream") >= steps + 2,
                     what="the long job's first steps")
            queued = _submit(http, first, seed="4").json()["id"]
            full = _submit(http, first)  # one job runs, one waits: the queue (--max-queue 1) is full
            assert full.status_code == 429, full.text
            error = full.json()["error"]
            assert error["type"] == "rate_limit_error" and "--max-queue" in error["message"]
            with pytest.raises(openai.RateLimitError):
                api.openai().videos.create(prompt="x", extra_body={"num_frames": 5})
            assert api.openai().videos.retrieve(queued).status == "queued"
    finally:
        cancelled = served.metric("mvgen_requests_total", model="mvgen_stream", outcome="cancelled")
        api.stop(signal.SIGKILL)
    wait_idle(served)  # the dead process's stream closed: the server cancelled the running request (400 steps)
    assert served.metric("mvgen_requests_total", model="mvgen_stream", outcome="cancelled") == cancelled + 1

    api = start_api(served.url, data, "--concurrency", "1")
    try:
        client = api.openai()
        again = client.videos.retrieve(done.id)
        assert (again.status, again.completed_at, again.expires_at) == ("completed", done.completed_at, done.expires_at)
        assert client.videos.download_content(done.id).content == video
        interrupted = client.videos.retrieve(running)
        assert interrupted.status == "failed" and interrupted.error.code == "interrupted"
        assert "the mvgen api process stopped while this job was running" in interrupted.error.message
        assert _finished(client, queued).status == "completed"  # queued before the kill: run after the restart
        assert sorted(p.name for p in (data / "jobs").iterdir()) == sorted([done.id, queued])
        for job_id in (done.id, queued):
            assert sorted(p.name for p in (data / "jobs" / job_id).iterdir()) == ["spritesheet.png", "thumbnail.png",
                                                                                  "video.mp4"]
        assert not (data / "tmp").exists() or not any((data / "tmp").iterdir())

        command = [MVGEN, "api", "--url", served.url, "--port", str(free_port()), "--data-dir", str(data)]
        second = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "in use by another mvgen api process" in second.stderr, second.stderr
    finally:
        code = api.stop()
    assert code == 0, api.output()
