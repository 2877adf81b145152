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
import resource
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from memory import Memory
from memory.db import atomic, now
from trainer.anchors import base_answers
from trainer.dataset import examples_for
from trainer.lora import TrainingConfig, train_lora
from trainer.registry import AdapterRegistry, AdapterVersion

log = logging.getLogger("ratchet.cycles")

STATUSES = ("queued", "running", "succeeded", "rejected", "failed")


@dataclass
class CycleConfig:
    training: TrainingConfig = field(default_factory=TrainingConfig)
    anchors: bool = True  # replay the base model's answers to general prompts


class Cycles:
    def __init__(
        self,
        memory: Memory,
        registry: AdapterRegistry,
        base_model: str,
        config: CycleConfig,
        work_dir: str | Path,
        on_promote: Callable[[AdapterVersion], None],
    ):
        self.memory = memory
        self.db = memory.db
        self.registry = registry
        self.base_model = base_model
        self.config = config
        self.work_dir = Path(work_dir)
        self.on_promote = on_promote
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

    def run(self, cycle_id: int) -> dict:
        """Run one cycle to its end; never raises (a failure is the cycle's status)."""
        started = time.monotonic()
        self._update(cycle_id, status="running", started_at=now(), message="collecting corrections")
        version = None
        try:
            corrections = self.memory.corrections()
            new = [c for c in corrections if c.consolidated_in is None]
            if not new:
                self._update(cycle_id, status="succeeded", finished_at=now(), progress=1.0,
                             message="no new corrections", n_corrections=0)
                return self.get(cycle_id)
            examples = examples_for(corrections)
            n_corrections_examples = len(examples)
            if self.config.anchors:
                self._update(cycle_id, message="computing replay anchors")
                examples += base_answers(self.base_model, self.work_dir / "anchors.json")
            self._update(cycle_id, n_corrections=len(corrections), n_examples=len(examples), message="training")

            version = self.registry.next_version()
            out = self.registry.folder_for(version)

            def progress(step: int, total: int, loss: float) -> None:
                self._update(cycle_id, progress=round(step / total, 4), message=f"training step {step}/{total} loss {loss:.3f}")

            result = train_lora(self.base_model, examples, out, self.config.training, progress)
            active = self.registry.active()
            metrics = {
                "train_seconds": round(result.seconds, 2),
                "train_steps": result.steps,
                "train_tokens_per_second": round(result.tokens_per_second, 1),
                "final_loss": round(result.final_loss, 4),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
            adapter = self.registry.register(
                version,
                parent=active.version if active else None,
                cycle_id=cycle_id,
                manifest={
                    "base_model": self.base_model,
                    "corrections": [c.id for c in corrections],
                    "new_corrections": [c.id for c in new],
                    "examples": {"corrections": n_corrections_examples, "anchors": len(examples) - n_corrections_examples},
                    "training": asdict(self.config.training),
                    "metrics": metrics,
                },
            )
            self._update(cycle_id, message="promoting")
            self.on_promote(adapter)
            self.memory.mark_consolidated([c.id for c in new], cycle_id)
            metrics["cycle_seconds"] = round(time.monotonic() - started, 2)
            self._update(cycle_id, status="succeeded", finished_at=now(), progress=1.0, adapter_version=version,
                         message=f"promoted {adapter.name}", metrics=metrics)
        except Exception as e:  # the cycle's failure is data, not a crash of the server
            log.exception("cycle %s failed", cycle_id)
            if version is not None and version not in {v.version for v in self.registry.versions()}:
                self.registry.discard(version)
            self._update(cycle_id, status="failed", finished_at=now(), message=f"{type(e).__name__}: {e}",
                         metrics={"traceback": traceback.format_exc()[-4000:]})
        return self.get(cycle_id)
