"""The FastAPI app: OpenAI's video routes over a ``JobRunner``, a ``Store`` and a ``TritonBackend``.

    POST   /v1/videos                 multipart or JSON (``server.api.fields``) -> a ``video`` object, queued
    GET    /v1/videos/{id}            the ``video`` object (status, progress 0-100, error)
    GET    /v1/videos                 ``after``, ``limit`` (1-100, default 20), ``order`` (desc by default): a list page
    DELETE /v1/videos/{id}            cancels a running job on the server, then deletes it and its files
    GET    /v1/videos/{id}/content    ``variant``: video (MP4), thumbnail (PNG, first frame), spritesheet (PNG, all)
    GET    /health                    200 ready / 503 not ready, from Triton's own health (no key needed)
    GET    /metrics                   Prometheus text (no key needed)

With an API key, every ``/v1`` route needs ``Authorization: Bearer KEY``. A request body is read up to
``max_upload_bytes`` and refused (413) beyond; a request is validated by ``engine.request.make_request``, so a bad
field gets the CLI's one-line message (400).
"""
from __future__ import annotations

import contextlib
import hmac
import json
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from engine.errors import RequestError
from engine.request import make_request

from . import fields
from .backend import NotReady, TritonBackend
from .errors import ApiError, bad_request, not_found, too_large, unauthorized, unavailable
from .metrics import ApiMetrics
from .runner import JobRunner
from .store import VARIANTS, Store

MAX_LIST = 100
# what the create route's documentation says of the frame rate (the served model's is read when a request comes)
FPS_WORDS = "the served checkpoint's frame rate: its mvgen_defaults.json 'fps', else 16 (Wan)"
DRAIN_BEYOND_LIMIT = 64 << 20  # bytes of an oversized body still read (and dropped) so the client gets the 413


@dataclass(frozen=True)
class ApiSettings:
    api_key: str | None = None
    max_upload_bytes: int = 64 << 20
    poll_after_ms: int = 250  # ``openai-poll-after-ms``: how often the openai client's poll() asks again
    drain_timeout_s: float = 30.0  # at shutdown: how long running jobs may go on before they are cancelled


def create_app(settings: ApiSettings, store: Store, backend: TritonBackend, runner: JobRunner,
               metrics: ApiMetrics) -> FastAPI:
    """The app; its lifespan recovers the store and starts the runner, and stops both."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await run_in_threadpool(lambda: runner.start(store.recover()))
        try:
            yield
        finally:
            await run_in_threadpool(runner.stop, settings.drain_timeout_s)
            store.close()

    app = FastAPI(title="mvgen video API", version="1", lifespan=lifespan,
                  description="OpenAI's video API (/v1/videos) over the mvgen Triton server")
    _add_error_handlers(app)
    _add_middleware(app, settings, metrics)
    routes = _Routes(settings, store, backend, runner)
    app.post("/v1/videos", openapi_extra=fields.request_body(FPS_WORDS), summary="Create a video job")(routes.create)
    app.get("/v1/videos", summary="List video jobs")(routes.list)
    app.get("/v1/videos/{video_id}", summary="Retrieve a video job")(routes.retrieve)
    app.delete("/v1/videos/{video_id}", summary="Cancel and delete a video job")(routes.delete)
    app.get("/v1/videos/{video_id}/content", summary="Download a video's content")(routes.content)
    app.get("/health", summary="Ready when Triton is")(routes.health)
    app.get("/metrics", summary="Prometheus metrics")(lambda: Response(metrics.render(), media_type="text/plain"))
    return app


class _Routes:
    def __init__(self, settings: ApiSettings, store: Store, backend: TritonBackend, runner: JobRunner):
        self.settings, self.store, self.backend, self.runner = settings, store, backend, runner

    async def create(self, request: Request) -> JSONResponse:
        body = await _read_body(request, self.settings.max_upload_bytes)
        submission = await _parse(request, body, self.settings.max_upload_bytes)
        job = await run_in_threadpool(self._submit, submission)
        return self._video(job.video())

    def _submit(self, submission: fields.Submission):
        reason = self.backend.not_ready_reason()
        if reason is not None:
            raise unavailable(reason)
        self.runner.check_room()  # before any image is decoded
        try:
            served = self.backend.describe()
        except NotReady as error:
            raise unavailable(str(error)) from None
        if submission.model not in (None, served.name):
            raise bad_request(f"model must be {served.name!r} (the model this server serves), got "
                              f"{submission.model!r}", "model")
        values = submission.request_values(served.fps, served.limits.temporal_multiple)
        try:
            checked = make_request(served.defaults, served.limits, **values)
        except RequestError as error:
            raise bad_request(str(error), fields.field_in(str(error))) from None
        return self.runner.submit(fields.wire_values(checked, values), served.name, served.fps)

    def retrieve(self, video_id: str) -> JSONResponse:
        return self._video(self._job(video_id).video())

    def list(self, request: Request) -> JSONResponse:
        query = request.query_params
        unknown = sorted(set(query) - {"after", "limit", "order"})
        if unknown:
            raise bad_request(f"unknown query parameter(s) {unknown}; the parameters are after, limit, order",
                              unknown[0])
        limit = query.get("limit", "20")
        if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIST:
            raise bad_request(f"limit must be an integer in [1, {MAX_LIST}], got {limit!r}", "limit")
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise bad_request(f"order must be 'asc' or 'desc', got {order!r}", "order")
        after = None
        if "after" in query:
            after = self.store.get(query["after"])
            if after is None:
                raise bad_request(f"after: no video with id {query['after']!r}", "after")
        jobs, more = self.store.page(after, int(limit), order == "desc")
        data = [job.video() for job in jobs]
        return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None, "has_more": more})

    def delete(self, video_id: str) -> JSONResponse:
        if self.runner.delete(video_id) is None:
            raise not_found(video_id)
        return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})

    def content(self, video_id: str, variant: str = "video") -> FileResponse:
        if variant not in VARIANTS:
            raise bad_request(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}", "variant")
        job = self._job(video_id)
        if job.status != "completed":
            raise ApiError(409, f"video {video_id!r} is {job.status}; its content exists once it is completed",
                           code="video_not_ready", param="video_id")
        path = self.store.content(job, variant)
        if not path.is_file():  # deleted or expired since the lookup
            raise not_found(video_id)
        return FileResponse(path, media_type=VARIANTS[variant][1], filename=f"{video_id}-{path.name}")

    async def health(self) -> JSONResponse:
        reason = await run_in_threadpool(self.backend.not_ready_reason)
        body = {"status": "ready" if reason is None else "not ready", **self.runner.counts()}
        if reason is not None:
            return JSONResponse({**body, "reason": reason}, status_code=503)
        with contextlib.suppress(NotReady):
            body["model"] = (await run_in_threadpool(self.backend.describe)).name
        return JSONResponse(body)

    def _job(self, video_id: str):
        job = self.store.get(video_id)
        if job is None:
            raise not_found(video_id)
        return job

    def _video(self, video: dict) -> JSONResponse:
        return JSONResponse(video, headers={"openai-poll-after-ms": str(self.settings.poll_after_ms)})


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past ``limit`` bytes; an oversized body is still read, and dropped, up to
    ``DRAIN_BEYOND_LIMIT`` more, so that the client gets the answer rather than a reset connection."""
    declared = request.headers.get("content-length")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > limit + DRAIN_BEYOND_LIMIT:
            break
    if size > limit:
        raise too_large(int(declared) if declared and declared.isdigit() else None, limit)
    return b"".join(chunks)


async def _parse(request: Request, body: bytes, limit: int) -> fields.Submission:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise bad_request(f"the request body is not valid JSON: {error}") from None
        return fields.parse_json(data)
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return fields.parse_form(await _form_items(request, body, limit))
    raise bad_request(f"send multipart/form-data or application/json, got content type {kind or 'none'!r}")


async def _form_items(request: Request, body: bytes, limit: int) -> list[tuple[str, str | bytes]]:
    """The form's parts in order, files as bytes (the body was read already: it is replayed to the parser)."""
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_part_size=limit)
    except MultiPartException as error:
        raise bad_request(f"the multipart form cannot be read: {error.message}") from None
    try:
        return [(name, await value.read() if isinstance(value, UploadFile) else value)
                for name, value in form.multi_items()]
    finally:
        await form.close()


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return JSONResponse(ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                                     code=code).body(), status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error: RequestValidationError):
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem.get("loc", ())[1:])
        return JSONResponse(bad_request(f"{where}: {problem.get('msg')}", where or None).body(), status_code=400)


def _add_middleware(app: FastAPI, settings: ApiSettings, metrics: ApiMetrics) -> None:
    expected = f"Bearer {settings.api_key}".encode() if settings.api_key else None

    @app.middleware("http")
    async def authorize_and_count(request: Request, call_next):
        if expected is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization")
            if given is None:
                response = _error(unauthorized("missing API key: send the header 'Authorization: Bearer KEY'"))
            elif not hmac.compare_digest(given.encode(), expected):
                response = _error(unauthorized("incorrect API key in the Authorization header"))
            else:
                response = await call_next(request)
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(request.method, route.path if route is not None else "other",
                                str(response.status_code)).inc()
        return response


def _error(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)
