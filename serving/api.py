"""The HTTP API: OpenAI-compatible chat, plus feedback, memories, failures, consolidations and adapters.

One router per resource; one place maps exceptions to OpenAI-shaped errors. Who calls is one
dependency (`caller_user`), and admin-only operations go through another (`require_admin`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from memory import Correction, NotAllowed, UnknownFailure, UnknownMemory
from memory.failures import KINDS as FAILURE_KINDS
from memory.store import LOCAL_USER, UnknownResponse
from serving.engines import EngineError
from serving.service import Ratchet, UnknownModel


# -- bodies --------------------------------------------------------------------------------
class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model: str = "ratchet"
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    user: str | None = None
    stream: bool = False
    memory: bool = True  # Ratchet's extension: False answers without retrieval
    thread_id: str | None = None  # Ratchet's extension: the server keeps the thread's history


class FeedbackRequest(BaseModel):
    response_id: str
    rating: Literal[1, -1]
    comment: str | None = None
    correction: str | None = Field(default=None, max_length=4000)
    user: str | None = None


class MemoryRequest(BaseModel):
    question: str = Field(min_length=1, max_length=4000)
    answer: str = Field(min_length=1, max_length=4000)
    shared: bool = False  # shared with every user: admin only
    user: str | None = None


class LessonRequest(BaseModel):
    answer: str = Field(min_length=1, max_length=4000)
    shared: bool = False  # for everyone, rather than for the user whose question failed
    user: str | None = None


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param


# -- who calls -----------------------------------------------------------------------------
async def caller_user(request: Request) -> str:
    """The user a request acts as. With no API keys configured: the `user` query parameter, else
    the `user` field of a JSON body, else `local`. (To be bound to the caller's API key.)"""
    user = request.query_params.get("user")
    if user is None and request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = await request.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("user"), str):
            user = body["user"]
    return user or LOCAL_USER


def caller_is_admin(request: Request) -> bool:
    """For now every caller on loopback is an admin: with no API keys the server listens there only."""
    host = request.client.host if request.client else ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_admin(request: Request) -> None:
    if not caller_is_admin(request):
        raise OpenAIError(403, "this operation is for admins only", "permission_error", "admin_only")


def _memory(c: Correction, score: float | None = None) -> dict:
    out = {"id": c.id, "object": "memory", "question": c.question, "answer": c.answer, "user": c.user,
           "shared": c.shared, "created_at": c.created_at, "retracted_at": c.retracted_at,
           "consolidated_in": c.consolidated_in, "merged": c.merged, "source": c.source}
    if score is not None:
        out["score"] = round(score, 4)
    return out


def _failure(row: dict) -> dict:
    return {"id": row["id"], "object": "failure", "kind": row["kind"], "response_id": row["response_id"],
            "user": row["user"], "detail": row["detail"], "created_at": row["created_at"], "lesson_id": row["lesson_id"],
            "prompt": row.get("prompt"), "response": row.get("response")}


# -- routers -------------------------------------------------------------------------------
def chat_router(r: Ratchet) -> APIRouter:
    router = APIRouter(tags=["chat"])

    @router.post("/v1/chat/completions")
    def chat_completions(body: ChatRequest):
        if body.stream:
            raise OpenAIError(400, "streaming is not supported yet; send stream=false", param="stream")
        reply = r.chat(
            [m.model_dump() for m in body.messages],
            model=body.model,
            user=body.user or LOCAL_USER,
            use_memory=body.memory,
            max_tokens=body.max_completion_tokens or body.max_tokens or r.settings.max_tokens,
            temperature=body.temperature,
            thread_id=body.thread_id,
        )
        return {
            "id": reply.response_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": reply.text},
                 "finish_reason": reply.finish_reason}
            ],
            "usage": {
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "total_tokens": reply.prompt_tokens + reply.completion_tokens,
            },
            "ratchet": {"memories": reply.memories, "adapter": r.adapter_for(body.model), "memory": body.memory},
        }

    @router.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "ratchet"} for m in r.models()]}

    return router


def feedback_router(r: Ratchet) -> APIRouter:
    router = APIRouter(tags=["feedback"])

    @router.post("/v1/feedback", status_code=201)
    def feedback(body: FeedbackRequest):
        feedback_id = r.memory.record_feedback(
            body.response_id, body.rating, comment=body.comment, correction=body.correction, user=body.user
        )
        return {"id": feedback_id, "object": "feedback", "response_id": body.response_id}

    return router


def memories_router(r: Ratchet) -> APIRouter:
    router = APIRouter(tags=["memories"])

    @router.get("/v1/memories")
    def memories(user: str = Depends(caller_user), query: str | None = None,
                 limit: int = Query(20, ge=1, le=200), offset: int = Query(0, ge=0),
                 threshold: float | None = Query(None, ge=-1.0, le=1.0)):
        """With `query`: the caller's visible memories nearest to it (newest-wins applied); without:
        the caller's visible memories, newest first."""
        if query:
            hits = r.memory.search(query, user, k=limit, threshold=r.settings.memory_threshold if threshold is None
                                   else threshold, max_chars=None)
            return {"object": "list", "data": [_memory(h.correction, h.score) for h in hits]}
        return {"object": "list", "data": [_memory(c) for c in r.memory.visible(user, limit=limit, offset=offset)]}

    @router.post("/v1/memories", status_code=201)
    def add_memory(body: MemoryRequest, request: Request, user: str = Depends(caller_user)):
        if body.shared:
            require_admin(request)
        memory_id = r.memory.add_correction(body.question, body.answer, user=None if body.shared else user)
        return _memory(r.memory.get(memory_id, user, admin=True))

    @router.post("/v1/memories/rebuild-index", dependencies=[Depends(require_admin)])
    def rebuild_index():
        started = time.perf_counter()
        n = r.memory.rebuild_index()
        return {"object": "memory.index", "memories": n, "scopes": len(r.memory.index.scopes()),
                "seconds": round(time.perf_counter() - started, 3)}

    @router.get("/v1/memories/{memory_id}")
    def memory(memory_id: int, user: str = Depends(caller_user)):
        return _memory(r.memory.get(memory_id, user))

    @router.delete("/v1/memories/{memory_id}")
    def retract(memory_id: int, request: Request, user: str = Depends(caller_user)):
        """Retract: by the user who gave it, or by an admin (the only way for a shared memory)."""
        try:
            c = r.memory.retract(memory_id, user)
        except (UnknownMemory, NotAllowed):
            if not caller_is_admin(request):
                raise
            c = r.memory.retract(memory_id, user, admin=True)
        return {**_memory(c), "deleted": True}

    return router


def failures_router(r: Ratchet) -> APIRouter:
    router = APIRouter(tags=["failures"], dependencies=[Depends(require_admin)])

    @router.get("/v1/failures")
    def failures(kind: Literal[FAILURE_KINDS] | None = None, user: str | None = None,  # type: ignore[valid-type]
                 open: bool = False, limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0)):
        rows = r.memory.failures(kind=kind, user=user, open_only=open, limit=limit, offset=offset)
        return {"object": "list", "data": [_failure(f) for f in rows]}

    @router.get("/v1/failures/{failure_id}")
    def failure(failure_id: int):
        return _failure(r.memory.failure(failure_id))

    @router.post("/v1/failures/{failure_id}/lesson", status_code=201)
    def lesson(failure_id: int, body: LessonRequest):
        """Turn the failure into a correction of its question with `answer`."""
        memory_id = r.memory.lesson_from_failure(failure_id, body.answer, shared=body.shared)
        return {"object": "lesson", "failure": _failure(r.memory.failure(failure_id)),
                "memory": _memory(r.memory.get(memory_id, None, admin=True))}

    return router


def consolidations_router(r: Ratchet) -> APIRouter:
    router = APIRouter(tags=["consolidations"])

    @router.post("/v1/consolidations", status_code=202)
    def consolidate():
        cycle_id = r.cycles.submit(trigger="api")
        return _cycle(r.cycles.get(cycle_id))

    @router.get("/v1/consolidations")
    def consolidations():
        return {"object": "list", "data": [_cycle(c) for c in r.cycles.list()]}

    @router.get("/v1/consolidations/{cycle_id}")
    def consolidation(cycle_id: int):
        try:
            return _cycle(r.cycles.get(cycle_id))
        except KeyError:
            raise OpenAIError(404, f"no consolidation {cycle_id}", code="not_found")

    return router


def adapters_router(r: Ratchet) -> APIRouter:
    router = APIRouter(tags=["adapters"])

    @router.get("/v1/adapters")
    def adapters():
        return {
            "object": "list",
            "active": r.active,
            "data": [
                {"version": v.version, "name": v.name, "parent": v.parent, "status": v.status,
                 "active": v.name == r.active, "created_at": v.created_at, "metrics": v.metrics}
                for v in r.registry.versions()
            ],
        }

    return router


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
    for make in (chat_router, feedback_router, memories_router, failures_router, consolidations_router,
                 adapters_router):
        app.include_router(make(r))

    @app.get("/health")
    def health():
        return {"status": "ok", "engine": r.engine.name, "active": r.active}

    def error(status: int, message: str, type: str, code=None, param=None) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": type, "param": param,
                                                                    "code": code}})

    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, e: OpenAIError):
        return error(e.status, e.message, e.type, e.code, e.param)

    @app.exception_handler(UnknownResponse)
    async def _unknown_response(_: Request, e: UnknownResponse):
        return error(404, f"no response with id {e.args[0]!r}", "invalid_request_error", "response_not_found",
                     "response_id")

    @app.exception_handler(UnknownMemory)
    async def _unknown_memory(_: Request, e: UnknownMemory):
        return error(404, f"no memory {e.args[0]!r} that you can see", "invalid_request_error", "memory_not_found")

    @app.exception_handler(NotAllowed)
    async def _not_allowed(_: Request, e: NotAllowed):
        return error(403, str(e), "permission_error", "not_allowed")

    @app.exception_handler(UnknownFailure)
    async def _unknown_failure(_: Request, e: UnknownFailure):
        return error(404, f"no failure {e.args[0]!r}", "invalid_request_error", "failure_not_found")

    @app.exception_handler(UnknownModel)
    async def _unknown_model(_: Request, e: UnknownModel):
        return error(404, f"the model {e.args[0]!r} does not exist; see GET /v1/models", "invalid_request_error",
                     "model_not_found", "model")

    @app.exception_handler(EngineError)
    async def _engine(_: Request, e: EngineError):
        return error(503, f"the engine failed: {e}", "server_error", "engine_error")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error(400, f"invalid request: {first.get('msg', 'bad body')} ({param})", "invalid_request_error",
                     "invalid_request", param)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException):
        return error(e.status_code, str(e.detail), "invalid_request_error")

    return app
