import time

import pytest

from trainer.cycle import CycleConfig, Cycles
from trainer.lora import TrainingConfig
from trainer.registry import AdapterRegistry
from trainer.schedule import Schedule, ScheduleConfig, parse_every

FAST = CycleConfig(training=TrainingConfig(epochs=1, min_steps=0, batch_size=4, r=4), anchors=False, gate_enabled=False)


@pytest.mark.parametrize("every", ["30m", "6h", "1d", "45s", "0 3 * * *", "*/15 * * * *"])
def test_intervals_and_cron_lines_are_accepted(every):
    assert parse_every(every) is not None


@pytest.mark.parametrize("every", ["soon", "0m", "61 * * * *", "5 parsecs"])
def test_anything_else_is_refused_clearly(every):
    with pytest.raises(ValueError):
        parse_every(every)


@pytest.fixture
def cycles(memory, tiny_model, tmp_path):
    registry = AdapterRegistry(memory.db, tmp_path / "adapters")
    return Cycles(memory, registry, tiny_model, FAST, tmp_path, on_promote=lambda a: registry.activate(a.version))


def test_a_cycle_starts_once_n_corrections_wait(cycles, memory):
    schedule = Schedule(cycles, ScheduleConfig(after_corrections=2))
    memory.add_correction("What family are Ramalinaceae?", "Lecanorales")
    assert schedule.on_correction() is None
    memory.add_correction("What university did Watts Humphrey attend?", "Illinois Institute of Technology")
    cycle_id = schedule.on_correction()
    assert cycle_id is not None
    assert cycles.get(cycle_id)["trigger"] == "after 2 corrections"
    assert schedule.on_correction() is None or cycles.get(cycle_id)["status"] not in ("queued", "running")
    assert cycles.wait(cycle_id)["status"] == "succeeded"
    assert schedule.on_correction() is None  # nothing waits any more


def test_the_schedule_submits_only_when_something_waits(cycles, memory):
    schedule = Schedule(cycles, ScheduleConfig(every="1s"))
    schedule.start()
    try:
        time.sleep(2.5)
        assert cycles.list() == []  # no corrections: no cycle
        memory.add_correction("What family are Ramalinaceae?", "Lecanorales")
        deadline = time.monotonic() + 30
        while not cycles.list() and time.monotonic() < deadline:
            time.sleep(0.2)
        first = cycles.list()[-1]
        assert first["trigger"] == "schedule"
        assert cycles.wait(first["id"])["status"] == "succeeded"
        assert schedule.next_run() is not None
    finally:
        schedule.stop()


def test_a_bad_schedule_is_refused_when_configured():
    with pytest.raises(ValueError, match="every: 'whenever' is neither an interval"):
        ScheduleConfig(every="whenever")
    with pytest.raises(ValueError, match="after_corrections must be at least 1"):
        ScheduleConfig(after_corrections=0)
    assert ScheduleConfig(every="6h", after_corrections=1).after_corrections == 1
