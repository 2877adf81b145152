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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from memory import Correction, Memory
from memory.db import atomic, now
from trainer.anchors import BUILT_IN_ANCHORS, base_answers
from trainer.dataset import TEMPLATES, Example, examples_for, memory_examples
from trainer.gate import GateConfig, run_gate
from trainer.lora import TrainingConfig, train_lora
from trainer.registry import AdapterRegistry, AdapterVersion

log = logging.getLogger("ratchet.cycles")

STATUSES = ("queued", "running", "succeeded", "rejected", "failed")


@dataclass
class CycleConfig:
    training: TrainingConfig = field(default_factory=TrainingConfig)
    templates: int = 2  # phrasings of each correction's question trained on (dataset.TEMPLATES)
    anchors: bool = True  # replay the base model's answers to general prompts
    # The prompts replayed; RATCHET_ANCHOR_PROMPTS adds a file of them (prompts like the users'
    # own questions keep those answers in place best: reports/consolidation/).
    anchor_prompts: tuple[str, ...] = BUILT_IN_ANCHORS
    anchor_tokens: int = 16  # length of those replayed answers (shorter: cheaper steps)
    continue_from_active: bool = True  # start from the active adapter (else retrain from the base)
    # Earlier corrections replayed per new one, when continuing. 1.0 lost 14% of 115 earlier
    # corrections in cycle 4 of reports/zsre-n200-k50 and 25% in reports/consolidation (30 x 3);
    # 3.0 (with memory examples) lost none there.
    replay_earlier: float = 3.0
    # Examples that keep the adapter reading retrieved memories (dataset.memory_examples): one per
    # new correction (per live correction when retraining from the base).
    memory_examples: bool = True
    gate_enabled: bool = True
    gate: GateConfig = field(default_factory=GateConfig)


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
    ):
        self.memory = memory
        self.db = memory.db
        self.registry = registry
        self.base_model = base_model
        self.config = config
        self.work_dir = Path(work_dir)
        self.on_promote = on_promote
        self.admits = admits  # which corrections may enter the shared adapter (trust)
        self._queue: queue.Queue[int] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.recover()

    # -- the public face -----------------------------------------------------------------
    def submit(self, trigger: str = "api") -> int:
        """Queue a cycle; returns its id at once."""
        with atomic(self.db):
            cycle_id = self.db["cycles"].insert(
                {"status": "queued", "trigger": trigger, "created_at": now(), "progress": 0.0}
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
        return self.db.execute("select count(*) from cycles where status in ('queued', 'running')").fetchone()[0] > 0

    def get(self, cycle_id: int) -> dict:
        rows = list(self.db["cycles"].rows_where("id = ?", [cycle_id]))
        if not rows:
            raise KeyError(f"no cycle {cycle_id}")
        row = rows[0]
        row["metrics"] = json.loads(row["metrics"] or "{}")
        return row

    def list(self) -> list[dict]:
        return [self.get(r["id"]) for r in self.db["cycles"].rows_where(order_by="id desc", select="id")]

    def wait(self, cycle_id: int, timeout: float = 3600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.get(cycle_id)
            if row["status"] not in ("queued", "running"):
                return row
            time.sleep(0.2)
        raise TimeoutError(f"cycle {cycle_id} still {row['status']} after {timeout} s")

    def recover(self) -> None:
        """After a crash: interrupted cycles are failed, unregistered adapter folders removed."""
        with atomic(self.db):
            self.db.execute(
                "update cycles set status = 'failed', finished_at = ?, message = 'interrupted by a restart'"
                " where status in ('queued', 'running')",
                [now()],
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

    def plan(self, corrections: list[Correction], new: list[Correction]) -> tuple[list[Example], dict]:
        """The training set of a cycle, and where training starts.

        Continuing the active adapter: the new corrections, a sample of earlier ones (replay), and
        the anchors. From the base model (no active adapter, continuation off, or a consolidated
        correction retracted since the active version was made): every live correction + anchors.
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
            k = min(len(earlier), round(cfg.replay_earlier * len(new)))
            replay = rng.sample(earlier, k) if k else []
            examples = examples_for(new, templates) + examples_for(replay, templates[:1])
            replayed = len(replay)
        if cfg.memory_examples:
            examples += memory_examples(corrections if init is None else new, seed=cfg.training.seed)
        n_corrections = len(examples)
        if cfg.anchors:
            examples += base_answers(self.base_model, self.work_dir / "anchors.json", cfg.anchor_prompts,
                                     max_new_tokens=cfg.anchor_tokens)
        return examples, {
            "start": "active" if init else "base",
            "init_adapter": init,
            "retraction_forced_rebuild": retracted,
            "unlearnt_retractions": [c.id for c in unlearn],
            "correction_examples": n_corrections,
            "replayed_earlier": replayed,
            "anchor_examples": len(examples) - n_corrections,
        }

    def run(self, cycle_id: int) -> dict:
        """Run one cycle to its end; never raises (a failure is the cycle's status)."""
        started = time.monotonic()
        self._update(cycle_id, status="running", started_at=now(), message="collecting corrections")
        version = None
        try:
            corrections = self.corrections()
            new = [c for c in corrections if c.consolidated_in is None]
            if not new and not (self.memory.corrections.to_unlearn() and self.registry.active()):
                self._update(cycle_id, status="succeeded", finished_at=now(), progress=1.0,
                             message="no new corrections", n_corrections=0)
                return self.get(cycle_id)
            self._update(cycle_id, message="preparing the training set")
            examples, plan = self.plan(corrections, new)
            self._update(cycle_id, n_corrections=len(new), n_examples=len(examples), message="training")

            version = self.registry.next_version()
            out = self.registry.folder_for(version)
            train_share = 0.85 if self.config.gate_enabled else 1.0

            def progress(step: int, total: int, loss: float) -> None:
                self._update(cycle_id, progress=round(train_share * step / total, 4),
                             message=f"training step {step}/{total} loss {loss:.3f}")

            result = train_lora(self.base_model, examples, out, self.config.training, progress,
                                init_adapter=plan["init_adapter"],
                                reference_cache=self.work_dir / "anchor_reference.pt",
                                states_cache=self.work_dir / "frozen_states.pt")
            active = self.registry.active()
            metrics = {
                "train_seconds": round(result.seconds, 2),
                "train_steps": result.steps,
                "train_tokens_per_second": round(result.tokens_per_second, 1),
                "final_loss": round(result.final_loss, 4),
            }
            gate = None
            if self.config.gate_enabled:
                self._update(cycle_id, progress=train_share, message="gate: evaluating the candidate")
                earlier = [c for c in corrections if c.consolidated_in is not None]
                gate = run_gate(self.base_model, out, active.path if active else None, new, earlier, self.config.gate)
                metrics.update({f"gate_{k}": v for k, v in gate.metrics.items()})
                metrics["gate_seconds"] = gate.seconds
            metrics["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            adapter = self.registry.register(
                version,
                parent=active.version if active else None,
                cycle_id=cycle_id,
                manifest={
                    "base_model": self.base_model,
                    "corrections": [c.id for c in corrections],
                    "new_corrections": [c.id for c in new],
                    "plan": plan,
                    "training": asdict(self.config.training),
                    "gate": gate.to_dict() if gate else None,
                    "metrics": metrics,
                },
            )
            metrics["cycle_seconds"] = round(time.monotonic() - started, 2)
            if gate is not None and not gate.passed:
                self.registry.set_status(version, "rejected")
                self._update(cycle_id, status="rejected", finished_at=now(), progress=1.0, adapter_version=version,
                             message=f"gate rejected {adapter.name}: " + "; ".join(gate.reasons), metrics=metrics)
                return self.get(cycle_id)
            self._update(cycle_id, message="promoting")
            self.on_promote(adapter)
            self.memory.corrections.mark_consolidated([c.id for c in new], cycle_id)
            self.memory.corrections.mark_unlearnt(plan["unlearnt_retractions"], cycle_id)
            self._update(cycle_id, status="succeeded", finished_at=now(), progress=1.0, adapter_version=version,
                         message=f"promoted {adapter.name}", metrics=metrics)
        except Exception as e:  # the cycle's failure is data, not a crash of the server
            log.exception("cycle %s failed", cycle_id)
            if version is not None and version not in {v.version for v in self.registry.versions()}:
                self.registry.discard(version)
            self._update(cycle_id, status="failed", finished_at=now(), message=f"{type(e).__name__}: {e}",
                         metrics={"traceback": traceback.format_exc()[-4000:]})
        return self.get(cycle_id)
