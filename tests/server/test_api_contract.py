"""The API's parts without a Triton server: its request fields follow ``engine.request.FIELDS`` (a new field reaches
``/openapi.json`` with no other edit), ``seconds`` -> frames, the job store's schema, recovery and retention, 503
while Triton is unreachable, and who may start it."""
from __future__ import annotations

import base64
import sqlite3
import subprocess
from pathlib import Path

import pytest

from engine import request as contract
from engine.request import NumberAbove, RequestField, Wire
from server.api import fields, store as store_module
from server.api.errors import ApiError
from server.api.store import INTERRUPTED, Store, StoreError
from server.launcher import free_port, free_ports
from tests.server.conftest import MVGEN

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install 'mvgen[server]')")

ROOT = Path(__file__).resolve().parents[2]
NEW_FIELD = RequestField("motion_strength", "number", float, 1.0, NumberAbove(0, True), "how much the person moves",
                         "--motion-strength", (Wire("motion_strength", "TYPE_FP32", (1,)),))


def _app(tmp_path, url: str):
    from server.api.app import ApiSettings, create_app
    from server.api.backend import TritonBackend
    from server.api.metrics import ApiMetrics
    from server.api.runner import JobRunner

    store = Store(tmp_path / "data", retention_s=60)
    backend = TritonBackend(url, timeout_s=2)
    metrics = ApiMetrics()
    return create_app(ApiSettings(), store, backend, JobRunner(store, backend, metrics, max_queue=4, workers=1),
                      metrics)


def test_a_field_added_to_the_request_appears_in_the_openapi_schema(monkeypatch, tmp_path):
    from fastapi.testclient import TestClient

    monkeypatch.setattr(contract, "FIELDS", (*contract.FIELDS, NEW_FIELD))
    schema = TestClient(_app(tmp_path, "127.0.0.1:1")).get("/openapi.json").json()
    body = schema["paths"]["/v1/videos"]["post"]["requestBody"]["content"]
    for content, kind in (("multipart/form-data", "string"), ("application/json", "array")):
        properties = body[content]["schema"]["properties"]
        assert properties["motion_strength"] == {"type": "number", "description": NEW_FIELD.describe()}
        assert {f.name for f in contract.FIELDS} | set(fields.OPENAI_FIELDS) == set(properties)
        assert properties["references"]["type"] == "array" and properties["ref_size"]["type"] == kind
        assert body[content]["schema"]["required"] == ["prompt"]
    assert fields.parse_json({"prompt": "x", "motion_strength": 0.5}).values["motion_strength"] == 0.5
    assert fields.parse_form([("prompt", "x"), ("motion_strength", "0.5")]).values["motion_strength"] == 0.5
    assert "| `motion_strength` | decimal text | number |" in fields.markdown_table()


def test_the_readme_table_is_the_contract():
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("| field | multipart form | JSON | meaning |")
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    assert "\n".join(lines[start:end]) == fields.markdown_table(), "regenerate README.md's API table"


@pytest.mark.parametrize("seconds, fps, frames", [(4, 16, 65), (5, 16, 81), (0.3125, 16, 5), (0.01, 16, 1),
                                                  (2, 24, 49), (1, 16, 17)])
def test_seconds_become_4k_plus_1_frames(seconds, fps, frames):
    assert fields.frames_for_seconds(seconds, fps) == frames
    submission = fields.parse_json({"prompt": "x", "seconds": str(seconds), "size": "48x32"})
    assert submission.request_values(fps, 4) == {"prompt": "x", "num_frames": frames, "width": 48, "height": 32}


def test_form_spellings():
    png = b"\x89PNG fake"
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    submission = fields.parse_form([
        ("prompt", "x"), ("references[]", data_url), ("references[]", png), ("view_omega", "0.5, 1"),
        ("ref_size", "48x32"), ("steps", "abc"), ("seed", "9"), ("input_reference[image_url]", data_url)])
    assert submission.values == {"prompt": "x", "references": [png, png], "view_omega": [0.5, 1.0],
                                 "ref_size": (48, 32), "steps": "abc", "seed": 9, "first_frame": png}  # "abc": refused
    listed = fields.parse_form([("prompt", "x"), ("ref_size[]", "16"), ("ref_size[]", "32")])  # by its rule, later
    assert listed.values["ref_size"] == (16, 32)


@pytest.mark.parametrize("items, words", [
    ([("prompt", "x"), ("input_reference", b"a"), ("first_frame", b"b")], "give input_reference or first_frame"),
    ([("prompt", "x"), ("seconds", "4"), ("num_frames", "5")], "give seconds or num_frames, not both"),
    ([("prompt", "x"), ("size", "32x32"), ("height", "32")], "give size or height/width, not both"),
    ([("prompt", "x"), ("seconds", "-1")], "seconds must be a number > 0"),
    ([("prompt", "x"), ("first_frame", "https://example.com/a.png")], "remote URLs are not fetched"),
    ([("prompt", "x"), ("first_frame", "not base64!")], "neither an uploaded file nor base64 image data"),
    ([("prompt", "x"), ("steps", "1"), ("steps", "2")], "steps takes one value, got 2"),
    ([("prompt", b"file")], "prompt is a text field, got an uploaded file"),
    ([("prompt", "x"), ("input_reference[file_id]", "file-1")], "input_reference[file_id] is not supported"),
])
def test_form_refusals(items, words):
    with pytest.raises(ApiError) as refused:
        fields.parse_form(items)
    assert refused.value.status == 400 and words in refused.value.message


def test_503_while_triton_is_unreachable(tmp_path):
    from fastapi.testclient import TestClient

    with TestClient(_app(tmp_path, f"127.0.0.1:{free_port()}")) as client:
        created = client.post("/v1/videos", json={"prompt": "x"})
        health = client.get("/health")
    assert created.status_code == 503 and created.json()["error"]["code"] == "server_not_ready"
    assert "cannot reach the Triton server" in created.json()["error"]["message"]
    assert health.status_code == 503 and health.json()["status"] == "not ready"


# ---- the store -------------------------------------------------------------------------------------------------
VALUES = {"prompt": "p", "first_frame": b"frame", "references": [b"r0", b"r1"], "num_frames": 5, "height": 32,
          "width": 48, "steps": 2, "seed": 2**64 - 1, "view_omega": [0.5, 1.0]}


def test_store_keeps_inputs_and_migrates(tmp_path):
    store = Store(tmp_path, retention_s=60)
    job = store.create(VALUES, "tiny", 16)
    assert store.inputs(job.id) == VALUES
    assert job.video()["size"] == "48x32" and job.video()["seconds"] == "0.3125" and job.video()["status"] == "queued"
    with pytest.raises(StoreError, match="in use by another mvgen api process"):
        Store(tmp_path, retention_s=60)
    store.close()
    with sqlite3.connect(tmp_path / store_module.DATABASE) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(store_module.MIGRATIONS)


def test_store_applies_a_new_migration_and_refuses_a_newer_schema(tmp_path, monkeypatch):
    store = Store(tmp_path, retention_s=60)
    store.create(VALUES, "tiny", 16)
    store.close()
    monkeypatch.setattr(store_module, "MIGRATIONS", (*store_module.MIGRATIONS,
                                                     "ALTER TABLE jobs ADD COLUMN priority INTEGER DEFAULT 0"))
    with sqlite3.connect(tmp_path / store_module.DATABASE) as db:
        store_module.migrate(db, tmp_path)
        assert db.execute("SELECT prompt, priority FROM jobs").fetchall() == [("p", 0)]
        db.execute(f"PRAGMA user_version = {len(store_module.MIGRATIONS) + 1}")
    with pytest.raises(StoreError, match="is newer than this mvgen api knows"):
        Store(tmp_path, retention_s=60)


def test_recover_fails_running_jobs_keeps_queued_ones_and_removes_orphans(tmp_path):
    now = [1000.0]
    store = Store(tmp_path, retention_s=60, clock=lambda: now[0])
    running, queued, deleted, done = (store.create(VALUES, "tiny", 16) for _ in range(4))
    store.start(running.id)
    store.start(deleted.id)
    outputs = tmp_path / "tmp" / deleted.id
    outputs.mkdir(parents=True)
    store.delete(deleted.id)
    assert store.complete(deleted.id, outputs) is None and not outputs.exists()  # deleted while it ran
    store.start(done.id)
    finished = tmp_path / "tmp" / done.id
    finished.mkdir()
    (finished / "video.mp4").write_bytes(b"mp4")
    assert store.complete(done.id, finished).expires_at == 1060
    (tmp_path / "jobs" / "video_orphan").mkdir()
    (tmp_path / "tmp" / "half-written").mkdir()
    store.close()

    store = Store(tmp_path, retention_s=60, clock=lambda: now[0])
    assert store.recover() == [queued.id]
    failed = store.get(running.id)
    assert (failed.status, failed.error_code, failed.error_message) == ("failed", "interrupted", INTERRUPTED)
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == sorted([queued.id, done.id])
    assert not (tmp_path / "tmp").exists()
    assert store.content(store.get(done.id), "video").read_bytes() == b"mp4"
    now[0] = 1060
    assert sorted(store.expire()) == sorted([running.id, done.id])  # past expires_at: rows and files gone
    assert [p.name for p in (tmp_path / "jobs").iterdir()] == [queued.id]


# ---- who may start it ----------------------------------------------------------------------------------------
def _refused(*args: str) -> str:
    result = subprocess.run([MVGEN, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mvgen: error: "), result.stderr
    return lines[0]


def test_listening_beyond_loopback_needs_a_key(tmp_path):
    assert "beyond loopback: give --api-key-file" in _refused("api", "--host", "0.0.0.0", "--data-dir", str(tmp_path))
    grpc, http, metrics, api = free_ports(4)
    ports = ["--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics)]
    line = _refused("serve", "--model", "tiny", "--host", "0.0.0.0", *ports, "--api-port", str(api),
                    "--api-data-dir", str(tmp_path))
    assert "beyond loopback" in line
    assert "--api-port must differ" in _refused("serve", "--model", "tiny", *ports, "--api-port", str(grpc))
    (tmp_path / "empty.key").write_text("")
    assert "must hold the key on one line" in _refused("api", "--api-key-file", str(tmp_path / "empty.key"),
                                                       "--data-dir", str(tmp_path))
