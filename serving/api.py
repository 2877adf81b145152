"""The HTTP API: OpenAI-compatible chat, plus feedback, memories, failures, consolidations and adapters.

One router per resource; each route translates HTTP to one call of the application object
(serving/service.py), which decides who may do what; one place maps exceptions to OpenAI-shaped
errors. Who calls is one dependency (`authenticate`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from typing import Annotated, Literal
from urllib.parse import urlsplit

import anyio
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import AfterValidator, BaseModel, Field, StringConstraints
from starlette.exceptions import HTTPException

from memory import LOCAL_USER, Correction, NotAllowed, UnknownFailure, UnknownMemory, UnknownResponse
from memory.failures import KINDS as FAILURE_KINDS
from serving.engines import EngineError
from agent.graph import ThreadFull
from serving.auth import is_loopback
from serving.reports import UnknownReport
from serving.runtime import EngineUnavailable
from serving.service import (
    Busy,
    Caller,
    Forbidden,
    Invalid,
    NotServable,
    QuotaExceeded,
    Ratchet,
    TooLarge,
    UnknownAdapter,
    UnknownCycle,
    UnknownModel,
    UnknownThread,
)

log = logging.getLogger("ratchet.api")


# -- bodies --------------------------------------------------------------------------------
def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds a lone surrogate, which is not Unicode text") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]  # any length (the service enforces settings.limits)
Name = Annotated[str, AfterValidator(_encodable), StringConstraints(min_length=1, max_length=256)]  # an identifier
Id = Annotated[int, Path(ge=1, le=2**63 - 1)]  # a row id in a path (SQLite's integers)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model: Name = "ratchet"
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    user: Name | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    memory: bool = True  # Ratchet's extension: False answers without retrieval
    thread_id: Name | None = None  # Ratchet's extension: the server keeps the thread's history


class FeedbackRequest(BaseModel):
    response_id: Name
    rating: Literal[1, -1]
    comment: Text | None = None
    correction: Text | None = None
    user: Name | None = None


class AgreementRequest(BaseModel):
    model: Name = "ratchet"
    messages: list[Message] = Field(min_length=1)
    completion: Text = Field(min_length=1)


class MemoryRequest(BaseModel):
    question: Text = Field(min_length=1)
    answer: Text = Field(min_length=1)
    shared: bool = False  # shared with every user: admin only
    user: Name | None = None


class LessonRequest(BaseModel):
    answer: Text = Field(min_length=1)
    shared: bool = False  # for everyone, rather than for the user whose question failed
    user: Name | None = None


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param


# -- auth ----------------------------------------------------------------------------------
def authenticate(r: Ratchet):
    """The dependency that names the caller. Keyless (no live key, loopback only): an admin acting
    as the `user` query parameter, else the `user` field of a JSON body, else `local`. Otherwise a
    live Bearer key, whose user is the user of everything it sends."""

    async def caller(request: Request) -> Caller:
        if r.open_to_loopback():
            name = request.query_params.get("user")
            if name is None and request.headers.get("content-type", "").startswith("application/json"):
                try:
                    body = await request.json()
                except ValueError:
                    body = None
                if isinstance(body, dict) and isinstance(body.get("user"), str):
                    name = body["user"]
            return Caller(user=name or LOCAL_USER, admin=True, named=name is not None)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise OpenAIError(401, "missing API key: send 'Authorization: Bearer rk-...'", "authentication_error",
                              "missing_api_key")
        key = r.authenticate(token.strip())
        if key is None:
            raise OpenAIError(401, "invalid or revoked API key", "authentication_error", "invalid_api_key")
        return Caller(user=key.user, admin=key.role == "admin", key_id=key.id)

    return caller


def _memory(r: Ratchet, c: Correction, score: float | None = None) -> dict:
    out = {"id": c.id, "object": "memory", "question": c.question, "answer": c.answer, "user": c.user,
           "shared": c.shared, "created_at": c.created_at, "retracted_at": c.retracted_at,
           "consolidated_in": c.consolidated_in, "merged": c.merged, "source": c.source,
           "confirmed_at": c.confirmed_at, "trusted": r.trusted(c), **r.memory_state(c)}
    if score is not None:
        out["score"] = round(score, 4)
    return out


def _failure(row: dict) -> dict:
    return {"id": row["id"], "object": "failure", "kind": row["kind"], "response_id": row["response_id"],
            "user": row["user"], "detail": row["detail"], "created_at": row["created_at"], "lesson_id": row["lesson_id"],
            "prompt": row.get("prompt"), "response": row.get("response")}


# -- routers -------------------------------------------------------------------------------
def chat_router(r: Ratchet, caller) -> APIRouter:
    router = APIRouter(tags=["chat"])

    @router.post("/v1/chat/completions")
    def chat_completions(body: ChatRequest, who: Caller = Depends(caller)):
        options = dict(model=body.model, use_memory=body.memory, temperature=body.temperature,
                       thread_id=body.thread_id)
        if body.max_completion_tokens or body.max_tokens:
            options["max_tokens"] = body.max_completion_tokens or body.max_tokens
        messages = [m.model_dump() for m in body.messages]
        if body.stream:
            response_id, adapter, pieces = r.chat_stream(who, messages, **options)
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _EventStream(_sse(response_id, body.model, adapter, pieces, usage),
                                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        reply = r.chat(who, messages, **options)
        return {
            "id": reply.response_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": reply.text},
                 "finish_reason": reply.finish_reason}
            ],
            "usage": _usage(reply),
            "ratchet": {"memories": reply.memories, "adapter": reply.adapter, "memory": body.memory,
                        "retrieval_ms": round(reply.retrieval_ms, 2), "engine_ms": round(reply.latency_ms, 2)},
        }

    @router.get("/v1/models")
    async def models(who: Caller = Depends(caller)):
        return {"object": "list",
                "data": [{"id": m, "object": "model", "owned_by": "ratchet"} for m in r.models(who)]}

    return router


def _usage(reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


class _EventStream(StreamingResponse):
    """A stream whose events are closed as soon as the response ends, also when the client went away
    mid-way (else only the garbage collector would close them, and the answer would go on)."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _sse(response_id: str, model: str, adapter: str | None, pieces, include_usage: bool):
    """Server-sent events as OpenAI streams them: chat.completion.chunk objects, then [DONE]. Each
    piece is awaited in a worker thread, so a client that goes away cancels the stream at once:
    generation stops, the answer so far is recorded and the adapter released."""
    chunks = _chunks(response_id, model, adapter, pieces, include_usage)
    try:
        while (chunk := await anyio.to_thread.run_sync(next, chunks, None)) is not None:
            yield chunk
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(pieces.close)
            chunks.close()


def _chunks(response_id: str, model: str, adapter: str | None, pieces, include_usage: bool):
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    try:
        for piece in pieces:
            if isinstance(piece, str):
                yield chunk({"content": piece})
            else:  # the Reply: recorded under response_id by now
                yield chunk({}, piece.finish_reason,
                            ratchet={"memories": piece.memories, "adapter": adapter})
                if include_usage:
                    body = {"id": response_id, "object": "chat.completion.chunk", "created": created,
                            "model": model, "choices": [], "usage": _usage(piece)}
                    yield f"data: {json.dumps(body)}\n\n"
    except Exception as e:  # the status line is sent already: the error goes into the stream
        log.exception("stream %s failed", response_id)
        _, err, _ = _error_body(e)
        yield f"data: {json.dumps(err)}\n\n"
    yield "data: [DONE]\n\n"


def feedback_router(r: Ratchet, caller) -> APIRouter:
    router = APIRouter(tags=["feedback"])

    @router.post("/v1/feedback", status_code=201)
    def feedback(body: FeedbackRequest, who: Caller = Depends(caller)):
        feedback_id = r.feedback(who, body.response_id, body.rating, comment=body.comment, correction=body.correction)
        return {"id": feedback_id, "object": "feedback", "response_id": body.response_id}

    return router


def memories_router(r: Ratchet, caller) -> APIRouter:
    router = APIRouter(tags=["memories"])

    @router.get("/v1/memories")
    def memories(who: Caller = Depends(caller), query: Text | None = None,
                 limit: int = Query(20, ge=1, le=200), offset: int = Query(0, ge=0, le=2**31),
                 threshold: float | None = Query(None, ge=-1.0, le=1.0),
                 state: Literal["live", "retracted", "all"] = "live", user: Name | None = None):
        """With `query`: the caller's visible memories nearest to it (newest-wins applied); without:
        the caller's visible memories, newest first, live ones (`state`: or retracted ones, or both).
        An admin key sees them as `user` does."""
        if query and state != "live":
            raise OpenAIError(400, "a search finds live memories only; list retracted ones without `query`",
                              code="invalid_request", param="state")
        if query:
            hits = r.search_memories(who, query, limit=limit, threshold=threshold, user=user)
            return {"object": "list", "data": [_memory(r, h.correction, h.score) for h in hits]}
        listed = r.list_memories(who, limit=limit, offset=offset, state=state, user=user)
        return {"object": "list", "data": [_memory(r, c) for c in listed]}

    @router.post("/v1/memories", status_code=201)
    def add_memory(body: MemoryRequest, who: Caller = Depends(caller)):
        return _memory(r, r.add_correction(who, body.question, body.answer, shared=body.shared))

    @router.post("/v1/memories/rebuild-index")
    def rebuild_index(who: Caller = Depends(caller)):
        return {"object": "memory.index", **r.rebuild_index(who)}

    @router.get("/v1/memories/{memory_id}")
    def memory(memory_id: Id, who: Caller = Depends(caller)):
        return _memory(r, r.memory_of(who, memory_id))

    @router.post("/v1/memories/{memory_id}/confirm")
    def confirm(memory_id: Id, who: Caller = Depends(caller)):
        """An admin vouches for a correction: it may now enter the shared adapter."""
        return _memory(r, r.confirm(who, memory_id))

    @router.delete("/v1/memories/{memory_id}")
    def retract(memory_id: Id, who: Caller = Depends(caller)):
        """Retract: by the user who gave it, or by an admin (the only way for a shared memory)."""
        return {**_memory(r, r.retract(who, memory_id)), "deleted": True}

    return router


def caller_router(r: Ratchet, caller) -> APIRouter:
    router = APIRouter(tags=["caller"])

    @router.get("/v1/caller")
    def who(who: Caller = Depends(caller)):
        """Who this request's key (or keyless loopback) makes you: `user`, `admin`, and `keyed`."""
        return {"object": "caller", **r.whoami(who)}

    return router


def threads_router(r: Ratchet, caller) -> APIRouter:
    router = APIRouter(tags=["threads"])

    @router.delete("/v1/threads/{thread_id}")
    def delete_thread(thread_id: Name, who: Caller = Depends(caller)):
        """Forget one of your threads (its history on the server)."""
        r.delete_thread(who, thread_id)
        return {"object": "thread.deleted", "id": thread_id, "deleted": True}

    return router


def failures_router(r: Ratchet, caller) -> APIRouter:
    router = APIRouter(tags=["failures"])

    @router.get("/v1/failures")
    def failures(who: Caller = Depends(caller), kind: Literal[FAILURE_KINDS] | None = None,  # type: ignore[valid-type]
                 user: Name | None = None, open: bool = False, limit: int = Query(50, ge=1, le=500),
                 offset: int = Query(0, ge=0, le=2**31)):
        rows = r.failures(who, kind=kind, user=user, open_only=open, limit=limit, offset=offset)
        return {"object": "list", "data": [_failure(f) for f in rows]}

    @router.get("/v1/failures/{failure_id}")
    def failure(failure_id: Id, who: Caller = Depends(caller)):
        return _failure(r.failure(who, failure_id))

    @router.post("/v1/failures/{failure_id}/lesson", status_code=201)
    def lesson(failure_id: Id, body: LessonRequest, who: Caller = Depends(caller)):
        """Turn the failure into a correction of its question with `answer`."""
        failure, memory = r.lesson(who, failure_id, body.answer, shared=body.shared)
        return {"object": "lesson", "failure": _failure(failure), "memory": _memory(r, memory)}

    return router


def consolidations_router(r: Ratchet, caller) -> APIRouter:
    router = APIRouter(tags=["consolidations"])

    @router.post("/v1/consolidations", status_code=202)
    def consolidate(who: Caller = Depends(caller)):
        return _cycle(r.consolidate(who))

    @router.get("/v1/consolidations")
    def consolidations(who: Caller = Depends(caller)):
        schedule, cycles = r.consolidations(who)
        return {"object": "list", "schedule": schedule, "data": [_cycle(c) for c in cycles]}

    @router.get("/v1/consolidations/{cycle_id}")
    def consolidation(cycle_id: Id, who: Caller = Depends(caller)):
        return _cycle(r.consolidation(who, cycle_id))

    return router


def adapters_router(r: Ratchet, caller) -> APIRouter:
    router = APIRouter(tags=["adapters"])

    @router.get("/v1/adapters")
    def adapters(who: Caller = Depends(caller)):
        versions = r.adapters(who)
        return {"object": "list", "active": r.active, "data": [_adapter(r, v) for v in versions]}

    @router.post("/v1/adapters/rollback")
    def rollback(who: Caller = Depends(caller)):
        target = r.rollback(who)
        return {"object": "adapter.activation", "active": r.active, "adapter": _adapter(r, target) if target else None,
                **r.last_switch}

    @router.post("/v1/adapters/{version}/activate")
    def activate(version: Name, who: Caller = Depends(caller)):
        number = version.removeprefix("ratchet-v").removeprefix("v")
        if not re.fullmatch(r"[0-9]{1,18}", number):  # ASCII digits that fit SQLite's integers
            raise OpenAIError(404, f"no adapter {version!r}", code="adapter_not_found", param="version")
        target = r.activate(who, int(number))
        return {"object": "adapter.activation", "active": r.active, "adapter": _adapter(r, target), **r.last_switch}

    return router


def evaluations_router(r: Ratchet, caller) -> APIRouter:
    router = APIRouter(tags=["evaluations"])

    @router.post("/v1/agreement")
    def agreement(body: AgreementRequest, who: Caller = Depends(caller)):
        """Token-level agreement: of `completion`'s tokens, how many `model` predicts as its top
        token when teacher-forced after `messages`."""
        matched, total = r.agreement(who, [m.model_dump() for m in body.messages], body.completion, model=body.model)
        return {"object": "agreement", "model": body.model, "tokens": total, "matched": matched,
                "agreement": matched / total if total else 1.0}

    return router


def reports_router(r: Ratchet, caller) -> APIRouter:
    router = APIRouter(tags=["reports"])

    @router.get("/v1/reports")
    def reports(who: Caller = Depends(caller)):
        """The learning benchmark's reports (`ratchet eval zsre`) in the server's reports folder, newest first."""
        return {"object": "list", "data": [_report(x) for x in r.learning_reports(who)]}

    @router.get("/v1/reports/{report}/plots/{plot}", response_class=FileResponse,
                responses={200: {"content": {"image/png": {}}, "description": "the plot, a PNG image"}})
    def report_plot(report: Name, plot: Name, who: Caller = Depends(caller)):
        """One plot of a listed report, as its `plots` name it."""
        return FileResponse(r.learning_report_plot(who, report, plot), media_type="image/png",
                            headers={"Cache-Control": "private, no-cache"})

    return router


def _report(x) -> dict:
    return {"name": x.name, "object": "report", "benchmark": "zsre", "title": x.title, "split": x.split, "n": x.n,
            "cycle_every": x.cycle_every, "engine": x.engine, "tiers": x.tiers, "seconds": x.seconds,
            "created_at": x.created_at,
            "plots": [{"name": p, "url": f"/v1/reports/{x.name}/plots/{p}"} for p in x.plots]}


def _adapter(r: Ratchet, v) -> dict:
    return {"version": v.version, "name": v.name, "parent": v.parent, "status": v.status,
            "active": v.name == r.active, "created_at": v.created_at, "metrics": v.metrics}


def _cycle(row: dict) -> dict:
    adapter = row.get("adapter_version")
    return {
        "id": row["id"],
        "object": "consolidation",
        "status": row["status"],
        "trigger": row["trigger"],
        "progress": row["progress"],
        "message": row["message"],
        "adapter_version": adapter,
        "adapter": f"ratchet-v{adapter}" if adapter else None,
        "created_at": row["created_at"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "n_corrections": row["n_corrections"],
        "n_examples": row["n_examples"],
        "metrics": {k: v for k, v in (row["metrics"] or {}).items() if k != "traceback"},
    }


def _error_body(e: Exception) -> tuple[int, dict, dict]:
    """The packages' own exceptions as OpenAI-shaped errors: (status, body, headers)."""
    def shaped(status, message, type="invalid_request_error", code=None, param=None, headers=None):
        return status, {"error": {"message": message, "type": type, "param": param, "code": code}}, headers or {}

    if isinstance(e, UnknownResponse):
        return shaped(404, f"no response with id {e.args[0]!r}", code="response_not_found", param="response_id")
    if isinstance(e, UnknownModel):
        return shaped(404, f"the model {e.args[0]!r} does not exist; see GET /v1/models", code="model_not_found",
                      param="model")
    if isinstance(e, UnknownAdapter):
        return shaped(404, f"no adapter version {e.args[0]}", code="adapter_not_found", param="version")
    if isinstance(e, UnknownCycle):
        return shaped(404, f"no consolidation {e.args[0]}", code="not_found")
    if isinstance(e, UnknownMemory):
        return shaped(404, f"no memory {e.args[0]!r} that you can see", code="memory_not_found")
    if isinstance(e, UnknownFailure):
        return shaped(404, f"no failure {e.args[0]!r}", code="failure_not_found")
    if isinstance(e, UnknownThread):
        return shaped(404, f"you have no thread {e.args[0]!r}", code="thread_not_found")
    if isinstance(e, UnknownReport):
        return shaped(404, f"no report {e.args[0]!r}; see GET /v1/reports", code="report_not_found")
    if isinstance(e, Forbidden):
        return shaped(403, str(e), "permission_error", "admin_required")
    if isinstance(e, NotAllowed):
        return shaped(403, str(e), "permission_error", "not_allowed")
    if isinstance(e, NotServable):
        return shaped(409, str(e), code="adapter_not_servable")
    if isinstance(e, Invalid):
        return shaped(400, str(e), code="invalid_request")
    if isinstance(e, (TooLarge, ThreadFull)):
        return shaped(400, str(e), code="thread_full" if isinstance(e, ThreadFull) else "too_large")
    if isinstance(e, QuotaExceeded):
        return shaped(429, str(e), code="quota_exceeded")
    if isinstance(e, Busy):
        return shaped(429, str(e), "server_error", "busy", headers={"Retry-After": "1"})
    if isinstance(e, EngineUnavailable):
        return shaped(503, str(e), "server_error", "engine_restarting", headers={"Retry-After": "5"})
    if isinstance(e, EngineError):
        if e.__cause__ is not None:  # a failure below the engine (not a refusal of its own): why
            log.warning("the engine failed: %s (%r)", e, e.__cause__.__cause__ or e.__cause__)
        return shaped(503, f"the engine failed: {e}", "server_error", "engine_error")
    if isinstance(e, OpenAIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return shaped(e.status, e.message, e.type, e.code, e.param, headers)
    return shaped(500, f"internal error: {type(e).__name__}", "server_error", "internal_error")


# The exceptions _error_body maps, each to its own status (anything else is a 500).
KNOWN_ERRORS = (UnknownResponse, UnknownModel, UnknownAdapter, UnknownCycle, UnknownMemory, UnknownFailure,
                UnknownThread, UnknownReport, Forbidden, NotAllowed, NotServable, Invalid, TooLarge, ThreadFull, QuotaExceeded, Busy,
                EngineError, OpenAIError)


def _error(e: Exception) -> JSONResponse:
    status, body, headers = _error_body(e)
    return JSONResponse(status_code=status, content=body, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413, declared or not
    (a body sent without a length is read here first, up to the limit, then handed on)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = _error(OpenAIError(413, f"the request body is over {self.limit} bytes", code="body_too_large"))
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.limit:
                return await too_large(scope, receive, send)
            return await self.app(scope, receive, send)  # the server holds the body to its declared length
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _same_origin(request: Request) -> bool:
    """Is this request from this machine's own pages? Its Host a loopback name, and its Origin (when
    a browser sends one) exactly that host: a foreign page (CSRF) or name (DNS rebinding) is not."""
    host = request.headers.get("host", "")
    hostname = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
    if not is_loopback(hostname):
        return False
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == host


# -- the app -------------------------------------------------------------------------------
def create_app(r: Ratchet, *, stop_on_shutdown: bool = False) -> FastAPI:
    """The app over a started Ratchet; with `stop_on_shutdown` the server's shutdown stops it
    (uvicorn re-raises SIGTERM after shutdown, so code after `uvicorn.run` may never run)."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        if stop_on_shutdown:
            r.stop()

    app = FastAPI(title="Ratchet", version="0.1.0", description="An assistant that learns from every correction.",
                  lifespan=lifespan)
    caller = authenticate(r)
    for make in (chat_router, caller_router, feedback_router, memories_router, threads_router, failures_router,
                 consolidations_router, adapters_router, evaluations_router, reports_router):
        app.include_router(make(r, caller))

    @app.get("/health")
    async def health():  # on the event loop: it answers even when every worker thread is busy
        return JSONResponse(status_code=200 if r.ready else 503, content=r.health())

    @app.get("/metrics")
    async def metrics(who: Caller = Depends(caller)):
        return Response(r.metrics_text(who), media_type=CONTENT_TYPE_LATEST)

    @app.middleware("http")
    async def measured(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        r.metrics.observe_request(getattr(route, "path", "unmatched"), request.method, response.status_code,
                                  time.perf_counter() - started)
        return response

    @app.middleware("http")
    async def keyless_only_from_here(request: Request, call_next):
        """Keyless, every caller on loopback is the operator: only this machine's own pages may call."""
        if r.open_to_loopback() and not _same_origin(request):
            return _error(OpenAIError(403, "a keyless Ratchet answers only requests from its own host and origin",
                                      "permission_error", "foreign_origin"))
        return await call_next(request)

    app.add_middleware(BodyLimit, limit=r.settings.limits.body_bytes)

    async def _known(_: Request, e: Exception):
        return _error(e)

    for kind in KNOWN_ERRORS:
        app.add_exception_handler(kind, _known)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):  # still OpenAI-shaped; the traceback goes to the log
        log.error("internal error", exc_info=e)
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(OpenAIError(400, f"invalid request: {first.get('msg', 'bad body')} ({param})",
                                  code="invalid_request", param=param))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException):
        return _error(OpenAIError(e.status_code, str(e.detail)))

    # The web console: static files at / that call only the routes above (serving/console/).
    import pathlib

    from fastapi.staticfiles import StaticFiles

    console = pathlib.Path(__file__).parent / "console"
    app.mount("/console", StaticFiles(directory=console), name="console")
    app.add_api_route("/", lambda: FileResponse(console / "index.html"), include_in_schema=False)
    return app
