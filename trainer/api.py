"""Thin FastAPI routes speaking OpenAI's files and fine-tuning API, plus `/metrics` and `/health`,
and one humpback extension: `POST /v1/fine_tuning/jobs/{job_id}/deploy`.

Routes validate, call `TrainerService` / `Worker` / `Deployer` found on `app.state`, and map every
error to OpenAI's `{"error": {"message", "type", "param", "code"}}` with the matching status code.

`python -m trainer.api SETTINGS.json` serves with the `ServiceSettings` in that file (how the loop
starts the service); `humpback trainer serve` takes the same settings as flags.
"""

from __future__ import annotations

import hmac
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

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
)
from trainer.config import ServiceSettings
from trainer.deploy import Deployer
from trainer.metrics import TrainerMetrics
from trainer.serving import TrainerService
from trainer.store import Store
from trainer.worker import Worker

MAX_UPLOAD_BYTES = 512 * 1024 * 1024


def _error(status: int, message: str, type: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


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


@router.post("/files", response_model=FileObject)
async def upload_file(request: Request, file: UploadFile = File(...), purpose: str = Form(...)) -> FileObject:
    data = await file.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise ApiError(413, f"the file exceeds {MAX_UPLOAD_BYTES} bytes", param="file")
    return await run_in_threadpool(_service(request).upload, file.filename or "upload.jsonl", purpose, data)


@router.get("/files")
def list_files(request: Request) -> dict[str, Any]:
    files = _service(request).store.list_files()
    return _page(files, False)


@router.get("/files/{file_id}", response_model=FileObject)
def retrieve_file(request: Request, file_id: str) -> FileObject:
    return _service(request).get_file(file_id)


@router.get("/files/{file_id}/content")
def file_content(request: Request, file_id: str) -> Response:
    return Response(_service(request).file_content(file_id), media_type="application/jsonl")


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
    app.include_router(router)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/metrics", dependencies=[Depends(_check_auth)])
    def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        # The first item says where the value was (body, query, path...): the rest names the field.
        where = ".".join(str(p) for p in err["loc"][1:])
        return _error(400, f"{where}: {err['msg']}" if where else err["msg"], "invalid_request_error", where or None)

    return app


def serve(settings: ServiceSettings) -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m trainer.api SETTINGS.json")
    serve(ServiceSettings.model_validate_json(Path(sys.argv[1]).read_bytes()))
