"""Thin FastAPI routes speaking OpenAI's files and fine-tuning API, plus `/metrics` and `/health`,
and one humpback extension: `POST /v1/fine_tuning/jobs/{job_id}/deploy`.

Routes validate, call `TrainerService` / `Worker` / `Deployer` found on `app.state`, and map every
error (theirs, an unknown route's, a wrong method's, an oversized body's, an unexpected exception's)
to OpenAI's `{"error": {"message", "type", "param", "code"}}` with the matching status code.

Request bodies are bounded: an upload streams to disk up to `max_upload_bytes` (at most
`max_concurrent_uploads` at once), any other body up to `MAX_BODY_BYTES`.

`python -m trainer.api SETTINGS.json` serves with the `ServiceSettings` in that file (how the loop
starts the service); `humpback trainer serve` takes the same settings as flags.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, BinaryIO, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from humpback.contracts import (
    ApiError,
    CreateJobRequest,
    Deployment,
    DeployRequest,
    ErrorBody,
    ErrorResponse,
    FileDeleted,
    FileObject,
    FineTuningJob,
    ListPage,
    ModelCard,
    ModelList,
)
from humpback.settings import env_values
from trainer.config import ServiceSettings
from trainer.deploy import Deployer
from trainer.metrics import TrainerMetrics
from trainer.serving import TrainerService
from trainer.store import Store, validation_reason
from trainer.worker import Worker

# Every body but an upload's: a job request is a few KB even with all its metadata.
MAX_BODY_BYTES = 1024 * 1024
# An upload's multipart framing and small fields (`purpose`), on top of the file itself.
MAX_FORM_OVERHEAD = 64 * 1024
MAX_FIELD_BYTES = 1024
MAX_PARTS = 8
UPLOAD_ROUTE = ("POST", "/v1/files")


def _error(status: int, message: str, type: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _error_type(status: int) -> str:
    """OpenAI's error type for a status, where the error does not name one."""
    if status == 401:
        return "authentication_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def _too_large(limit: int) -> HTTPException:
    # An HTTPException, the one kind FastAPI lets through when it arises while reading a JSON body.
    return HTTPException(413, f"the request body exceeds {limit} bytes")


class BodyLimit:
    """Refuses (413) a request body over its route's limit: at once by its Content-Length, else while
    it arrives (a chunked body declares none), so no route reads more than the limit."""

    def __init__(self, app: ASGIApp, upload_limit: int) -> None:
        self.app = app
        self.upload_limit = upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_limit if (scope["method"], scope["path"]) == UPLOAD_ROUTE else MAX_BODY_BYTES
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            exc = _too_large(limit)
            await _error(exc.status_code, exc.detail, _error_type(exc.status_code))(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                # Raised inside the route that reads the body: its error handler answers.
                raise _too_large(limit)
            return message

        await self.app(scope, counted, send)


class UploadForm:
    """A multipart upload parsed as it arrives: the `file` part is written to `out` and never held,
    the other fields (`purpose`) are kept, each at most MAX_FIELD_BYTES."""

    def __init__(self, out: BinaryIO, max_file_bytes: int) -> None:
        self.out = out
        self.max_file_bytes = max_file_bytes
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_bytes = 0
        self._parts = 0
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._in_file = False
        self._value = bytearray()

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_data, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._data, "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise ApiError(400, f"an upload has at most {MAX_PARTS} form fields", param="file")
        self._disposition, self._name, self._in_file, self._value = b"", "", False, bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if self._name != "file":
            return
        if self.filename is not None:
            raise ApiError(400, "an upload carries one file", param="file")
        self.filename = options.get(b"filename", b"upload.jsonl").decode("utf-8", "replace")
        self._in_file = True

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.file_bytes += end - start
            if self.file_bytes > self.max_file_bytes:
                raise ApiError(413, f"the file exceeds {self.max_file_bytes} bytes; split it into smaller files",
                               param="file", code="file_too_large")
            self.out.write(data[start:end])
            return
        self._value += data[start:end]
        if len(self._value) > MAX_FIELD_BYTES:
            raise ApiError(400, f"form field {self._name!r} exceeds {MAX_FIELD_BYTES} bytes", param=self._name or None)

    def _part_end(self) -> None:
        if not self._in_file and self._name:
            self.fields[self._name] = self._value.decode("utf-8", "replace")


async def _receive_upload(request: Request, out: BinaryIO, max_file_bytes: int) -> UploadForm:
    """Stream the multipart body of `request` into `out` (parsing and writing off the event loop)."""
    kind, params = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise ApiError(400, "an upload is multipart/form-data with the fields `file` and `purpose`", param="file")
    form = UploadForm(out, max_file_bytes)
    try:
        parser = MultipartParser(params[b"boundary"], form.callbacks())  # type: ignore[arg-type]
        async for chunk in request.stream():
            await run_in_threadpool(parser.write, chunk)
        parser.finalize()
    except FormParserError as exc:
        raise ApiError(400, f"the upload is not valid multipart/form-data: {exc}", param="file") from exc
    if form.filename is None:
        raise ApiError(400, "the upload has no `file` field", param="file")
    return form


def _check_auth(request: Request) -> None:
    expected: str | None = request.app.state.settings.api_key
    if expected is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        raise ApiError(401, "Incorrect API key provided", type="authentication_error", code="invalid_api_key")


def _service(request: Request) -> TrainerService:
    return request.app.state.service


def _page(items: list[Any], has_more: bool) -> dict[str, Any]:
    return ListPage(
        data=items, has_more=has_more,
        first_id=items[0].id if items else None, last_id=items[-1].id if items else None,
    ).model_dump()


router = APIRouter(prefix="/v1", dependencies=[Depends(_check_auth)])

# The route reads its body itself (streaming), so its form is declared here for the OpenAPI schema.
_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": ["fine-tune"]}},
}}}}}


@router.get("/models", response_model=ModelList)
def list_models(request: Request) -> ModelList:
    """The base models a job may name, with the folder each fine-tunes from (`root`): what a run checks
    against the model its servers serve."""
    models = _service(request).settings.base_models()
    return ModelList(data=[ModelCard(id=name, root=str(path)) for name, path in models.items()])


@router.post("/files", response_model=FileObject, openapi_extra=_UPLOAD_BODY)
async def upload_file(request: Request) -> FileObject:
    service = _service(request)
    uploads: asyncio.Semaphore = request.app.state.uploads
    if uploads.locked():
        raise ApiError(429, f"{service.settings.max_concurrent_uploads} uploads are being received already; "
                       "retry when one has finished", type="rate_limit_error", code="too_many_uploads")
    async with uploads:
        with service.staging() as staged:
            with staged.open("wb") as out:
                form = await _receive_upload(request, out, service.settings.max_upload_bytes)
            return await run_in_threadpool(
                service.upload, form.filename or "upload.jsonl", form.fields.get("purpose"), staged)


@router.get("/files")
def list_files(
    request: Request, after: str | None = None, limit: int = Query(10_000, ge=1, le=10_000),
    order: Literal["asc", "desc"] = "desc", purpose: str | None = None,
) -> dict[str, Any]:
    if purpose not in (None, "fine-tune"):
        return _page([], False)
    files, more = _service(request).store.list_files(after, limit, order)
    return _page(files, more)


@router.get("/files/{file_id}", response_model=FileObject)
def retrieve_file(request: Request, file_id: str) -> FileObject:
    return _service(request).get_file(file_id)


@router.get("/files/{file_id}/content")
def file_content(request: Request, file_id: str) -> Response:
    return FileResponse(_service(request).file_content(file_id), media_type="application/jsonl")


@router.delete("/files/{file_id}", response_model=FileDeleted)
def delete_file(request: Request, file_id: str) -> FileDeleted:
    return FileDeleted(id=file_id, deleted=_service(request).delete_file(file_id))


@router.post("/fine_tuning/jobs", response_model=FineTuningJob)
def create_job(request: Request, body: CreateJobRequest) -> FineTuningJob:
    job = _service(request).create_job(body)
    request.app.state.worker.notify()
    return job


@router.get("/fine_tuning/jobs")
def list_jobs(request: Request, after: str | None = None, limit: int = 20) -> dict[str, Any]:
    # The SDK sends metadata filters as `metadata[key]=value`.
    metadata = {
        k[len("metadata["):-1]: v for k, v in request.query_params.items() if k.startswith("metadata[") and k.endswith("]")
    }
    jobs, more = _service(request).store.list_jobs(after, _limit(limit), metadata or None)
    return _page(jobs, more)


@router.get("/fine_tuning/jobs/{job_id}", response_model=FineTuningJob)
def retrieve_job(request: Request, job_id: str) -> FineTuningJob:
    return _service(request).get_job(job_id)


@router.post("/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJob)
def cancel_job(request: Request, job_id: str) -> FineTuningJob:
    return _service(request).cancel(job_id, request.app.state.worker.cancel)


@router.post("/fine_tuning/jobs/{job_id}/deploy", response_model=Deployment)
def deploy_job(request: Request, job_id: str, body: DeployRequest) -> Deployment:
    return _service(request).deploy(job_id, body.role, request.app.state.deployer)


@router.get("/fine_tuning/jobs/{job_id}/events")
def list_events(request: Request, job_id: str, after: str | None = None, limit: int = 20) -> dict[str, Any]:
    _service(request).get_job(job_id)
    events, more = _service(request).store.list_events(job_id, after, _limit(limit))
    return _page(events, more)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
def list_checkpoints(request: Request, job_id: str, after: str | None = None, limit: int = 10) -> dict[str, Any]:
    _service(request).get_job(job_id)
    checkpoints, more = _service(request).store.list_checkpoints(job_id, after, _limit(limit))
    return _page(checkpoints, more)


def _limit(limit: int) -> int:
    if not 1 <= limit <= 100:
        raise ApiError(400, "limit must be between 1 and 100", param="limit")
    return limit


def create_app(settings: ServiceSettings) -> FastAPI:
    """The service: store, worker thread and routes. The worker starts and stops with the app."""
    store = Store(settings.data_dir.absolute() / "trainer.sqlite3")
    service = TrainerService(settings, store)
    metrics = TrainerMetrics(store)
    deployer = Deployer(settings, store, metrics)
    worker = Worker(service, metrics, deployer)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            store.close()

    app = FastAPI(title="humpback trainer", lifespan=lifespan)
    app.state.settings = settings
    app.state.service = service
    app.state.worker = worker
    app.state.deployer = deployer
    app.state.metrics = metrics
    app.state.uploads = asyncio.Semaphore(settings.max_concurrent_uploads)
    app.include_router(router)
    app.add_middleware(BodyLimit, upload_limit=settings.max_upload_bytes + MAX_FORM_OVERHEAD)

    @app.get("/health")
    def health() -> dict[str, Any]:
        if not worker.alive():
            raise ApiError(503, "the job queue has stopped, so queued jobs do not run; restart the trainer "
                           "(its log says why)", type="server_error", code="worker_stopped")
        return {"status": "ok"}

    @app.get("/metrics", dependencies=[Depends(_check_auth)])
    def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        what = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            message = f"Invalid URL ({what})"
        elif exc.status_code == 405:
            message = f"Method not allowed ({what}); allowed: {(exc.headers or {}).get('Allow', 'none')}"
        else:
            message = str(exc.detail)
        return _error(exc.status_code, message, _error_type(exc.status_code), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The first item of an error's location says where the value was (body, query...): the rest names the field.
        where, why = validation_reason(exc.errors(), skip=1)
        return _error(400, f"{where}: {why}" if where else why, "invalid_request_error", where or None)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the log (Starlette re-raises after answering); the client gets the shape.
        return _error(500, f"the trainer failed on this request ({type(exc).__name__}); its log has the details",
                      "server_error", code="internal_error")

    return app


def serve(settings: ServiceSettings) -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


def settings_or_exit(load: Callable[[], ServiceSettings]) -> ServiceSettings:
    """The settings `load` builds; SystemExit with the reasons when they are refused (e.g. a public
    address without an API key)."""
    try:
        return load()
    except ValidationError as exc:
        reasons = [
            ": ".join([*map(str, e["loc"]), e["msg"].removeprefix("Value error, ")]) for e in exc.errors(include_url=False)
        ]
        raise SystemExit(f"trainer: {'; '.join(reasons)}") from None


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m trainer.api SETTINGS.json")
    # The file holds no key (humpback.loop.services writes it without): the keys come from the environment.
    serve(settings_or_exit(lambda: ServiceSettings.model_validate(
        {**env_values(ServiceSettings), **json.loads(Path(sys.argv[1]).read_bytes())})))
