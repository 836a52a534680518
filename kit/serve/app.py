"""The prediction service: a FastAPI app around one verified `Predictor`.

    POST /predict         one request document (a FHIR Bundle / Patient $everything result for clinical bundles)
    POST /predict/batch   many documents, scored together; per document its result or its error
    GET  /health          liveness and the bundle's name and version
    GET  /metadata        model card, tasks, calibration, thresholds, kit version
    GET  /docs, /openapi.json

Errors are the vertical's error format (FHIR OperationOutcome for clinical bundles) with a 4xx status for bad input,
never a 500. Logs carry a request id, method, path, status, counts and time: never a record's content or a patient id.
"""

from __future__ import annotations

import hmac
import logging
import re
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from kit import __version__
from kit.errors import KitError
from kit.predict.formats import BadInput, SubjectData, decode_json
from kit.serve.batcher import RequestBatcher

log = logging.getLogger("kit.serve")
DEFAULT_MAX_BYTES = 16 << 20
DRAIN_BYTES = 32 << 20  # a request up to this far over the limit is read to its end before the 413
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
OPEN_PATHS = {"/health", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"}

_DOC_SCHEMA = {
    "type": "object",
    "description": "A FHIR R4 Bundle (a Patient $everything result) or Patient; for non-FHIR verticals "
                   "{\"subjects\": [...], \"events\": [...]}",
    "properties": {"resourceType": {"type": "string"}, "type": {"type": "string"},
                   "entry": {"type": "array", "items": {"type": "object"}}},
}
_OUTCOME_SCHEMA = {"type": "object", "description": "FHIR OperationOutcome (or {\"error\": ...} for non-FHIR verticals)"}


def _body_spec(schema: dict, media_types: tuple[str, ...]) -> dict:
    return {"requestBody": {"required": True, "content": {m: {"schema": schema} for m in media_types}}}


def _errors_spec() -> dict:
    content = {"application/fhir+json": {"schema": _OUTCOME_SCHEMA}, "application/json": {"schema": _OUTCOME_SCHEMA}}
    return {str(s): {"description": d, "content": content} for s, d in (
        (400, "malformed JSON or not a resource"), (401, "missing or wrong bearer token"),
        (413, "request over the size limit"), (415, "unsupported media type or FHIR version"),
        (422, "wrong resourceType, no Patient, or an invalid parameter"))}


def create_app(predictor, *, token: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES, explain: bool = True,
               fmt: str | None = None) -> FastAPI:
    """The app for one loaded Predictor; `token` turns on bearer auth for everything but /health and the docs."""
    from kit.predict.formats import get_format

    wire = get_format(predictor.bundle.vertical, fmt)
    media = wire.request_media_types
    memory = _Memory()
    batcher = RequestBatcher(predictor)  # concurrent /predict requests are scored together
    app = FastAPI(
        title=f"kit {predictor.bundle.vertical} predictor",
        version=__version__,
        description=(f"Bundle {predictor.name} version {predictor.version}. POST a "
                     f"{'FHIR Bundle' if wire.name == 'fhir' else 'JSON document'} to /predict."),
    )

    def error_response(err: BadInput, request_id: str, extra_headers: dict | None = None) -> Response:
        headers = {"X-Request-ID": request_id, **(extra_headers or {})}
        return Response(orjson.dumps(wire.error(err)), status_code=err.status, media_type=wire.response_media_type,
                        headers=headers)

    app.add_middleware(_Envelope, token=token, error_response=error_response)

    @app.exception_handler(BadInput)
    async def _bad_input(request: Request, exc: BadInput):
        return error_response(exc, request.state.request_id)

    @app.exception_handler(KitError)
    async def _kit_error(request: Request, exc: KitError):
        return error_response(BadInput(422, str(exc), code="processing"), request.state.request_id)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        where = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:3])
        return error_response(BadInput(422, f"invalid request parameter ({where})", code="invalid"), request.state.request_id)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        rid = getattr(request.state, "request_id", uuid.uuid4().hex)
        code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
        return error_response(BadInput(exc.status_code, str(exc.detail), code=code), rid)

    async def read_document(request: Request) -> Any:
        wire.check_media_type(request.headers.get("content-type", ""))
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes + DRAIN_BYTES:
            raise BadInput(413, f"the request is {int(declared):,} bytes; the limit is {max_bytes:,}", code="too-long")
        body = bytearray()
        seen = 0
        async for part in request.stream():
            seen += len(part)
            if seen <= max_bytes:
                body += part
            elif seen > max_bytes + DRAIN_BYTES:
                break  # far over: answer now (the connection closes)
        if seen > max_bytes:
            # Read (and dropped) to the end when not far over, so the client gets the answer, not a reset connection.
            raise BadInput(413, f"the request is over the {max_bytes:,}-byte limit", code="too-long")
        if not body:
            raise BadInput(400, "the request body is empty", code="structure")
        return decode_json(body, "the request body")  # read as the bytearray it is: no 16 MB copy

    def respond(request: Request, payload: Any, counts: str) -> Response:
        request.state.counts = counts
        return Response(orjson.dumps(payload), media_type=wire.response_media_type)

    @app.post("/predict", openapi_extra={**_body_spec(_DOC_SCHEMA, media), "responses": _errors_spec()},
              summary="Score one patient's (or subject's) records")
    async def predict(request: Request, explain: bool = explain, as_of: str | None = None,
                      tasks: str | None = None) -> Response:
        """Answers a FHIR Bundle (type collection) of RiskAssessment, one per subject and task
        (plain JSON predictions for non-FHIR verticals)."""
        with batcher.arriving() as ticket:  # a scorer about to start may wait for this request to join it
            doc = await read_document(request)

            def work():
                sd = wire.parse(doc)
                try:
                    preds = batcher.predict(sd, as_of=as_of, explain=explain, tasks=_task_list(tasks), ticket=ticket)
                    return wire.render(preds, predictor.info, [*sd.rejected, *_unscored(sd, preds)]), preds
                finally:
                    memory.release()

            payload, preds = await run_in_threadpool(work)
        return respond(request, payload, f"subjects={len({p.subject_id for p in preds})} predictions={len(preds)}")

    @app.post("/predict/batch", openapi_extra={**_body_spec({"type": "array", "items": _DOC_SCHEMA}, media),
                                               "responses": _errors_spec()},
              summary="Score many documents together")
    async def predict_batch(request: Request, explain: bool = explain, as_of: str | None = None,
                            tasks: str | None = None) -> Response:
        """A JSON array of documents (or a Bundle whose entries are Bundles). Answers a batch-response Bundle: per
        document its Bundle of RiskAssessment (status 200) or its OperationOutcome (its 4xx status)."""
        doc = await read_document(request)

        def work():
            try:
                return _score_batch(predictor, wire, wire.split_batch(doc), as_of=as_of, explain=explain,
                                    tasks=_task_list(tasks))
            finally:
                memory.release()

        results, n_ok, n_pred = await run_in_threadpool(work)
        return respond(request, wire.render_batch(results, predictor.info),
                       f"documents={len(results)} scored={n_ok} predictions={n_pred}")

    @app.get("/health", summary="Liveness and the bundle served")
    def health() -> dict[str, Any]:
        return {"status": "ok", "bundle": predictor.name, "version": predictor.version, "kit_version": __version__}

    @app.get("/metadata", summary="Model card, tasks, calibration, thresholds and versions")
    def metadata() -> dict[str, Any]:
        return predictor.metadata()

    return app


ENV_CONFIG = "KIT_SERVE_CONFIG"


def app_from_env() -> FastAPI:
    """The app of one worker process of `kit serve --workers N`: settings from the environment (never the token
    itself: the token file is read here)."""
    import json
    import os

    from kit.predict.predictor import Predictor, relax_gc

    cfg = json.loads(os.environ[ENV_CONFIG])
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(int(cfg["threads"]))
    configure_logging(cfg["log_level"])
    token = Path(cfg["token_file"]).read_text().strip() if cfg.get("token_file") else None
    predictor = Predictor.load(cfg["bundle"], device=cfg["device"], batch_size=cfg["batch_size"])
    predictor.warm_up()
    relax_gc()
    return create_app(predictor, token=token, max_bytes=cfg["max_bytes"], explain=cfg["explain"], fmt=cfg["fmt"])


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(getattr(logging, level.upper(), logging.INFO))
    log.propagate = False


def _unscored(sd: SubjectData, preds: list) -> list[dict]:
    """The request's subjects that got no prediction (no event before the prediction time), said in the answer
    beside the records that could not be read, so nothing a client sent disappears without a word."""
    scored = {p.subject_id for p in preds}
    ids = sd.subjects.get_column("subject_id").to_list()
    if scored.issuperset(ids):  # the usual case: no polars query (one per document of a batch added up)
        return []
    return [{"position": None, "resource_type": None, "resource_id": key,
             "reason": "no event before the prediction time to score (pass as_of, or send the subject's records)"}
            for sid, key in zip(ids, sd.subjects.get_column("source_subject_id").to_list(), strict=True)
            if sid not in scored]


def _task_list(tasks: str | None) -> list[str] | None:
    """?tasks=a,b: score only these of the bundle's tasks (an unknown name is a 422 naming the bundle's tasks)."""
    names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    return names or None


def _score_batch(predictor, wire, docs: list, *, as_of, explain: bool, tasks: list[str] | None = None) -> tuple[list, int, int]:
    """Parse every document, score all good ones in one pass, and hand each document its own predictions."""
    import polars as pl

    parsed: list = []
    owner: dict[int, int] = {}
    for i, d in enumerate(docs):
        try:
            sd = wire.parse(d)
            clash = set(sd.subjects["subject_id"].to_list()) & owner.keys()
            if clash:
                raise BadInput(422, "a subject of this document is also in an earlier document of the batch", code="duplicate")
            owner.update({s: i for s in sd.subjects["subject_id"].to_list()})
            parsed.append(sd)
        except BadInput as err:
            parsed.append(err)
    good = [p for p in parsed if isinstance(p, SubjectData)]
    preds = []
    if good:
        merged = SubjectData(events=pl.concat([g.events for g in good]), subjects=pl.concat([g.subjects for g in good]))
        preds = predictor.predict_data(merged, as_of=as_of, explain=explain, tasks=tasks)
    per_doc: dict[int, list] = {}
    for p in preds:
        per_doc.setdefault(owner[p.subject_id], []).append(p)
    results = [p if isinstance(p, BadInput) else (per_doc.get(i, []), [*p.rejected, *_unscored(p, per_doc.get(i, []))])
               for i, p in enumerate(parsed)]
    return results, len(good), len(preds)


def _http_protocol_base():
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:  # httptools is optional; uvicorn's default is then h11
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


class NoDelayProtocol(_http_protocol_base()):
    """uvicorn's HTTP protocol with TCP_NODELAY on every connection. With --workers N uvicorn binds the port with a
    socket whose protocol number is 0, so asyncio does not turn Nagle off on accepted connections; on a keep-alive
    connection every answer then waited ~40 ms for the client's delayed ACK (bench/serve.py, 2 workers)."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        import socket

        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        super().connection_made(transport)


HTTP_PROTOCOL = "kit.serve.app:NoDelayProtocol"


class _Memory:
    """glibc keeps freed memory in per-thread arenas: across the threadpool's threads the server's RSS crept up by
    hundreds of MB under load (bench/serve.py). Fewer arenas and a trim after work keep it flat. The trim is rare (at
    most every TRIM_EVERY_S): memory handed back is faulted in again by the next request, and trimming once a second
    cost about 18 ms of a 1 MB request's 84. A no-op where glibc is not the allocator."""

    TRIM_EVERY_S = 30.0

    def __init__(self) -> None:
        self.libc = None
        self.last = 0.0
        self.lock = threading.Lock()
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-8, 2)  # M_ARENA_MAX
            self.libc = libc
        except (OSError, AttributeError):
            pass

    def release(self) -> None:
        if self.libc is None:
            return
        now = time.monotonic()
        with self.lock:
            if now - self.last < self.TRIM_EVERY_S:
                return
            self.last = now
        self.libc.malloc_trim(0)


class _Envelope:
    """Request ids, bearer auth, a 500 OperationOutcome for a bug and one log line per request, as plain ASGI: the
    decorator-style HTTP middleware re-streamed every request body through a task and a queue, about 2.5 ms of a
    1 MB request's CPU (bench/serve.py)."""

    def __init__(self, app, *, token: str | None, error_response) -> None:
        self.app, self.token, self.error_response = app, token, error_response

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = {k.lower(): v for k, v in scope.get("headers") or ()}
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["counts"] = rid, ""  # request.state in the handlers
        status = [0]
        if self.token is not None and scope["path"] not in OPEN_PATHS:
            scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                resp = self.error_response(BadInput(401, "missing or wrong bearer token", code="login"), rid,
                                           {"WWW-Authenticate": 'Bearer realm="kit"'})
                await resp(scope, receive, send)
                _log(scope, rid, resp.status_code, t0)
                return

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                kept = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*kept, (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # noqa: BLE001 - a bug must answer 500 with the request id, not drop the connection
            log.error("request_id=%s internal error %s\n%s", rid, type(exc).__name__, "".join(traceback.format_tb(exc.__traceback__)))
            if status[0]:
                raise  # the answer has begun: nothing else can be said on this connection
            resp = self.error_response(BadInput(500, f"internal error; quote request id {rid}", code="exception"), rid)
            await resp(scope, receive, send)
            status[0] = resp.status_code
        _log(scope, rid, status[0], t0)


def _log(scope, rid: str, status: int, t0: float) -> None:
    ms = (time.perf_counter() - t0) * 1000
    counts = (scope.get("state") or {}).get("counts", "")
    log.info("request_id=%s %s %s status=%d ms=%.1f %s", rid, scope["method"], scope["path"], status, ms, counts)
