"""OpenAI's video API against the real stack (tritonserver on ``tiny`` + ``mvgen api``), driven by the official
``openai`` client, ``curl`` (the README's examples) and ``httpx`` for the error paths."""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.media import MAX_IMAGE_PIXELS
from tests.server.api_process import KEY, start_api, wait_for, wait_idle
from tests.server.conftest import MVGEN, png
from tests.server.test_bad_files import _claiming

openai = pytest.importorskip("openai", reason="the openai package is not installed (pip install 'mvgen[test]')")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # openai marks its video API deprecated

ROOT = Path(__file__).resolve().parents[2]
RETENTION_S = 3600
UPLOAD_LIMIT = 1 << 20  # --max-upload-mb 1
# a small request: 5 frames of 32x32, 2 steps, as the gRPC tests use
SMALL = {"num_frames": 5, "steps": 2, "seed": 7}


@pytest.fixture(scope="module")
def api(served, tmp_path_factory):
    process = start_api(served.url, tmp_path_factory.mktemp("api") / "data", "--max-upload-mb", "1",
                        "--retention", str(RETENTION_S))
    yield process
    code = process.stop()
    assert code == 0, f"mvgen api exited with {code} on SIGINT:\n{process.output()}"


@pytest.fixture
def inputs(images, tmp_path):
    """The first frame and two references as PNG files."""
    first, refs = images
    paths = {name: tmp_path / f"{name}.png" for name in ("first_frame", "front", "back")}
    for path, array in zip(paths.values(), (first, refs[0], refs[1])):
        path.write_bytes(png(array))
    return paths


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _frames(mp4: bytes) -> np.ndarray:
    import imageio.v3 as iio

    return iio.imread(mp4, extension=".mp4")


def _generate_with_the_cli(inputs, tiny_cache, out: Path) -> subprocess.CompletedProcess:
    command = [MVGEN, "generate", "--model", "tiny", "--device", "cpu", "--dtype", "float32", "--deterministic",
               "--first-frame", str(inputs["first_frame"]), "--reference", str(inputs["front"]),
               "--reference", str(inputs["back"]), "--prompt", "a person turns around", "--frames", "5",
               "--height", "32", "--width", "32", "--steps", "2", "--seed", "7", "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MVGEN_CACHE": str(tiny_cache)})


def test_create_and_poll_gives_the_video_mvgen_generate_makes(api, inputs, tiny_cache, tmp_path):
    """A first frame (``input_reference``) and references (``extra_body``): the MP4's frames equal those of
    ``mvgen generate`` for the same request and seed, and the spritesheet equals its contact sheet bit for bit."""
    client = api.openai()
    with ThreadPoolExecutor(1) as pool:
        cli = pool.submit(_generate_with_the_cli, inputs, tiny_cache, tmp_path / "cli.mp4")
        with open(inputs["first_frame"], "rb") as first:
            video = client.videos.create_and_poll(
                prompt="a person turns around", input_reference=first, size="32x32", poll_interval_ms=100,
                extra_body={"references": [_data_url(inputs["front"]), _data_url(inputs["back"])], **SMALL})
        result = cli.result()
    assert result.returncode == 0, result.stderr
    assert video.status == "completed", video.error
    assert (video.model, video.size, video.seconds, video.progress, video.error) == ("tiny", "32x32", "0.3125", 100,
                                                                                     None)
    assert video.prompt == "a person turns around"
    assert video.created_at <= video.completed_at and video.expires_at == video.completed_at + RETENTION_S

    mp4 = client.videos.download_content(video.id).content
    sheet = client.videos.download_content(video.id, variant="spritesheet").content
    thumbnail = client.videos.download_content(video.id, variant="thumbnail").content
    served_frames, cli_frames = _frames(mp4), _frames((tmp_path / "cli.mp4").read_bytes())
    assert served_frames.shape == (5, 32, 32, 3)
    assert np.array_equal(served_frames, cli_frames)
    served_sheet = np.asarray(Image.open(io.BytesIO(sheet)))
    cli_sheet = np.asarray(Image.open(tmp_path / "cli.png"))
    assert np.array_equal(served_sheet, cli_sheet)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(thumbnail))), cli_sheet[:32, :32])


def test_list_pages_as_openai_and_retrieve(api):
    """Three JSON submissions (the newest jobs): pages of two, newest first, then ``after`` in ascending order."""
    client = api.openai()
    with api.http() as http:
        ids = [http.post("/v1/videos", json={"prompt": f"job {i}", "size": "32x32", "first_frame": base64.b64encode(
            png(np.full((32, 32, 3), 40 * i, np.uint8))).decode(), **SMALL}).json()["id"] for i in range(3)]
    page = client.videos.list(limit=2)
    assert [v.id for v in page.data] == ids[:0:-1] and page.has_more
    assert page.get_next_page().data[0].id == ids[0]
    later = client.videos.list(after=ids[0], order="asc", limit=5)
    assert [v.id for v in later.data] == ids[1:] and not later.has_more
    every = [v.id for v in client.videos.list(limit=1)]  # auto-pagination, one job per page
    assert every[:3] == ids[::-1] and len(every) == len(set(every))
    for job_id in ids:
        done = wait_for(lambda: (v := client.videos.retrieve(job_id)).status in ("completed", "failed") and v,
                        what=f"{job_id} to finish")
        assert done.status == "completed", done.error
        assert done.size == "32x32" and done.prompt.startswith("job ")


def test_delete_of_a_running_job_cancels_it_on_the_server(api, served, inputs):
    client = api.openai()
    steps = lambda: served.metric("mvgen_step_duration_seconds_count", model="mvgen_stream")  # noqa: E731
    cancelled = served.metric("mvgen_requests_total", outcome="cancelled")
    with open(inputs["first_frame"], "rb") as first:
        video = client.videos.create(prompt="a long one", input_reference=first, size="32x32",
                                     extra_body={**SMALL, "steps": 200})
    before = steps()
    wait_for(lambda: steps() >= before + 2, what="the job's first steps")
    assert client.videos.retrieve(video.id).status == "in_progress"
    deleted = client.videos.delete(video.id)
    at_delete = steps()
    assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
    wait_idle(served)
    assert steps() - at_delete <= 3, "the server went on stepping after the job was deleted"
    assert served.metric("mvgen_requests_total", outcome="cancelled") == cancelled + 1
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    assert not (api.data_dir / "jobs" / video.id).exists()


@pytest.mark.skipif(shutil.which("jq") is None or shutil.which("curl") is None, reason="needs curl and jq")
def test_the_readme_curl_examples(api, inputs):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"### With curl\n.*?```bash\n(.*?)```", readme, re.S).group(1)
    folder = inputs["first_frame"].parent
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], cwd=folder, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "MVGEN_API": api.url, "MVGEN_API_KEY": KEY})
    assert result.returncode == 0, result.stderr
    assert _frames((folder / "video.mp4").read_bytes()).shape == (5, 32, 32, 3)
    assert Image.open(folder / "thumbnail.png").size == (32, 32)
    assert Image.open(folder / "spritesheet.png").size == (3 * 32 + 2 * 2, 2 * 32 + 2)  # 5 frames on a 3x2 grid
    assert re.search(r"video_\w+ completed", result.stdout)
    assert '"deleted":true' in result.stdout.replace(" ", "")


def _cli_error(args: list[str], inputs, tiny_cache) -> str:
    """The one-line error ``mvgen generate`` gives (without its ``mvgen: error: `` prefix)."""
    command = [MVGEN, "generate", "--model", "tiny", "--device", "cpu", "--first-frame", str(inputs["first_frame"]),
               "--prompt", "x", "--out", "/nonexistent/never.mp4", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "MVGEN_CACHE": str(tiny_cache)})
    assert result.returncode == 2, result.stderr
    return result.stderr.strip().removeprefix("mvgen: error: ")


def test_a_bad_field_gets_the_cli_message(api, inputs, tiny_cache):
    cli = _cli_error(["--width", "40", "--frames", "6"], inputs, tiny_cache)
    with api.http() as http, open(inputs["first_frame"], "rb") as first:
        answer = http.post("/v1/videos", data={"prompt": "x", "width": "40", "num_frames": "6"},
                           files={"input_reference": first})
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == cli


def _bad(case: str, inputs) -> dict:
    """httpx keywords of a request the API must refuse."""
    first = inputs["first_frame"].read_bytes()
    form = {"prompt": "x", "size": "32x32", "num_frames": "5", "steps": "2"}
    files = [("input_reference", ("first.png", first, "image/png"))]
    if case == "missing prompt":
        form.pop("prompt")
    elif case == "size not WxH":
        form["size"] = "big"
    elif case == "size not a multiple of 16":
        form["size"] = "40x32"
    elif case == "too many references":
        files += [("references", (f"r{i}.png", first, "image/png")) for i in range(4)]
    elif case == "corrupt image":
        files = [("input_reference", ("first.png", first[: len(first) // 2], "image/png"))]
    elif case == "decompression bomb":
        files = [("input_reference", ("bomb.png", _claiming(30_000, 20_000), "image/png"))]
    elif case == "upload over the limit":
        files += [("references", ("big.png", os.urandom(UPLOAD_LIMIT + 1000), "image/png"))]
    elif case == "unknown field":
        form["stepz"] = "2"
    elif case == "another model":
        form["model"] = "sora-2"
    return {"data": form, "files": files}


BAD = {  # case -> (status, type, words of the message)
    "missing prompt": (400, "invalid_request_error", "prompt is required (text prompt)"),
    "size not WxH": (400, "invalid_request_error", "size must be WIDTHxHEIGHT in pixels (e.g. 832x480), got 'big'"),
    "size not a multiple of 16": (400, "invalid_request_error", "width must be a positive multiple of 16, got 40"),
    "too many references": (400, "invalid_request_error", "got 4 references, this model takes at most 3"),
    "corrupt image": (400, "invalid_request_error", "first frame: cannot read image data as an image"),
    "decompression bomb": (400, "invalid_request_error", f"more than the limit of {MAX_IMAGE_PIXELS}"),
    "upload over the limit": (413, "invalid_request_error", f"more than the limit of {UPLOAD_LIMIT} bytes"),
    "unknown field": (400, "invalid_request_error", "unknown field(s) ['stepz']"),
    "another model": (400, "invalid_request_error", "model must be 'tiny' (the model this server serves), got"),
}


def test_bad_requests_get_openai_errors_and_the_server_stays_ready(api, served, inputs):
    jobs_before = {p.name for p in (api.data_dir / "jobs").iterdir()}
    with api.http() as http:
        for case, (status, kind, words) in BAD.items():
            answer = http.post("/v1/videos", **_bad(case, inputs))
            error = answer.json()["error"]
            assert (answer.status_code, error["type"]) == (status, kind), f"{case}: {answer.text}"
            assert words in error["message"] and "\n" not in error["message"], f"{case}: {error['message']}"
            assert set(error) == {"message", "type", "param", "code"}
        for key, words in ((None, "missing API key"), ("sk-wrong", "incorrect API key")):
            with api.http(key) as stranger:
                answer = stranger.get("/v1/videos")
            assert answer.status_code == 401 and words in answer.json()["error"]["message"]
            assert answer.json()["error"]["code"] == "invalid_api_key"
        for method, path in (("GET", "/v1/videos/video_nope"), ("DELETE", "/v1/videos/video_nope"),
                             ("GET", "/v1/videos/video_nope/content")):
            answer = http.request(method, path)
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found", answer.text
        assert http.get("/v1/videos", params={"limit": 0}).status_code == 400
        assert http.get("/health").json()["status"] == "ready"
    assert {p.name for p in (api.data_dir / "jobs").iterdir()} == jobs_before  # nothing stored for a refusal
    import tritonclient.grpc as grpcclient

    assert grpcclient.InferenceServerClient(served.url).is_server_ready()


def test_health_and_metrics(api, inputs):
    client = api.openai()
    with open(inputs["first_frame"], "rb") as first:
        video = client.videos.create_and_poll(prompt="x", input_reference=first, size="32x32", poll_interval_ms=50,
                                              extra_body=SMALL)
    assert video.status == "completed"
    with api.http(None) as anyone:  # no key needed for probes and scrapers
        health = anyone.get("/health")
        metrics = anyone.get("/metrics").text
    assert health.status_code == 200 and health.json()["model"] == "tiny"
    assert re.search(r'mvgen_api_requests_total\{method="POST",route="/v1/videos",status="200"\} [1-9]', metrics)
    assert re.search(r'mvgen_api_jobs_total\{outcome="completed"\} [1-9]', metrics)
    assert re.search(r'mvgen_api_job_duration_seconds_count\{outcome="completed"\} [1-9]', metrics)
    assert "mvgen_api_queue_length " in metrics and "mvgen_api_running_jobs " in metrics


def test_content_of_an_unfinished_job_is_409(api, inputs):
    with api.http() as http, open(inputs["first_frame"], "rb") as first:
        job = http.post("/v1/videos", data={"prompt": "x", "size": "32x32", "num_frames": "5", "steps": "100"},
                        files={"input_reference": first}).json()
        answer = http.get(f"/v1/videos/{job['id']}/content")
        assert answer.status_code == 409 and answer.json()["error"]["code"] == "video_not_ready"
        assert http.delete(f"/v1/videos/{job['id']}").json()["deleted"] is True
