"""The agent's graph: retrieve → respond → record.

A typed state, one plain function per node, one function that builds the graph. With a
checkpointer and a thread id the conversation's history is kept between calls.
"""

from __future__ import annotations

import json
import logging
import operator
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Iterator, TypedDict

from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph

from agent.protocol import ChatModel, Completion
from agent.repair import repaired, same_question_memory, steered
from memory import Memory
from memory import RELEVANCE_THRESHOLD
from memory.matcher import CANDIDATE_SIMILARITY
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
    # corrections that may change this answer: the memories shown, and those that put the question
    # in the adapter's scope (agent.repair.steered)
    in_play: list[dict]
    completion: dict
    latency_ms: float
    retrieval_ms: float
    response_id: str
    recorded: bool  # the answer is stored already (a stream cut short records itself)


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
                scope: float | None = None, same: float | None = None, checkpointer=None, history: int = 40,
                cancelled: set[str] | None = None):
    """`scope`: when set, the adapter answers only questions at least this similar to a stored
    correction (memory.ADAPTER_SCOPE); the base model answers the rest. `same`: a correction is
    shown, or puts the question in the adapter's scope, only when the memory's matcher finds it
    at least this likely to be the question asked, and then already from a similarity of
    memory.matcher.CANDIDATE_SIMILARITY (None: similarity alone, from `threshold`).
    `history`: a thread's latest messages sent to the model, at most. `cancelled`: response ids
    whose client has gone: a streamed answer stops where it is and is recorded as it is."""
    cancelled = set() if cancelled is None else cancelled

    def retrieve(state: ChatState) -> dict:
        question = _last_user_message(state["messages"])
        use_memory = state.get("use_memory", True)
        scoped = scope is not None and state.get("adapter") is not None
        if not question or not (use_memory or scoped):
            return {"memories": [], "in_play": [], "retrieval_ms": 0.0}
        started = time.perf_counter()
        # One search serves both: the hits above the relevance threshold are a prefix of those
        # above a lower scope. With a matcher, it decides which candidates are the question.
        floor = min([threshold] + ([scope] if scoped else []) + ([CANDIDATE_SIMILARITY] if same else []))
        hits = memory.search(question, user=state.get("user"), k=k, threshold=floor, same_at=same)
        out = {
            "retrieval_ms": (time.perf_counter() - started) * 1000,
            "memories": [
                {"id": h.correction.id, "question": h.correction.question, "answer": h.correction.answer,
                 "score": round(h.score, 4), **({} if h.same is None else {"same": h.same})}
                for h in hits if use_memory and (h.score >= threshold or h.same is not None)
            ]
        }
        in_scope = [{"id": h.correction.id, "answer": h.correction.answer} for h in hits if scoped and h.score >= scope]
        if scoped and not in_scope:
            out["adapter"] = None  # out of the adapter's scope: the base model answers
        out["in_play"] = out["memories"] + [c for c in in_scope if c["id"] not in {m["id"] for m in out["memories"]}]
        return out

    def respond(state: ChatState) -> dict:
        memories = state.get("memories", [])
        prompt = with_memories(_latest(state["messages"], history), memories)
        started = time.perf_counter()
        options = dict(adapter=state.get("adapter"), max_tokens=state.get("max_tokens", 256),
                       temperature=state.get("temperature", 0.0))
        # Verify and repair (agent.repair): an answer a correction may have changed is checked
        # before anyone sees it, so a stream then sends the checked answer in one piece.
        same = same_question_memory(memories)
        in_play = state.get("in_play", [])
        answered_by = {}
        if state.get("stream") and same is None and not in_play:
            write = get_stream_writer()
            completion = None
            pieces, sent = model.stream(prompt, **options), []  # text pieces, then the whole Completion
            for item in pieces:
                if not isinstance(item, str):
                    completion = item
                    continue
                write({"delta": item})
                sent.append(item)
                if state["response_id"] in cancelled:  # the client went away: the run ends after this node
                    pieces.close()  # the engine stops generating
                    cancelled.discard(state["response_id"])
                    completion = Completion(text="".join(sent).strip(), completion_tokens=len(sent),
                                            finish_reason="cancelled")
                    _record(memory, {**state, "completion": {**completion.__dict__, "prompt": prompt},
                                     "latency_ms": (time.perf_counter() - started) * 1000})
                    return {"recorded": True}
        else:
            completion = model.complete(prompt, **options)
            question = _last_user_message(state["messages"])
            fixed = repaired(completion, same, question)
            if fixed is not None:
                log.info("answer replaced by memory %s, which it ignored: %r", same.get("id"), completion.text[:80])
                completion = fixed
            elif steered(completion, in_play, question):
                # changed by corrections it does not give: the base model answers, shown none of them
                prompt = _latest(state["messages"], history)
                completion = model.complete(prompt, **{**options, "adapter": None})
                answered_by = {"adapter": None}
            if state.get("stream"):
                get_stream_writer()({"delta": completion.text})
        return {
            "messages": [{"role": "assistant", "content": completion.text}],
            "completion": {**completion.__dict__, "prompt": prompt},
            "latency_ms": (time.perf_counter() - started) * 1000,
            **answered_by,
        }

    def record(state: ChatState) -> dict:
        if not state.get("recorded"):
            _record(memory, state)
        return {}

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
                 scope: float | None = None, same: float | None = None, checkpointer=None, history: int = 40,
                 max_thread: int = 200):
        """`history`: a thread's latest messages sent to the model; `max_thread`: messages a thread
        may hold (ThreadFull beyond: start a new one, or delete it)."""
        self._cancelled: set[str] = set()
        options = dict(k=k, threshold=threshold, scope=scope, same=same, history=history, cancelled=self._cancelled)
        self.stateless = build_graph(memory, model, **options)
        self.threaded = build_graph(memory, model, checkpointer=checkpointer, **options)
        self.checkpointer = checkpointer
        self.max_thread = max_thread

    def chat(self, messages: list[dict], **options) -> Reply:
        """With `thread_id`, `messages` are the new turns; the thread's earlier turns come from the checkpointer."""
        graph, inputs, config = self._run(messages, **options)
        return _reply(graph.invoke(inputs, config))

    def stream(self, messages: list[dict], **options) -> Iterator[str | Reply]:
        """As `chat`, but yields the answer's text as it is generated, then the Reply. Closed
        early (the client went away), the answer stops and what was generated is recorded."""
        graph, inputs, config = self._run(messages, stream=True, **options)
        state, chunks = None, graph.stream(inputs, config, stream_mode=["custom", "values"])
        try:
            for mode, chunk in chunks:
                if mode == "custom":
                    yield chunk["delta"]
                else:
                    state = chunk
        except GeneratorExit:
            self._cancelled.add(inputs["response_id"])
            raise
        finally:
            chunks.close()  # the graph stops at the next piece and records the answer so far
            self._cancelled.discard(inputs["response_id"])
        yield _reply(state)

    def delete_thread(self, user: str | None, thread_id: str) -> bool:
        """Forget a thread of `user`'s; False when there was none."""
        config = {"configurable": {"thread_id": _thread_key(user, thread_id)}}
        if self.checkpointer is None or not self.threaded.get_state(config).values:
            return False
        self.checkpointer.delete_thread(_thread_key(user, thread_id))
        return True

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
        if thread_id is not None and self.checkpointer is None:
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
        config = {"configurable": {"thread_id": _thread_key(user, thread_id)}}  # each user's threads are their own
        held = len(self.threaded.get_state(config).values.get("messages", []))
        if held + len(messages) + 1 > self.max_thread:
            raise ThreadFull(f"thread {thread_id!r} holds {held} messages, the most a thread may hold is "
                             f"{self.max_thread}: start a new thread, or delete this one")
        return self.threaded, inputs, config


def _record(memory: Memory, state: ChatState) -> None:
    """Store the answer under its response id, and look at it for failures nobody reports: an
    abstention, an answer against an active correction, the same question asked again (checking
    must never cost the user the answer)."""
    c = state["completion"]
    memory.interactions.record(
        id=state["response_id"],
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
    try:
        memory.failures.detect(state["response_id"], state.get("memories") if state.get("use_memory", True) else None)
    except Exception:
        log.exception("could not check %s for failures", state["response_id"])


class ThreadFull(ValueError):
    """A thread holds as many messages as it may."""


def _thread_key(user: str | None, thread_id: str) -> str:
    """The checkpointer's key of a user's thread: the same thread id from two users is two threads."""
    return json.dumps([user, thread_id])


def _latest(messages: list[dict], n: int) -> list[dict]:
    """The last `n` messages, and the system message first if the conversation has one."""
    if len(messages) <= n:
        return messages
    system = [m for m in messages[:1] if m["role"] == "system"]
    return system + messages[-(n - len(system)):]


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
