"""The one HTTP client of Ratchet's API, for the CLI and the benchmarks: the bearer key from
RATCHET_API_KEY, errors as `ApiError` with the server's message, and a cycle followed to its end."""

from __future__ import annotations

import os
import time
from typing import Callable

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
RUNNING = ("queued", "running")  # a cycle in these states is not finished


class ApiError(RuntimeError):
    """The server answered with an error (`status` is its HTTP status), or could not be reached (0)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}" if status else message)
        self.status, self.message = status, message


class RatchetClient:
    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 600):
        token = api_key if api_key is not None else os.environ.get("RATCHET_API_KEY")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kwargs) -> dict:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise ApiError(0, f"cannot reach {self.url}: {e}") from e
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text
            raise ApiError(r.status_code, message)
        return r.json()

    def get(self, path: str, **params) -> dict:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict | None = None) -> dict:
        return self.request("POST", path, json=body)

    def delete(self, path: str, **params) -> dict:
        return self.request("DELETE", path, params={k: v for k, v in params.items() if v is not None})

    # -- use cases ---------------------------------------------------------------------------
    def chat(self, question: str, *, model: str = "ratchet", memory: bool = True, user: str | None = None,
             thread_id: str | None = None, **extra) -> dict:
        """One question; the whole chat.completion (its `id` is the response id to give feedback on)."""
        body = {"model": model, "messages": [{"role": "user", "content": question}], "memory": memory, **extra}
        body.update({k: v for k, v in (("user", user), ("thread_id", thread_id)) if v is not None})
        return self.post("/v1/chat/completions", body)

    def feedback(self, response_id: str, *, rating: int = -1, correction: str | None = None,
                 comment: str | None = None, user: str | None = None) -> dict:
        body = {"response_id": response_id, "rating": rating, "correction": correction, "comment": comment}
        if user is not None:
            body["user"] = user
        return self.post("/v1/feedback", body)

    def consolidate(self, *, wait: bool = True, poll: float = 1.0, timeout: float = 3600,
                    on_progress: Callable[[dict], None] | None = None) -> dict:
        """Start a consolidation cycle and, with `wait`, follow it until it ends."""
        cycle = self.post("/v1/consolidations")
        if wait:
            cycle = self.follow(cycle, poll=poll, timeout=timeout, on_progress=on_progress)
        return cycle

    def follow(self, cycle: dict, *, poll: float = 1.0, timeout: float = 3600,
               on_progress: Callable[[dict], None] | None = None) -> dict:
        """Poll a cycle until it is no longer queued or running; `on_progress` sees each state."""
        deadline = time.monotonic() + timeout
        while cycle["status"] in RUNNING:
            if time.monotonic() > deadline:
                raise TimeoutError(f"consolidation {cycle['id']} still {cycle['status']} after {timeout:.0f} s")
            time.sleep(poll)
            cycle = self.get(f"/v1/consolidations/{cycle['id']}")
            if on_progress:
                on_progress(cycle)
        return cycle

    def close(self) -> None:
        self.http.close()


def answer_text(reply: dict) -> str:
    return reply["choices"][0]["message"]["content"]
