"""Jobs that outlive the API process: records in SQLite, each job's inputs and video in one folder.

    DIR/jobs.sqlite3      one row per job (schema version in ``PRAGMA user_version``, migrated at open)
    DIR/jobs/<id>/        queued: request.json + the uploaded images; completed: video.mp4, thumbnail.png,
                          spritesheet.png (the inputs removed)
    DIR/tmp/              outputs being written; moved into the job's folder only while its row exists
    DIR/.lock             held (flock) by the one API process that owns DIR

What a restart does (``recover``): a job that was ``in_progress`` when the process died ends ``failed`` with code
``interrupted`` (it is not resubmitted: its client may have watched it run, and a request that brought the
server down would bring it down again); ``queued`` jobs, whose inputs are on disk, run again in their order;
completed videos stay until they expire. Folders without a row and everything in ``tmp/`` are removed, so no
file outlives its job. A job's outputs and its row change together under one lock, so a job deleted while it
runs leaves nothing behind either.
"""
from __future__ import annotations

import fcntl
import json
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from engine import request as contract

# MIGRATIONS[v] brings a database at schema version v to v + 1; a database newer than len(MIGRATIONS) is refused
MIGRATIONS = (
    """
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order: the queue's and the list's
        id TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL CHECK (status IN ('queued', 'in_progress', 'completed', 'failed')),
        progress INTEGER NOT NULL DEFAULT 0,
        model TEXT NOT NULL,
        prompt TEXT NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        num_frames INTEGER NOT NULL,
        fps REAL NOT NULL,
        created_at INTEGER NOT NULL,
        started_at REAL,
        completed_at INTEGER,
        expires_at INTEGER,
        error_code TEXT,
        error_message TEXT
    );
    CREATE INDEX jobs_by_status ON jobs (status, seq);
    """,
)
DATABASE = "jobs.sqlite3"
REQUEST = "request.json"
# variant of GET /v1/videos/{id}/content -> (file in the job's folder, media type)
VARIANTS = {"video": ("video.mp4", "video/mp4"), "thumbnail": ("thumbnail.png", "image/png"),
            "spritesheet": ("spritesheet.png", "image/png")}
INTERRUPTED = "the mvgen api process stopped while this job was running, so it did not finish; submit it again"


class StoreError(RuntimeError):
    """The data directory cannot be used (one line)."""


@dataclass(frozen=True)
class Job:
    """One row of ``jobs``."""

    seq: int
    id: str
    status: str
    progress: int
    model: str
    prompt: str
    width: int
    height: int
    num_frames: int
    fps: float
    created_at: int
    started_at: float | None
    completed_at: int | None
    expires_at: int | None
    error_code: str | None
    error_message: str | None

    def video(self) -> dict:
        """The job as OpenAI's ``video`` object."""
        error = {"code": self.error_code, "message": self.error_message} if self.status == "failed" else None
        return {"id": self.id, "object": "video", "model": self.model, "status": self.status,
                "progress": self.progress, "created_at": self.created_at, "completed_at": self.completed_at,
                "expires_at": self.expires_at, "size": f"{self.width}x{self.height}",
                "seconds": f"{self.num_frames / self.fps:g}", "prompt": self.prompt, "error": error,
                "remixed_from_video_id": None}


class Store:
    """The jobs of one data directory; safe to call from several threads (one lock)."""

    def __init__(self, root: Path, retention_s: float, clock=time.time):
        self.root, self.retention_s, self.clock = Path(root), retention_s, clock
        self.jobs_dir, self.tmp_dir = self.root / "jobs", self.root / "tmp"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.jobs_dir.mkdir(exist_ok=True)
            self._lock_file = open(self.root / ".lock", "a")
        except OSError as error:
            raise StoreError(f"cannot use {self.root} as the API's data directory: {error.strerror or error}") from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise StoreError(f"{self.root} is in use by another mvgen api process (one process per --data-dir)") \
                from None
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.root / DATABASE, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        migrate(self._db, self.root / DATABASE)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._lock_file.close()

    # ---- creating and running ------------------------------------------------------------------------------
    def create(self, values: dict, model: str, fps: float) -> Job:
        """A queued job for ``values`` (``GenerationInputs``' keywords; images as bytes), its inputs on disk first."""
        job_id = f"video_{uuid.uuid4().hex}"
        staging = self.tmp_dir / job_id
        _write_inputs(staging, values)
        with self._lock:
            staging.rename(self.jobs_dir / job_id)
            self._db.execute(
                "INSERT INTO jobs (id, status, model, prompt, width, height, num_frames, fps, created_at) "
                "VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                (job_id, model, values["prompt"], values["width"], values["height"], values["num_frames"], fps,
                 int(self.clock())))
            return self.get(job_id)

    def inputs(self, job_id: str) -> dict:
        return _read_inputs(self.jobs_dir / job_id)

    def start(self, job_id: str) -> Job | None:
        """Mark a queued job running; None when it was deleted meanwhile."""
        with self._lock:
            changed = self._db.execute("UPDATE jobs SET status = 'in_progress', started_at = ? "
                                       "WHERE id = ? AND status = 'queued'", (self.clock(), job_id)).rowcount
            return self.get(job_id) if changed else None

    def set_progress(self, job_id: str, percent: int) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET progress = ? WHERE id = ? AND status = 'in_progress'",
                             (percent, job_id))

    def complete(self, job_id: str, outputs: Path) -> Job | None:
        """Move the files in ``outputs`` into the job's folder and mark it completed; when the job was deleted
        meanwhile, remove them instead (None)."""
        with self._lock:
            if self.get(job_id) is None:
                shutil.rmtree(outputs, ignore_errors=True)
                return None
            folder = self.jobs_dir / job_id
            shutil.rmtree(folder, ignore_errors=True)  # the inputs
            outputs.rename(folder)
            now = int(self.clock())
            self._db.execute("UPDATE jobs SET status = 'completed', progress = 100, completed_at = ?, expires_at = ? "
                             "WHERE id = ?", (now, now + int(self.retention_s), job_id))
            return self.get(job_id)

    def fail(self, job_id: str, code: str, message: str) -> Job | None:
        with self._lock:
            now = int(self.clock())
            changed = self._db.execute(
                "UPDATE jobs SET status = 'failed', completed_at = ?, expires_at = ?, error_code = ?, "
                "error_message = ? WHERE id = ? AND status IN ('queued', 'in_progress')",
                (now, now + int(self.retention_s), code, message, job_id)).rowcount
            if changed:
                shutil.rmtree(self.jobs_dir / job_id, ignore_errors=True)
            return self.get(job_id)

    def delete(self, job_id: str) -> Job | None:
        """Remove the job's row and files; the job as it was, or None when there is none."""
        with self._lock:
            job = self.get(job_id)
            if job is not None:
                self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
                shutil.rmtree(self.jobs_dir / job_id, ignore_errors=True)
            return job

    # ---- reading ------------------------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job(**row) if row is not None else None

    def content(self, job: Job, variant: str) -> Path:
        return self.jobs_dir / job.id / VARIANTS[variant][0]

    def page(self, after: Job | None, limit: int, descending: bool) -> tuple[list[Job], bool]:
        """Up to ``limit`` jobs after ``after`` in submission order (newest first when ``descending``), and whether
        more follow."""
        sign, order = ("<", "DESC") if descending else (">", "ASC")
        where, args = (f"WHERE seq {sign} ?", [after.seq]) if after is not None else ("", [])
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs {where} ORDER BY seq {order} LIMIT ?",
                                    (*args, limit + 1)).fetchall()
        return [Job(**row) for row in rows[:limit]], len(rows) > limit

    def count(self, status: str) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,)).fetchone()[0]

    # ---- restart and retention ----------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """After a start: fail the jobs a dead process was running, remove files no job owns; the queued jobs'
        ids, in submission order, to run again."""
        with self._lock:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            for (job_id,) in self._db.execute("SELECT id FROM jobs WHERE status = 'in_progress'").fetchall():
                self.fail(job_id, "interrupted", INTERRUPTED)
            for (job_id,) in self._db.execute("SELECT id FROM jobs WHERE status = 'queued'").fetchall():
                if not (self.jobs_dir / job_id / REQUEST).is_file():
                    self.fail(job_id, "inputs_lost", f"this job's inputs are missing from {self.jobs_dir / job_id}")
            owned = {row[0] for row in self._db.execute("SELECT id FROM jobs WHERE status IN ('queued', 'completed')")}
            for folder in self.jobs_dir.iterdir():
                if folder.name in owned:
                    continue
                if folder.is_dir():
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    folder.unlink()
            self.expire()
            return [row[0] for row in self._db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq")]

    def expire(self) -> list[str]:
        """Delete the jobs whose ``expires_at`` has passed (row and files); their ids."""
        with self._lock:
            ids = [row[0] for row in self._db.execute("SELECT id FROM jobs WHERE expires_at <= ?",
                                                      (int(self.clock()),))]
            for job_id in ids:
                self.delete(job_id)
            return ids


def migrate(db: sqlite3.Connection, path: Path) -> int:
    """Bring ``db`` to the latest schema, one version per transaction; the version it is at."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise StoreError(f"{path}: schema version {version} is newer than this mvgen api knows ({len(MIGRATIONS)}); "
                         f"run a newer mvgen or use another --data-dir")
    for target in range(version + 1, len(MIGRATIONS) + 1):
        db.execute("BEGIN")
        try:
            for statement in MIGRATIONS[target - 1].split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {target}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return len(MIGRATIONS)


def _write_inputs(folder: Path, values: dict) -> None:
    """``request.json`` (the values, images replaced by file names) and one file per image."""
    folder.mkdir(parents=True)
    record, images = {}, {}
    for field in contract.FIELDS:
        if field.name not in values:
            continue
        value = values[field.name]
        if field.kind == "image":
            images[field.name] = _write_image(folder, field.name, value)
        elif field.kind in contract.IMAGE_KINDS:
            images[field.name] = [_write_image(folder, f"{field.name}-{i}", v) for i, v in enumerate(value)]
        else:
            record[field.name] = value
    (folder / REQUEST).write_text(json.dumps({"values": record, "images": images}))


def _write_image(folder: Path, name: str, data: bytes) -> str:
    (folder / f"{name}.bin").write_bytes(data)
    return f"{name}.bin"


def _read_inputs(folder: Path) -> dict:
    saved = json.loads((folder / REQUEST).read_text())
    values = dict(saved["values"])
    for name, files in saved["images"].items():
        values[name] = [(folder / f).read_bytes() for f in files] if isinstance(files, list) \
            else (folder / files).read_bytes()
    return values
