"""The HTTP face of the search service: a FastAPI app over ``SearchService``, run by uvicorn.

Every answer is JSON, errors included (``{"error": message}`` with a 4xx status); a request
that fails never stops the server. Uploads are streamed with a byte cap into a private
temporary folder and removed after the query.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive

from imram.errors import ConfigError
from imram.serving.engine import Limits, RequestError, SearchService, png_bytes

STATIC = Path(__file__).parent / "static"
PAGE = "index.html"
UPLOAD_FIELD = "file"
MULTIPART_SLACK = 64 * 1024  # bytes a multipart body may carry beyond the file itself
BACKLOG = 2048
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600"}

logger = logging.getLogger(__name__)


class _BodyTooLarge(Exception):
    """The request body went past its byte cap while being read."""


class _Static(StaticFiles):
    """Static files whose missing folder is a JSON 404 rather than a server error."""

    async def check_config(self) -> None:
        if self.directory is not None and not os.path.isdir(self.directory):
            raise HTTPException(404, "the web page is not installed")
        await super().check_config()


def _capped(receive: Receive, cap: int) -> Receive:
    """``receive`` that raises ``_BodyTooLarge`` once more than ``cap`` body bytes arrived."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > cap:
                raise _BodyTooLarge
        return message

    return wrapped


async def _save_upload(request: Request, limit: int, folder: Path) -> Path:
    """The multipart field ``file`` of ``request``, saved to a fresh private file in ``folder``.

    The declared length is checked before reading, the body is counted while it streams, and
    the file part itself may hold at most ``limit`` bytes.
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        raise RequestError(
            415, f"upload the picture as multipart/form-data with the field {UPLOAD_FIELD!r}"
        )
    declared = request.headers.get("content-length")
    too_large = f"the upload is larger than the limit of {limit:,} bytes"
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, "the Content-Length header is not a number")
        if int(declared) > limit + MULTIPART_SLACK:
            raise RequestError(413, too_large)
    capped = Request(request.scope, _capped(request.receive, limit + MULTIPART_SLACK))
    try:
        form = await capped.form(max_files=1, max_fields=8)
    except _BodyTooLarge:
        raise RequestError(413, too_large) from None
    try:
        upload = form.get(UPLOAD_FIELD)
        if not isinstance(upload, UploadFile):
            raise RequestError(400, f"the multipart form has no file field {UPLOAD_FIELD!r}")
        handle, name = tempfile.mkstemp(prefix="upload-", suffix=".bin", dir=folder)
        path = Path(name)
        try:
            size = 0
            with os.fdopen(handle, "wb") as out:
                while chunk := await upload.read(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        raise RequestError(413, too_large)
                    out.write(chunk)
            if size == 0:
                raise RequestError(400, "the uploaded file is empty")
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path
    finally:
        await form.close()


def _validation_message(err: RequestValidationError) -> str:
    """One readable line for FastAPI's parameter errors (never its default format)."""
    errors = err.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    location = [str(part) for part in first.get("loc", ())]
    where = location[0] if location else "request"
    name = ".".join(location[1:]) or "body"
    if first.get("type") == "missing":
        return f"missing {where} parameter {name!r}"
    return f"{where} parameter {name!r}: {first.get('msg', 'invalid value')}"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    """Turn every error into ``{"error": message}``: refusals keep their 4xx, the rest 500."""

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError) -> JSONResponse:
        return _error(err.status, err.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return _error(400, _validation_message(err))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        if err.status_code == 404 and err.detail == "Not Found":
            message = (
                "no such endpoint; the API has GET /health, /search/text, /explain, "
                "/images/{id} and POST /search/image"
            )
        else:
            message = str(err.detail)
        return _error(err.status_code, message, dict(err.headers or {}))

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception) -> JSONResponse:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=err)
        return _error(500, "internal server error")


def create_app(
    index_path: str | Path,
    checkpoint: str | Path | None = None,
    rerank: str | Path | None = None,
    shortlist: int = 100,
    limits: Limits | None = None,
    device: str | torch.device | None = None,
    fusion: str | Path | None = None,
) -> FastAPI:
    """The search app over ``index_path``: the index, its model and the optional re-ranker are
    loaded here, once, so a broken setup fails before the server listens."""
    service = SearchService(index_path, checkpoint, rerank, shortlist, limits, device, fusion)
    uploads = Path(tempfile.mkdtemp(prefix="imram-serve-"))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            service.close()
            shutil.rmtree(uploads, ignore_errors=True)

    app = FastAPI(
        title="imram search",
        summary="Cross-modal image-text retrieval over one gallery index",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.uploads = uploads
    _install_error_handlers(app)

    @app.get("/health")
    def health() -> dict[str, Any]:
        """What is loaded and which endpoints can answer."""
        return service.health()

    @app.get("/search/text")
    def search_text(q: str = Query(), k: int = Query(10)) -> dict[str, Any]:
        """The best gallery images for a text query."""
        return service.search_text(q, k)

    @app.post("/search/image")
    async def search_image(request: Request, k: int = Query(10)) -> dict[str, Any]:
        """The best gallery captions for an uploaded picture (multipart field ``file``)."""
        service.check_k(k)
        service.check_image_search()
        path = await _save_upload(request, service.limits.max_upload_bytes, uploads)
        try:
            return await run_in_threadpool(service.search_image, path, k)
        finally:
            path.unlink(missing_ok=True)

    @app.get("/explain")
    def explain(q: str = Query(), image_id: str = Query()) -> dict[str, Any]:
        """The re-ranker's word-over-region attention for a text and a gallery image."""
        return service.explain(q, image_id)

    @app.get("/images/{image_id}")
    def image(image_id: str) -> Response:
        """A gallery image's file, by integer id."""
        path, media = service.image_file(image_id)
        if media is None:
            content = png_bytes(path)
            return Response(content, media_type="image/png", headers=SECURITY_HEADERS)
        return FileResponse(path, media_type=media, headers=SECURITY_HEADERS)

    @app.get("/", include_in_schema=False)
    def page() -> Response:
        """The search page."""
        if not (STATIC / PAGE).is_file():
            raise RequestError(404, "the web page is not installed; the JSON API works")
        headers = {"X-Content-Type-Options": "nosniff"}
        return FileResponse(STATIC / PAGE, media_type="text/html", headers=headers)

    app.mount("/static", _Static(directory=STATIC, check_dir=False), name="static")
    return app


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port`` (port 0: a free one), so connections made once
    its URL is announced queue until the server accepts them; problems raise ConfigError."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port must be an integer in [0, 65535], got {port!r}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as err:
        raise ConfigError(f"cannot resolve host {host!r} ({err.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    return sock


def url_of(sock: socket.socket) -> str:
    """The http URL of a bound socket (IPv6 hosts in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(
    index_path: str | Path,
    checkpoint: str | Path | None = None,
    rerank: str | Path | None = None,
    shortlist: int = 100,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
    device: str | torch.device | None = None,
    announce: Callable[[str], object] = print,
    log_level: str = "info",
    max_connections: int = 64,
    fusion: str | Path | None = None,
) -> None:
    """Load the app, bind ``host:port``, tell ``announce`` the URL, and serve until stopped.

    Binding anything but loopback prints a warning: the API has no authentication.
    ``max_connections`` caps concurrent connections (more get 503 from uvicorn).
    """
    if host not in LOOPBACK:
        print(
            f"warning: serving on {host}, reachable from other machines; the API has no "
            "authentication or TLS",
            file=sys.stderr,
        )
    app = create_app(index_path, checkpoint, rerank, shortlist, limits, device, fusion)
    sock = bind(host, port)
    config = uvicorn.Config(
        app,
        log_level=log_level,
        limit_concurrency=max_connections,
        timeout_keep_alive=5,
        server_header=False,
    )
    announce(url_of(sock))
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
