"""Consolidation cycles: the corrections not yet in the weights → examples (+ replay anchors)
→ a LoRA adapter → a registered version → handed to whoever serves it.

One cycle runs at a time, in a worker thread; each is a row in `cycles` that tells its status
and progress. A cycle that a crash interrupted is marked failed on the next start and its
half-written adapter folder is removed.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import resource
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Callable

from memory import Correction, Memory
from memory.db import atomic, now
from trainer.anchors import BUILT_IN_ANCHORS, base_answers
from trainer.dataset import TEMPLATES, Example, examples_for, memory_examples
from trainer.gate import FORGETTING, GateConfig, GateReport, run_gate
from trainer.lora import TrainingConfig, train_lora
from trainer.neighbours import ANCHOR_TEMPLATES, anchor_questions
from trainer.registry import AdapterRegistry, AdapterStatus, AdapterVersion, adapter_name

log = logging.getLogger("ratchet.cycles")


class CycleStatus(StrEnum):
    """Where a cycle is: a str, so the stored strings and the HTTP API are these values."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # promoted a new version, or found nothing to learn
    REJECTED = "rejected"  # trained a candidate the gate refused
    FAILED = "failed"  # an error, or interrupted by a restart


UNFINISHED = (CycleStatus.QUEUED, CycleStatus.RUNNING)


@dataclass
class CycleConfig:
    """What a consolidation cycle trains on and how its candidate is judged."""

    training: TrainingConfig = field(default_factory=TrainingConfig)
    templates: int = 2  # phrasings of each correction's question trained on (dataset.TEMPLATES)
    anchors: bool = True  # replay the base model's answers to general prompts
    # The prompts replayed; RATCHET_ANCHOR_PROMPTS adds a file of them (prompts like the users'
    # own questions keep those answers in place best: see reports/consolidation/report.md).
    anchor_prompts: tuple[str, ...] = BUILT_IN_ANCHORS
    anchor_tokens: int = 16  # length of those replayed answers (shorter: cheaper steps)
    # Neighbour anchors: per subject of a new correction, this many other questions about it
    # (trainer.neighbours.ANCHOR_TEMPLATES) trained towards the base model's answers, so that the
    # adapter changes the corrected answer and not everything it says about the subject; 0: none
    # (2 leaks a quarter as often as none: reports/consolidation/neighbours.md).
    neighbour_anchors: int = 2
    continue_from_active: bool = True  # start from the active adapter (else retrain from the base)
    # Earlier corrections replayed per new one, when continuing, so that they are not forgotten
    # (see reports/consolidation/report.md).
    replay_earlier: float = 3.0
    # ... and at least this many (all while there are fewer), however few the new ones: with fewer
    # than ~420 replayed, cycles 6-8 of an N=1000 run lost 3-5% of them to the gate's negative-flip
    # bar, and replaying all cost less than a retry (reports/zsre-report-n1000-k100-2026-12-06b/notes.md).
    replay_at_least: int = 512
    # Examples that keep the adapter reading retrieved memories (dataset.memory_examples): one per
    # new correction (per live correction when retraining from the base).
    memory_examples: bool = True
    # A candidate the gate rejects for forgetting alone (retention, negative flips) is trained once
    # more from the same start with every earlier correction replayed; the first stays, rejected.
    retry_forgetting: bool = True
    gate_enabled: bool = True
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self):
        if not 1 <= self.templates <= len(TEMPLATES):
            raise ValueError(f"templates must be between 1 and {len(TEMPLATES)} (got {self.templates}): "
                             f"there are {len(TEMPLATES)} phrasings (trainer.dataset.TEMPLATES)")
        if self.replay_earlier < 0:
            raise ValueError(f"replay_earlier must not be negative (got {self.replay_earlier}): "
                             "it is how many earlier corrections are replayed per new one")
        if self.replay_at_least < 0:
            raise ValueError(f"replay_at_least must not be negative (got {self.replay_at_least}): "
                             "it is how many earlier corrections are replayed at the least")
        if not 0 <= self.neighbour_anchors <= len(ANCHOR_TEMPLATES):
            raise ValueError(f"neighbour_anchors must be between 0 and {len(ANCHOR_TEMPLATES)} (got "
                             f"{self.neighbour_anchors}): it is how many of trainer.neighbours.ANCHOR_TEMPLATES "
                             "are asked per subject")
        if self.anchor_tokens < 1:
            raise ValueError(f"anchor_tokens must be at least 1 (got {self.anchor_tokens}): "
                             "an anchor without an answer teaches nothing")


class Cycles:
    def __init__(
        self,
        memory: Memory,
        registry: AdapterRegistry,
        base_model: str,
        config: CycleConfig,
        work_dir: str | Path,
        on_promote: Callable[[AdapterVersion], None],
        admits: Callable[[Correction], bool] = lambda c: True,
        on_candidate: Callable[[str | None, Path | None], None] = lambda name, folder: None,
    ):
        self.memory = memory
        self.db = memory.db
        self.registry = registry
        self.base_model = base_model
        self.config = config
        self.work_dir = Path(work_dir)
        self.on_promote = on_promote
        self.admits = admits  # which corrections may enter the shared adapter (trust)
        # Told of a trained candidate (name, folder) while its gate runs, so that whoever serves
        # can get ready for it, and (None, None) when a cycle ends without promoting it.
        self.on_candidate = on_candidate
        self._queue: queue.Queue[int] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.recover()

    # -- the public face -----------------------------------------------------------------
    def submit(self, trigger: str = "api") -> int:
        """Queue a cycle; returns its id at once."""
        with atomic(self.db):
            cycle_id = self.db["cycles"].insert(
                {"status": CycleStatus.QUEUED.value, "trigger": trigger, "created_at": now(), "progress": 0.0}
            ).last_pk
        self._queue.put(cycle_id)
        self._ensure_worker()
        return cycle_id

    def corrections(self) -> list[Correction]:
        """The live corrections this adapter may learn: those `admits` lets in."""
        return self.memory.corrections.live(admits=self.admits)

    def pending(self) -> list[Correction]:
        """Admitted corrections not yet in the weights."""
        return [c for c in self.corrections() if c.consolidated_in is None]

    def busy(self) -> bool:
        """Is a cycle queued or running?"""
        return self.db.execute("select count(*) from cycles where status in (?, ?)", UNFINISHED).fetchone()[0] > 0

    def get(self, cycle_id: int) -> dict:
        rows = list(self.db["cycles"].rows_where("id = ?", [cycle_id]))
        if not rows:
            raise KeyError(f"no cycle {cycle_id}")
        row = rows[0]
        row["status"] = CycleStatus(row["status"])
        row["metrics"] = json.loads(row["metrics"] or "{}")
        return row

    def list(self) -> list[dict]:
        return [self.get(r["id"]) for r in self.db["cycles"].rows_where(order_by="id desc", select="id")]

    def wait(self, cycle_id: int, timeout: float = 3600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.get(cycle_id)
            if row["status"] not in UNFINISHED:
                return row
            time.sleep(0.2)
        raise TimeoutError(f"cycle {cycle_id} still {row['status']} after {timeout} s")

    def recover(self) -> None:
        """After a crash: interrupted cycles are failed, unregistered adapter folders removed."""
        with atomic(self.db):
            self.db.execute(
                "update cycles set status = ?, finished_at = ?, message = 'interrupted by a restart'"
                " where status in (?, ?)",
                [CycleStatus.FAILED, now(), *UNFINISHED],
            )
        known = {v.version for v in self.registry.versions()}
        for folder in self.registry.root.glob("v[0-9]*"):
            if folder.name[1:].isdigit() and int(folder.name[1:]) not in known:
                self.registry.discard(int(folder.name[1:]))

    # -- the work ------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        with self._start_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="ratchet-cycles", daemon=True)
                self._worker.start()

    def _work(self) -> None:
        while True:
            self.run(self._queue.get())

    def _update(self, cycle_id: int, **fields) -> None:
        if "metrics" in fields:
            fields["metrics"] = json.dumps(fields["metrics"], default=str)
        with atomic(self.db):
            self.db["cycles"].update(cycle_id, fields)

    def plan(self, corrections: list[Correction], new: list[Correction],
             replay_all: bool = False) -> tuple[list[Example], dict]:
        """The training set of a cycle, and where training starts.

        Continuing the active adapter: the new corrections, a sample of earlier ones (replay;
        `replay_all`: every one), and the anchors. From the base model (no active adapter,
        continuation off, or a consolidated correction retracted since the active version was
        made): every live correction + anchors.
        """
        cfg = self.config
        templates = TEMPLATES[: cfg.templates]
        active = self.registry.active()
        unlearn = self.memory.corrections.to_unlearn()
        retracted = active is not None and bool(unlearn)
        init = active.path if (active is not None and cfg.continue_from_active and not retracted) else None
        earlier = [c for c in corrections if c.consolidated_in is not None]
        if init is None:
            examples = examples_for(corrections, templates)
            replayed = 0
        else:
            rng = random.Random(cfg.training.seed + len(corrections))
            k = len(earlier) if replay_all else min(len(earlier), max(round(cfg.replay_earlier * len(new)),
                                                                      cfg.replay_at_least))
            replay = rng.sample(earlier, k) if k else []
            examples = examples_for(new, templates) + [replace(e, replayed=True) for e in examples_for(replay, templates[:1])]
            replayed = len(replay)
        if cfg.memory_examples:
            examples += memory_examples(corrections if init is None else new, seed=cfg.training.seed)
        n_corrections = len(examples)
        if cfg.anchors:
            examples += base_answers(self.base_model, self.work_dir / "anchors.json", cfg.anchor_prompts,
                                     max_new_tokens=cfg.anchor_tokens)
        if cfg.neighbour_anchors:  # the trained corrections' subjects: earlier ones were anchored in their cycles
            questions = anchor_questions([c.question for c in (corrections if init is None else new)],
                                         cfg.neighbour_anchors,
                                         exclude=[c.question for c in corrections])
            examples += [replace(e, pinned=True) for e in base_answers(
                self.base_model, self.work_dir / "anchors.json", questions, max_new_tokens=cfg.anchor_tokens)]
        return examples, {
            "start": "active" if init else "base",
            "init_adapter": init,
            "retraction_forced_rebuild": retracted,
            "unlearnt_retractions": [c.id for c in unlearn],
            "correction_examples": n_corrections,
            "replayed_earlier": replayed,
            "anchor_examples": len(examples) - n_corrections,
            "neighbour_anchors": sum(e.pinned for e in examples),
        }

    def run(self, cycle_id: int) -> dict:
        """Run one cycle to its end; never raises (a failure is the cycle's status)."""
        cycle = _Cycle(cycle_id, time.monotonic())
        promoted = False
        self._update(cycle_id, status=CycleStatus.RUNNING, started_at=now(), message="collecting corrections")
        try:
            if not self._collect(cycle):
                self._finish(cycle, CycleStatus.SUCCEEDED, "no new corrections", n_corrections=0)
                return self.get(cycle_id)
            self._plan(cycle)
            self._train(cycle)
            self._judge(cycle)
            adapter = self._register(cycle)
            if self._forgot(cycle):
                adapter = self._retry(cycle, adapter)
            if cycle.gate is not None and not cycle.gate.passed:
                self._reject(cycle, adapter)
            else:
                self._promote(cycle, adapter)
                promoted = True
        except Exception as e:  # the cycle's failure is data, not a crash of the server
            self._fail(cycle, e)
        if cycle.version is not None and not promoted:
            self._announce(None, None)  # no candidate to get ready for any more
        return self.get(cycle_id)

    # -- the steps of a cycle ------------------------------------------------------------
    def _collect(self, cycle: _Cycle) -> bool:
        """The admitted corrections and the new ones among them; is there anything to learn
        (new corrections, or a retraction to unlearn from the active version)?"""
        cycle.corrections = self.corrections()
        cycle.new = [c for c in cycle.corrections if c.consolidated_in is None]
        return bool(cycle.new) or bool(self.memory.corrections.to_unlearn() and self.registry.active())

    def _plan(self, cycle: _Cycle, replay_all: bool = False, doing: str = "preparing the training set") -> None:
        self._update(cycle.id, message=doing)
        started = time.monotonic()
        cycle.examples, cycle.plan = self.plan(cycle.corrections, cycle.new, replay_all=replay_all)
        cycle.plan_seconds = round(time.monotonic() - started, 2)  # mostly the base model answering new anchors
        self._update(cycle.id, n_corrections=len(cycle.new), n_examples=len(cycle.examples), message="training")

    def _train(self, cycle: _Cycle, doing: str = "training") -> None:
        """Train the candidate into the next version's folder; its progress is the cycle's
        (a retry's starts again from 0, its message says so: `doing`)."""
        cycle.version = self.registry.next_version()
        share = self._train_share()

        def progress(step: int, total: int, loss: float) -> None:
            self._update(cycle.id, progress=round(share * step / total, 4),
                         message=f"{doing} step {step}/{total} loss {loss:.3f}")

        result = train_lora(self.base_model, cycle.examples, self.registry.folder_for(cycle.version),
                            self.config.training, progress, init_adapter=cycle.plan["init_adapter"],
                            reference_cache=self.work_dir / "anchor_reference.pt",
                            states_cache=self.work_dir / "frozen_states.pt")
        cycle.parent = self.registry.active()
        self._announce(adapter_name(cycle.version), self.registry.folder_for(cycle.version))
        cycle.metrics = {
            "plan_seconds": cycle.plan_seconds,
            "train_seconds": round(result.seconds, 2),
            "train_steps": result.steps,
            "train_tokens_per_second": round(result.tokens_per_second, 1),
            "final_loss": round(result.final_loss, 4),
        }

    def _announce(self, name: str | None, folder: Path | None) -> None:
        """Tell `on_candidate`; serving getting ready is a courtesy, never a cycle's failure."""
        try:
            self.on_candidate(name, folder)
        except Exception:
            log.exception("on_candidate failed for %s", name)

    def _judge(self, cycle: _Cycle) -> None:
        """The gate's verdict on the candidate (none when the gate is off)."""
        if self.config.gate_enabled:
            self._update(cycle.id, progress=self._train_share(), message="gate: evaluating the candidate")
            parent = cycle.parent.path if cycle.parent else None
            cycle.gate = run_gate(self.base_model, self.registry.folder_for(cycle.version), parent, cycle.new,
                                  cycle.earlier, self.config.gate)
            cycle.metrics.update({f"gate_{k}": v for k, v in cycle.gate.metrics.items()})
            cycle.metrics["gate_seconds"] = cycle.gate.seconds
        cycle.metrics["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    def _register(self, cycle: _Cycle) -> AdapterVersion:
        """The candidate registered with its verdict and its manifest."""
        rejected = cycle.gate is not None and not cycle.gate.passed
        adapter = self.registry.register(
            cycle.version,
            parent=cycle.parent.version if cycle.parent else None,
            cycle_id=cycle.id,
            manifest={
                "base_model": self.base_model,
                "corrections": [c.id for c in cycle.corrections],
                "new_corrections": [c.id for c in cycle.new],
                "plan": cycle.plan,
                "training": asdict(self.config.training),
                "gate": cycle.gate.to_dict() if cycle.gate else None,
                "metrics": cycle.metrics,
            },
            status=AdapterStatus.REJECTED if rejected else AdapterStatus.CANDIDATE,
        )
        cycle.metrics["cycle_seconds"] = round(time.monotonic() - cycle.started, 2)
        return adapter

    def _forgot(self, cycle: _Cycle) -> bool:
        """Rejected for forgetting alone, with earlier corrections left out of its replay."""
        return (self.config.retry_forgetting and cycle.gate is not None and not cycle.gate.passed
                and cycle.plan["start"] == "active"
                and cycle.plan["replayed_earlier"] < len(cycle.earlier)
                and cycle.gate.failed.keys() <= FORGETTING)

    def _retry(self, cycle: _Cycle, rejected: AdapterVersion) -> AdapterVersion:
        """The next version, trained from the same start with every earlier correction replayed."""
        why = f"{rejected.name}: " + "; ".join(cycle.gate.reasons)
        self._plan(cycle, replay_all=True, doing=f"gate rejected {why}; training again, every earlier correction replayed")
        self._train(cycle, doing=f"training again (after {rejected.name})")
        self._judge(cycle)
        cycle.metrics["retried_after"] = why
        return self._register(cycle)

    def _reject(self, cycle: _Cycle, adapter: AdapterVersion) -> None:
        self._finish(cycle, CycleStatus.REJECTED, f"gate rejected {adapter.name}: " + "; ".join(cycle.gate.reasons),
                     adapter_version=cycle.version, metrics=cycle.metrics)

    def _promote(self, cycle: _Cycle, adapter: AdapterVersion) -> None:
        """Hand the new version over to whoever serves it; then its corrections are in the weights."""
        self._update(cycle.id, message="promoting")
        self.on_promote(adapter)
        self.memory.corrections.mark_consolidated([c.id for c in cycle.new], cycle.id)
        self.memory.corrections.mark_unlearnt(cycle.plan["unlearnt_retractions"], cycle.id)
        self._finish(cycle, CycleStatus.SUCCEEDED, f"promoted {adapter.name}", adapter_version=cycle.version,
                     metrics=cycle.metrics)

    def _fail(self, cycle: _Cycle, error: Exception) -> None:
        """The cycle failed: its folder goes unless it was registered, the traceback is kept."""
        log.exception("cycle %s failed", cycle.id)
        if cycle.version is not None and cycle.version not in {v.version for v in self.registry.versions()}:
            self.registry.discard(cycle.version)
        self._update(cycle.id, status=CycleStatus.FAILED, finished_at=now(),
                     message=f"{type(error).__name__}: {error}",
                     metrics={"traceback": traceback.format_exc()[-4000:]})

    def _finish(self, cycle: _Cycle, status: CycleStatus, message: str, **fields) -> None:
        self._update(cycle.id, status=status, finished_at=now(), progress=1.0, message=message, **fields)

    def _train_share(self) -> float:
        """The part of a cycle's progress that training takes (the gate takes the rest)."""
        return 0.85 if self.config.gate_enabled else 1.0


@dataclass
class _Cycle:
    """What one run of a cycle has found and made so far."""

    id: int
    started: float  # time.monotonic()
    corrections: list[Correction] = field(default_factory=list)
    new: list[Correction] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    plan: dict = field(default_factory=dict)
    plan_seconds: float = 0.0  # what making the plan took
    version: int | None = None  # the candidate's, once training starts
    parent: AdapterVersion | None = None  # the version active when training ended
    metrics: dict = field(default_factory=dict)
    gate: GateReport | None = None

    @property
    def earlier(self) -> list[Correction]:
        """The corrections consolidated by earlier cycles."""
        return [c for c in self.corrections if c.consolidated_in is not None]
