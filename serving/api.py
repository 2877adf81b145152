"""The HTTP API: OpenAI-compatible chat, plus feedback, consolidations and adapters.

One router per resource; one place maps exceptions to OpenAI-shaped errors.
"""

from __future__ import annotations

import contextlib
import time
from typing import Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

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


class AgreementRequest(BaseModel):
    model: str = "ratchet"
    messages: list[Message] = Field(min_length=1)
    completion: str = Field(min_length=1)


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param


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
            "ratchet": {"memories": reply.memories, "adapter": r.adapter_for(body.model), "memory": body.memory,
                        "retrieval_ms": round(reply.retrieval_ms, 2), "engine_ms": round(reply.latency_ms, 2)},
        }

    @router.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "ratchet"} for m in r.models()]}

    return router


def feedback_router(r: Ratchet) -> APIRouter:
    router = APIRouter(tags=["feedback"])

    @router.post("/v1/feedback", status_code=201)
    def feedback(body: FeedbackRequest):
        feedback_id = r.feedback(
            body.response_id, body.rating, comment=body.comment, correction=body.correction, user=body.user
        )
        return {"id": feedback_id, "object": "feedback", "response_id": body.response_id}

    return router


def consolidations_router(r: Ratchet) -> APIRouter:
    router = APIRouter(tags=["consolidations"])

    @router.post("/v1/consolidations", status_code=202)
    def consolidate():
        cycle_id = r.cycles.submit(trigger="api")
        return _cycle(r.cycles.get(cycle_id))

    @router.get("/v1/consolidations")
    def consolidations():
        schedule = {"every": r.schedule.config.every, "after_corrections": r.schedule.config.after_corrections,
                    "next_run": r.schedule.next_run()}
        return {"object": "list", "schedule": schedule, "data": [_cycle(c) for c in r.cycles.list()]}

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


def evaluations_router(r: Ratchet) -> APIRouter:
    router = APIRouter(tags=["evaluations"])

    @router.post("/v1/agreement")
    def agreement(body: AgreementRequest):
        """Token-level agreement: of `completion`'s tokens, how many `model` predicts as its top
        token when teacher-forced after `messages`."""
        matched, total = r.agreement([m.model_dump() for m in body.messages], body.completion, model=body.model)
        return {"object": "agreement", "model": body.model, "tokens": total, "matched": matched,
                "agreement": matched / total if total else 1.0}

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
    for make in (chat_router, feedback_router, consolidations_router, adapters_router, evaluations_router):
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
