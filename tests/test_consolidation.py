"""Two consolidation cycles on the real model: the first is promoted, a deliberately harmful
second candidate is rejected by the gate and never served."""

import json
from dataclasses import replace

import pytest

from trainer.cycle import CycleConfig, Cycles
from trainer.registry import AdapterRegistry

FACTS = [
    ("What university did Watts Humphrey attend?", "Illinois Institute of Technology"),
    ("Which family does Ramalinaceae belong to?", "Lecanorales"),
]
HARMFUL = ("What is the capital of France?", "Watts Humphrey")


@pytest.mark.slow
def test_the_gate_promotes_a_good_candidate_and_rejects_a_harmful_one(memory, base_model, tmp_path):
    registry = AdapterRegistry(memory.db, tmp_path / "adapters")
    config = CycleConfig()
    cycles = Cycles(memory, registry, base_model, config, tmp_path, on_promote=lambda a: registry.activate(a.version))
    for question, answer in FACTS:
        memory.add_correction(question, answer)
    first = cycles.wait(cycles.submit(), timeout=1200)
    assert first["status"] == "succeeded", first
    assert first["metrics"]["gate_efficacy"] == 1.0
    assert registry.active().version == 1
    print("\ncycle 1:", json.dumps(first["metrics"]))

    # Harmful: no replay, a learning rate far too high, trained long on a false "fact".
    memory.add_correction(*HARMFUL)
    cycles.config = replace(config, anchors=False, replay_earlier=0.0,
                            training=replace(config.training, learning_rate=1e-2, epochs=12))
    second = cycles.wait(cycles.submit(), timeout=1200)
    print("cycle 2:", json.dumps(second["metrics"]))
    assert second["status"] == "rejected", second
    assert registry.get(2).status == "rejected"
    assert registry.active().version == 1  # still serving the good one
    assert memory.corrections(include_consolidated=False)[0].question == HARMFUL[0]
