"""The agent's graph: retrieve → respond → record.

A typed state, one plain function per node, one function that builds the graph. With a
checkpointer and a thread id the conversation's history is kept between calls.
"""

from __future__ import annotations

import logging
import operator
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Iterator, TypedDict

from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph

from agent.protocol import ChatModel, Completion
from agent.repair import repaired, same_question_memory
from memory import Memory
from memory.store import RELEVANCE_THRESHOLD
from memory.text import with_memories

log = logging.getLogger("ratchet.agent")


class ChatState(TypedDict, total=False):
    messages: Annotated[list[dict], operator.add]  # the conversation; a thread's grows
    user: str
    use_memory: bool
    adapter: str | None  # the adapter to answer with; None is the base model (after retrieve: what answers)
    model_name: str  # what the client asked for, recorded with the interaction
    max_tokens: int
    temperature: float
    thread_id: str | None
    stream: bool  # respond token by token, through LangGraph's custom stream ({"delta": text})
    memories: list[dict]
    completion: dict
    latency_ms: float
    retrieval_ms: float
    response_id: str


@dataclass
class Reply:
    response_id: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    memories: list[dict] = field(default_factory=list)
    latency_ms: float = 0.0  # the engine's answer
    retrieval_ms: float = 0.0  # embedding the question and searching the memory
    adapter: str | None = None  # what answered; None is the base model


def build_graph(memory: Memory, model: ChatModel, *, k: int = 3, threshold: float = RELEVANCE_THRESHOLD,
                scope: float | None = None, checkpointer=None):
    """`scope`: when set, the adapter answers only questions at least this similar to a stored
    correction (memory.store.ADAPTER_SCOPE); the base model answers the rest."""

    def retrieve(state: ChatState) -> dict:
        question = _last_user_message(state["messages"])
        use_memory = state.get("use_memory", True)
        scoped = scope is not None and state.get("adapter") is not None
        if not question or not (use_memory or scoped):
            return {"memories": [], "retrieval_ms": 0.0}
        started = time.perf_counter()
        # One search serves both: the hits above the relevance threshold are a prefix of those
        # above a lower scope.
        floor = min(threshold, scope) if scoped else threshold
        hits = memory.search(question, user=state.get("user"), k=k, threshold=floor)
        out = {
            "retrieval_ms": (time.perf_counter() - started) * 1000,
            "memories": [
                {"id": h.correction.id, "question": h.correction.question, "answer": h.correction.answer,
                 "score": round(h.score, 4)}
                for h in hits if use_memory and h.score >= threshold
            ]
        }
        if scoped and not any(h.score >= scope for h in hits):
            out["adapter"] = None  # out of the adapter's scope: the base model answers
        return out

    def respond(state: ChatState) -> dict:
        memories = state.get("memories", [])
        prompt = with_memories(state["messages"], memories)
        started = time.perf_counter()
        options = dict(adapter=state.get("adapter"), max_tokens=state.get("max_tokens", 256),
                       temperature=state.get("temperature", 0.0))
        # Verify and repair (agent.repair): with a memory of the very question asked, the answer is
        # checked before anyone sees it, so a stream then sends the checked answer in one piece.
        same = same_question_memory(memories)
        if state.get("stream") and hasattr(model, "stream") and same is None:
            write = get_stream_writer()
            completion = None
            for item in model.stream(prompt, **options):  # text pieces, then the whole Completion
                if isinstance(item, str):
                    write({"delta": item})
                else:
                    completion = item
        else:
            completion = model.complete(prompt, **options)
            fixed = repaired(completion, same, _last_user_message(state["messages"]))
            if fixed is not None:
                log.info("answer replaced by memory %s, which it ignored: %r", same.get("id"), completion.text[:80])
                completion = fixed
            if state.get("stream") and hasattr(model, "stream"):
                get_stream_writer()({"delta": completion.text})
        return {
            "messages": [{"role": "assistant", "content": completion.text}],
            "completion": {**completion.__dict__, "prompt": prompt},
            "latency_ms": (time.perf_counter() - started) * 1000,
        }

    def record(state: ChatState) -> dict:
        response_id = state.get("response_id") or new_response_id()
        c = state["completion"]
        memory.record_interaction(
            id=response_id,
            thread_id=state.get("thread_id"),
            user=state.get("user"),
            model=state.get("model_name"),
            adapter=state.get("adapter"),
            prompt=_last_user_message(state["messages"]),
            messages=c["prompt"],
            response=c["text"],
            memory_ids=[m["id"] for m in state.get("memories", [])],
            use_memory=int(state.get("use_memory", True)),
            prompt_tokens=c["prompt_tokens"],
            completion_tokens=c["completion_tokens"],
            latency_ms=state.get("latency_ms"),
        )
        # Failures nobody reports: an abstention, an answer against an active correction, the
        # same question asked again. Recording them must never cost the user the answer.
        try:
            memory.detect_failures(response_id, state.get("memories") if state.get("use_memory", True) else None)
        except Exception:
            log.exception("could not check %s for failures", response_id)
        return {"response_id": response_id}

    graph = StateGraph(ChatState)
    graph.add_node("retrieve", retrieve)
    graph.add_node("respond", respond)
    graph.add_node("record", record)
    graph.add_edge(START, "retrieve")
    graph.add_edge("retrieve", "respond")
    graph.add_edge("respond", "record")
    graph.add_edge("record", END)
    return graph.compile(checkpointer=checkpointer)


class Agent:
    """Answers chats through the graph: stateless calls, or threads kept by the checkpointer."""

    def __init__(self, memory: Memory, model: ChatModel, *, k: int = 3, threshold: float = RELEVANCE_THRESHOLD,
                 scope: float | None = None, checkpointer=None):
        self.stateless = build_graph(memory, model, k=k, threshold=threshold, scope=scope)
        self.threaded = build_graph(memory, model, k=k, threshold=threshold, scope=scope, checkpointer=checkpointer)
        self.has_threads = checkpointer is not None

    def chat(self, messages: list[dict], **options) -> Reply:
        """With `thread_id`, `messages` are the new turns; the thread's earlier turns come from the checkpointer."""
        graph, inputs, config = self._run(messages, **options)
        return _reply(graph.invoke(inputs, config))

    def stream(self, messages: list[dict], **options) -> Iterator[str | Reply]:
        """As `chat`, but yields the answer's text as it is generated, then the Reply."""
        graph, inputs, config = self._run(messages, stream=True, **options)
        state = None
        for mode, chunk in graph.stream(inputs, config, stream_mode=["custom", "values"]):
            if mode == "custom":
                yield chunk["delta"]
            else:
                state = chunk
        yield _reply(state)

    def _run(
        self,
        messages: list[dict],
        *,
        user: str | None = None,
        use_memory: bool = True,
        adapter: str | None = None,
        model_name: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        thread_id: str | None = None,
        response_id: str | None = None,
        stream: bool = False,
    ):
        if thread_id is not None and not self.has_threads:
            raise ValueError("this agent has no checkpointer, so it keeps no threads")
        inputs: ChatState = {
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "user": user,
            "use_memory": use_memory,
            "adapter": adapter,
            "model_name": model_name,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "thread_id": thread_id,
            "stream": stream,
            "response_id": response_id or new_response_id(),  # known before the answer, for streams
        }
        if thread_id is None:
            return self.stateless, inputs, None
        return self.threaded, inputs, {"configurable": {"thread_id": thread_id}}


def new_response_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _reply(state: dict) -> Reply:
    c = Completion(**{k: v for k, v in state["completion"].items() if k != "prompt"})
    return Reply(
        response_id=state["response_id"],
        text=c.text,
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        finish_reason=c.finish_reason,
        memories=state.get("memories", []),
        latency_ms=state.get("latency_ms", 0.0),
        adapter=state.get("adapter"),
        retrieval_ms=state.get("retrieval_ms", 0.0),
    )


def _last_user_message(messages: list[dict]) -> str:
    for m in reversed(messages):
        if m["role"] == "user":
            return m["content"] if isinstance(m["content"], str) else str(m["content"])
    return ""
