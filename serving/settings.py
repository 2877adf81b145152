"""The one settings object; every part gets its piece of it from here.

Values come from arguments, else from RATCHET_* environment variables, else the defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from memory import ADAPTER_SCOPE, LOCAL_USER, RELEVANCE_THRESHOLD
from memory.matcher import SAME_QUESTION_PROBABILITY
from serving.engines.vllm import VLLMOptions
from trainer.anchors import BUILT_IN_ANCHORS, load_prompts
from trainer.base_model import EMBEDDED
from trainer.cycle import CycleConfig
from trainer.lora import TrainingConfig
from trainer.schedule import ScheduleConfig


def default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "ratchet"


def default_embedder_dir() -> Path:
    """RATCHET_MODELS_DIR when set (one folder for every prepared model), else the user's cache."""
    env = os.environ.get("RATCHET_MODELS_DIR")
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ratchet"


@dataclass
class Limits:
    """What one request, one thread and one user may use, so no caller can exhaust the server."""

    body_bytes: int = 1_000_000  # a request body, at most (413 beyond)
    messages: int = 64  # messages in one chat request
    message_chars: int = 16_000  # characters in one message (question, memory answer, lesson)
    note_chars: int = 4_000  # characters of a comment or correction
    thread_messages: int = 200  # messages a thread may hold (then: a new thread, or delete this one)
    history_messages: int = 40  # a thread's latest messages sent to the model
    memories_per_user: int = 10_000  # live memories one user may keep (429 beyond)
    concurrent_requests: int = 32  # chats and streams answered at once; more get 429 with Retry-After

    def __post_init__(self):
        for name, value in self.__dict__.items():
            if value < 1:
                raise ValueError(f"Ratchet settings: limits.{name} must be at least 1")


@dataclass
class Settings:
    data_dir: Path = field(default_factory=default_data_dir)
    model: str = EMBEDDED  # "embedded", an HF model id, or a local folder
    models_dir: Path | None = None  # where the embedded model is prepared; default data_dir/models
    embedder_dir: Path = field(default_factory=default_embedder_dir)  # where the query encoder's ONNX export is kept
    engine: str = "vllm"  # "vllm" | "transformers"
    host: str = "127.0.0.1"
    port: int = 8000
    memory_k: int = 3  # corrections put into a prompt at most
    memory_threshold: float = RELEVANCE_THRESHOLD  # cosine similarity a correction needs to be retrieved
    # The active adapter answers questions this similar to a stored correction, the base model the
    # rest (agent.graph.build_graph); 0: the adapter answers everything (RATCHET_ADAPTER_SCOPE=off).
    adapter_scope: float = ADAPTER_SCOPE
    # A correction is shown, or puts a question in the adapter's scope, only when the same-question
    # model (memory.matcher) finds it at least this likely to be the question asked; 0: cosine
    # similarity alone, no model loaded (RATCHET_SAME_QUESTION=off).
    same_question: float = SAME_QUESTION_PROBABILITY
    max_tokens: int = 256  # default completion length
    # The active adapter also served merged into the weights by a second, plain vLLM (a blue/green
    # pair with the LoRA engine): see serving/engines/lanes.py and reports/serving.md.
    merged_lane: bool = False
    # Whose corrections enter the shared adapter without an admin's confirmation (admin-key
    # users always do). Others stay in their own memory. Default: the keyless local user.
    trusted_users: tuple[str, ...] = (LOCAL_USER,)
    monitor_interval: float = 2.0  # seconds between checks that the engine is alive; 0: no monitor
    # Where `ratchet eval zsre` wrote its reports (zsre-*/), shown to admins; relative to the working directory.
    reports_dir: Path = Path("reports")
    limits: Limits = field(default_factory=lambda: Limits())
    vllm: VLLMOptions = field(default_factory=VLLMOptions)
    cycle: CycleConfig = field(default_factory=CycleConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self):
        from serving.engines import ENGINES

        self.data_dir = Path(self.data_dir).expanduser()
        self.models_dir = Path(self.models_dir).expanduser() if self.models_dir else self.data_dir / "models"
        self.embedder_dir = Path(self.embedder_dir).expanduser()
        self.reports_dir = Path(self.reports_dir).expanduser()
        problems = [
            (self.engine not in ENGINES, f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}"),
            (not 0 <= self.port <= 65535, f"port must be between 0 and 65535, not {self.port}"),
            (self.memory_k < 0, "memory_k (corrections in a prompt) cannot be negative"),
            (not -1 <= self.memory_threshold <= 1, "memory_threshold is a cosine similarity, between -1 and 1"),
            (not 0 <= self.adapter_scope <= 1, "adapter_scope is a cosine similarity between 0 and 1 (0: no scope)"),
            (not 0 <= self.same_question <= 1, "same_question is a probability between 0 and 1 (0: cosine similarity alone)"),
            (self.max_tokens < 1, "max_tokens must be at least 1"),
            (self.monitor_interval < 0, "monitor_interval cannot be negative (0: no monitor)"),
        ]
        for bad, why in problems:
            if bad:
                raise ValueError(f"Ratchet settings: {why}")

    @classmethod
    def load(cls, **overrides) -> "Settings":
        """Settings from RATCHET_* variables, with `overrides` (None values ignored) on top."""
        env = {
            "data_dir": os.environ.get("RATCHET_DATA_DIR"),
            "model": os.environ.get("RATCHET_MODEL"),
            "models_dir": os.environ.get("RATCHET_MODELS_DIR"),
            "engine": os.environ.get("RATCHET_ENGINE"),
            "host": os.environ.get("RATCHET_HOST"),
            "port": _int(os.environ.get("RATCHET_PORT")),
            "memory_threshold": _float(os.environ.get("RATCHET_MEMORY_THRESHOLD")),
            "adapter_scope": _scope(os.environ.get("RATCHET_ADAPTER_SCOPE")),
            "same_question": _scope(os.environ.get("RATCHET_SAME_QUESTION")),
            "trusted_users": _names(os.environ.get("RATCHET_TRUSTED_USERS")),
            "merged_lane": _bool(os.environ.get("RATCHET_MERGED_LANE")),
            "reports_dir": os.environ.get("RATCHET_REPORTS_DIR"),
        }
        every = overrides.pop("consolidate_every", None) or os.environ.get("RATCHET_CONSOLIDATE_EVERY")
        after = overrides.pop("consolidate_after", None) or _int(os.environ.get("RATCHET_CONSOLIDATE_AFTER"))
        # An option left unset (None) keeps the variable's value; one that is set wins over it.
        values = {k: v for k, v in env.items() if v is not None}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "vllm" not in values:
            values["vllm"] = VLLMOptions.from_env()
        cycle = {}
        if os.environ.get("RATCHET_ANCHOR_PROMPTS"):
            extra = load_prompts(os.environ["RATCHET_ANCHOR_PROMPTS"])
            cycle["anchor_prompts"] = tuple(dict.fromkeys(BUILT_IN_ANCHORS + extra))
        if os.environ.get("RATCHET_REPLAY_PASSES"):
            cycle["training"] = TrainingConfig(replay_passes=_int(os.environ["RATCHET_REPLAY_PASSES"]))
        if "cycle" not in values and cycle:
            values["cycle"] = CycleConfig(**cycle)
        return cls(**values, schedule=ScheduleConfig(every=every, after_corrections=after))


def _names(v: str | None) -> tuple[str, ...] | None:
    return tuple(n.strip() for n in v.split(",") if n.strip()) if v is not None else None


def _int(v: str | None) -> int | None:
    return int(v) if v else None


def _bool(v: str | None) -> bool | None:
    return v.lower() in ("1", "true", "yes", "on") if v else None


def _scope(v: str | None) -> float | None:
    if not v:
        return None
    return 0.0 if v.lower() in ("off", "none") else float(v)


def _float(v: str | None) -> float | None:
    return float(v) if v else None
