"""Consolidation cycles on the real model: the first is promoted, a deliberately harmful second
candidate is rejected by the gate and never served, and a retraction is unlearnt by the third."""

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
    ids = [memory.add_correction(question, answer) for question, answer in FACTS]
    first = cycles.wait(cycles.submit(), timeout=1200)
    assert first["status"] == "succeeded", first
    assert first["metrics"]["gate_efficacy"] == 1.0
    assert registry.active().version == 1
    print("\ncycle 1:", json.dumps(first["metrics"]))

    # Harmful: no replay, a learning rate far too high, trained long on a false "fact".
    memory.add_correction(*HARMFUL)
    cycles.config = replace(config, anchors=False, replay_earlier=0.0, replay_at_least=0,
                            training=replace(config.training, learning_rate=1e-2, epochs=12))
    second = cycles.wait(cycles.submit(), timeout=1200)
    print("cycle 2:", json.dumps(second["metrics"]))
    assert second["status"] == "rejected", second
    assert registry.get(2).status == "rejected"
    assert registry.active().version == 1  # still serving the good one
    assert memory.corrections.live(include_consolidated=False)[0].question == HARMFUL[0]

    # Retraction: the harmful one and the first fact are taken back; the next cycle starts from
    # the base model without them, and its adapter no longer gives the retracted answer.
    harmful_id = memory.corrections.live(include_consolidated=False)[0].id
    memory.corrections.retract(harmful_id, "local")
    memory.corrections.retract(ids[0], "local")
    cycles.config = config
    third = cycles.wait(cycles.submit(), timeout=1200)
    print("cycle 3:", json.dumps(third["metrics"]))
    assert third["status"] == "succeeded", third
    plan = json.loads((registry.folder_for(3) / "ratchet.json").read_text())["plan"]
    assert plan["start"] == "base" and plan["retraction_forced_rebuild"] and plan["unlearnt_retractions"] == [ids[0]]
    assert memory.corrections.to_unlearn() == []
    assert not knows(base_model, registry.folder_for(3), *FACTS[0])
    assert knows(base_model, registry.folder_for(1), *FACTS[0])  # (the first version did know it)


def knows(base_model, adapter, question, answer) -> bool:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memory.text import is_correct
    from trainer.evaluate import generate

    tok = AutoTokenizer.from_pretrained(base_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), str(adapter)).eval()
    return is_correct(answer, generate(model, tok, [question])[0])
