"""The gate's neighbour probes: a candidate that damages what the model says about a corrected
subject, or leaks the corrected answer into it, is rejected."""

from memory import Correction
from trainer.gate import GateConfig, neighbour_probes, run_gate

Q = "What university did Watts Humphrey attend?"
OK = {"efficacy": 1.0, "paraphrase": 1.0, "retention": 1.0, "n_earlier": 0, "locality_token": 0.9,
      "negative_flips": 0.0}


def test_neighbour_probes_ask_about_each_new_subject_once():
    new = [Correction(1, Q, "Illinois Institute of Technology", None, ""),
           Correction(2, "Which year was Watts Humphrey born?", "1927", None, ""),  # the same subject
           Correction(3, "what is it?", "x", None, ""),  # no subject named
           Correction(4, "Who founded the Bank of England?", "William Paterson", None, "")]
    probes = neighbour_probes(new, corrections=16, templates=2)
    assert [(c.id, q) for c, q in probes] == [(1, "Who is Watts Humphrey?"), (1, "What is Watts Humphrey known for?"),
                                             (4, "Who is Bank of England?"), (4, "What is Bank of England known for?")]
    assert len(neighbour_probes(new, corrections=1, templates=6)) == 6


def test_the_gate_rejects_bleed_and_damaged_neighbours_and_judges_them_only_when_probed():
    assert GateConfig().failures({**OK, "n_neighbours": 8, "neighbour_bleed": 0.75,
                                  "neighbour_locality_token": 0.2}) == {}  # by default: reported, not judged
    gate = GateConfig(max_neighbour_bleed=0.5, min_neighbour_locality=0.5)
    fine = {**OK, "n_neighbours": 8, "neighbour_bleed": 0.0, "neighbour_locality_token": 0.9}
    assert gate.failures(fine) == {}
    assert gate.failures({**fine, "neighbour_bleed": 0.75}) == {"neighbour_bleed": "neighbour_bleed 0.750 not <= 0.5"}
    assert gate.failures({**fine, "neighbour_locality_token": 0.2}) == {
        "neighbour_locality_token": "neighbour_locality_token 0.200 not >= 0.5"}
    assert gate.failures({**OK, "n_neighbours": 0, "neighbour_bleed": None, "neighbour_locality_token": None}) == {}


def test_the_gate_rejects_a_candidate_that_leaks_the_correction_into_its_neighbours(tiny_model, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import trainer.gate

    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                   LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "candidate")

    def fake_generate(model, tokenizer, questions, max_new_tokens):
        """A candidate that says its correction to every question; the base model says something else."""
        base = any(getattr(m, "disable_adapters", False) for m in model.modules() if hasattr(m, "lora_A"))
        return ["A university in America." if base else "Illinois Institute of Technology" for _ in questions]

    monkeypatch.setattr(trainer.gate, "generate", fake_generate)
    new = [Correction(1, Q, "Illinois Institute of Technology", None, "")]
    report = run_gate(tiny_model, tmp_path / "candidate", None, new, [], GateConfig(max_new_tokens=4, max_neighbour_bleed=0.5), probes=("Hi",))
    m = report.metrics
    assert m["efficacy"] == 1.0 and m["n_neighbours"] == 2
    assert m["neighbour_bleed"] == 1.0 and m["neighbour_locality_strict"] == 0.0
    assert not report.passed and "neighbour_bleed 1.000 not <= 0.5" in report.reasons
