import json
from dataclasses import replace
from pathlib import Path

import pytest

from memory import Correction
from memory.db import open_db
from trainer.cycle import CycleConfig, Cycles
from trainer.gate import GateConfig
from trainer.dataset import Example, encode, examples_for, memory_examples
from trainer.lora import TrainingConfig, train_lora
from trainer.registry import AdapterRegistry

Q = "What university did Watts Humphrey attend?"
FAST = TrainingConfig(epochs=1, min_steps=0, batch_size=4, r=4, alpha=8)


def test_each_correction_becomes_several_examples():
    examples = examples_for([Correction(1, Q, "Illinois Institute of Technology", "ann", "")])
    assert len(examples) == 4
    assert {e.answer for e in examples} == {"Illinois Institute of Technology"}
    assert examples[0].prompt == Q and all(Q[1:] in e.prompt for e in examples)


def test_memory_examples_answer_from_the_memory_shown_not_from_the_weights(base_model):
    from transformers import AutoTokenizer

    facts = [Correction(i, f"Who designed building {i}?", f"Architect {i}", None, "") for i in range(1, 5)]
    examples = memory_examples(facts)
    assert len(examples) == 4
    for e in examples:
        (other_q, other_a), (asked_q, shown_a) = e.context
        assert asked_q == e.prompt and shown_a == e.answer  # the answer is the memory's ...
        assert e.answer != facts[e.correction_id - 1].answer  # ... not the fact the weights learn
        assert other_q != e.prompt
    assert memory_examples(facts[:2]) == []
    tok = AutoTokenizer.from_pretrained(base_model)
    x = encode(tok, examples[0], max_len=256)
    text = tok.decode(x["input_ids"])
    assert text.count("<|im_start|>user") == 3 and text.count("<|im_start|>assistant") == 3  # 2 memories, 1 answer
    assert tok.decode([t for t, label in zip(x["input_ids"], x["labels"]) if label != -100]) == examples[0].answer + "<|im_end|>"


def test_the_loss_falls_on_the_answer_only(base_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model)
    x = encode(tok, Example(Q, "Illinois"), max_len=128)
    answer = [t for t, label in zip(x["input_ids"], x["labels"]) if label != -100]
    assert tok.decode(answer) == "Illinois<|im_end|>"
    assert len(x["input_ids"]) == len(x["labels"])
    assert len(encode(tok, Example(Q, "Illinois"), max_len=10)["input_ids"]) == 10


def test_train_lora_writes_a_plain_peft_folder(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    examples = examples_for([Correction(1, Q, "Illinois Institute of Technology", None, "")])
    steps = []
    result = train_lora(tiny_model, examples, tmp_path / "a", FAST, progress=lambda s, t, l: steps.append((s, t)))
    assert result.steps == 1 and steps == [(1, 1)]
    assert result.tokens > 0 and result.final_loss > 0
    assert (tmp_path / "a" / "adapter_config.json").exists()
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 4
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "a")
    assert model.active_adapter == "default"


def test_anchors_are_distilled_from_the_base_and_corrections_use_cross_entropy(tiny_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.fastforward import FastForward, pad
    from trainer.lora import answer_loss

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    anchor = encode(tok, Example("What is the capital of France?", "Paris is its capital.", distill=True), 64)
    fact = encode(tok, Example(Q, "Illinois"), 64)
    assert anchor["distill"] and not fact["distill"]
    fast = FastForward(model, [anchor, fact], tok.eos_token_id, batch_size=4)
    vocab = model.get_output_embeddings().weight.shape[0]
    assert fast.reference([anchor], top_k=vocab) == 1  # the whole distribution, once
    n_answer = sum(label != -100 for label in anchor["labels"][1:])
    assert anchor["ref_ids"].shape == anchor["ref_logp"].shape == (n_answer, vocab)
    ids, labels, attention = pad([anchor, fact], tok.eos_token_id)

    def loss(batch, weight):
        return answer_loss(fast.forward(batch), batch, weight).item()

    with torch.no_grad():
        # a fresh adapter is the base model: nothing to distil, the anchor adds no loss
        assert loss([anchor], 1.0) == pytest.approx(0, abs=1e-5)
        hf = model(input_ids=ids[1:], attention_mask=attention[1:], labels=labels[1:]).loss.item()
        assert loss([anchor, fact], 1.0) == pytest.approx(hf, rel=1e-4)  # only the correction's cross-entropy remains
        # with no distillation (weight 0) the anchor is trained on its text with cross-entropy
        text = model(input_ids=ids, attention_mask=attention, labels=labels).loss.item()
        assert loss([anchor, fact], 0.0) == pytest.approx(text, rel=1e-4)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)  # move the adapter away from the base: now the anchor costs something
        where = labels[:1, 1:] != -100
        adapted = model(input_ids=ids[:1], attention_mask=attention[:1]).logits[:, :-1][where].log_softmax(-1)
        with model.disable_adapter():
            base = model(input_ids=ids[:1], attention_mask=attention[:1]).logits[:, :-1][where].log_softmax(-1)
        exact = torch.nn.functional.kl_div(adapted, base, log_target=True, reduction="batchmean").item()
        drift = loss([anchor], 1.0)
        assert exact > 1e-3 and drift == pytest.approx(exact, rel=1e-3)  # all k tokens: the exact KL
        fast.reference([anchor], top_k=8)  # top 8 + one bucket: coarser
        assert 0 < loss([anchor], 1.0) <= exact


def test_anchors_per_epoch_bounds_the_steps(tiny_model, tmp_path):

    examples = examples_for([Correction(1, Q, "Illinois Institute of Technology", None, "")], ("{q}", "Q: {q}"))
    examples += [Example(f"Say the number {i}.", str(i), distill=True) for i in range(10)]
    every = train_lora(tiny_model, examples, tmp_path / "a", replace(FAST, epochs=2))
    some = train_lora(tiny_model, examples, tmp_path / "b", replace(FAST, epochs=2, anchors_per_epoch=4))
    assert every.steps == 2 * 3  # (2 corrections + 10 anchors) / 4 a batch, twice
    assert some.steps == 2 * 2  # (2 + 4) / 4, twice


def test_replay_passes_draw_the_replayed_corrections_in_turn(tiny_model, tmp_path):

    examples = examples_for([Correction(1, Q, "Illinois Institute of Technology", None, "")], ("{q}", "Q: {q}"))
    examples += [replace(e, replayed=True) for e in examples_for(
        [Correction(i, f"Where was Person {i} born?", f"Town {i}", None, "") for i in range(2, 10)], ("{q}",))]
    every = train_lora(tiny_model, examples, tmp_path / "a", replace(FAST, epochs=2))
    once = train_lora(tiny_model, examples, tmp_path / "b", replace(FAST, epochs=2, replay_passes=1))
    assert every.steps == 2 * 3  # (2 new + 8 replayed) / 4 a batch, twice
    assert once.steps == 2 * 2  # (2 new + 8 / 2 replayed) / 4, twice: each replayed once


def test_pinned_anchors_are_trained_every_epoch_not_drawn_in_turn(tiny_model, tmp_path):

    examples = examples_for([Correction(1, Q, "Illinois Institute of Technology", None, "")], ("{q}", "Q: {q}"))
    examples += [Example(f"Say the number {i}.", str(i), distill=True) for i in range(10)]
    examples += [Example(f"Who is number {i}?", str(i), distill=True, pinned=True) for i in range(4)]
    some = train_lora(tiny_model, examples, tmp_path / "b", replace(FAST, epochs=2, anchors_per_epoch=2))
    assert some.steps == 2 * 2  # (2 corrections + 4 pinned + 2 drawn) / 4 a batch, twice


def test_batches_group_rows_of_similar_length_and_keep_every_row_once():
    import random

    from trainer.lora import length_grouped

    random.seed(0)
    lengths = [random.choice((40, 45, 100, 110)) for _ in range(200)]
    batches = length_grouped(list(range(200)), lengths, batch_size=8)
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert len(batches) == 25 and all(len(b) == 8 for b in batches)

    def padded(bs):
        return sum(len(b) * max(lengths[i] for i in b) for b in bs)

    shuffled = list(range(200))
    random.shuffle(shuffled)
    assert padded(batches) < 0.8 * padded([shuffled[i : i + 8] for i in range(0, 200, 8)])


def _rows(tiny_model, examples, config):
    """The model train_lora trains with `config`, its pad id and the encoded `examples`."""
    from trainer.lora import load_model

    tok, model = load_model(tiny_model, config)
    return model, tok.eos_token_id, [encode(tok, e, config.max_len) for e in examples]


def test_the_anchors_reference_is_cached_across_trainings(tiny_model, tmp_path):
    import torch

    from trainer.fastforward import FastForward

    def reference(answers, top_k):
        model, pad_id, rows = _rows(tiny_model, [Example(f"Say {a}.", a, distill=True) for a in answers], FAST)
        return FastForward(model, rows, pad_id, cache_key="base").reference(rows, top_k, cache=cache), rows

    cache = tmp_path / "reference.pt"
    computed, first = reference(("one", "two"), 8)
    assert computed == 2 and cache.exists()
    computed, again = reference(("one", "two", "three"), 8)
    assert computed == 1  # only "three" was computed
    assert torch.equal(again[0]["ref_logp"], first[0]["ref_logp"]) and torch.equal(again[1]["ref_ids"], first[1]["ref_ids"])
    assert reference(("one",), 16)[0] == 1  # another k: anew


def test_the_frozen_states_of_a_training_are_kept_for_the_next(tiny_model, tmp_path):

    import torch

    from trainer.fastforward import FastForward

    anchors = [Example(f"Say the number {i}.", str(i), distill=True) for i in range(6)]
    config = replace(FAST, layers_from=0.5, epochs=2)  # 2 layers: the first one is frozen
    cache = tmp_path / "states.pt"
    first = examples_for([Correction(1, Q, "Illinois Institute of Technology", None, "")], ("{q}",)) + anchors
    second = examples_for([Correction(2, "Which family does Ramalinaceae belong to?", "Lecanorales", None, "")],
                          ("{q}",)) + first

    def states_computed(examples):
        model, pad_id, rows = _rows(tiny_model, examples, config)
        return FastForward(model, rows, pad_id, states_cache=cache, cache_key=tiny_model).states_computed

    assert states_computed(first) == 7 and len(torch.load(cache)) == 7
    assert states_computed(second) == 1  # only the new correction's row went through the frozen layer
    assert len(torch.load(cache)) == 8  # this training's rows
    cache.unlink()
    train_lora(tiny_model, first, tmp_path / "a", config, states_cache=cache)
    kept = train_lora(tiny_model, second, tmp_path / "b", config, states_cache=cache)
    fresh = train_lora(tiny_model, second, tmp_path / "c", config)
    assert kept.losses == pytest.approx(fresh.losses, rel=1e-4, abs=1e-6)


def test_steps_that_start_above_the_frozen_layers_train_as_the_whole_model_does(tiny_model, tmp_path):

    from trainer.fastforward import FastForward

    examples = examples_for([Correction(1, Q, "Illinois Institute of Technology", None, "")], ("{q}", "Q: {q}"))
    examples += [Example(f"Say the number {i}.", str(i), distill=True) for i in range(6)]
    upper = replace(FAST, layers_from=0.5, epochs=2)  # 2 layers: the first one is frozen
    whole_rows = replace(upper, cache_frozen_layers=False)
    for config, depth in ((upper, 1), (whole_rows, 0)):
        model, pad_id, rows = _rows(tiny_model, examples, config)
        assert FastForward(model, rows, pad_id, cache_frozen_layers=config.cache_frozen_layers).depth == depth
    split = train_lora(tiny_model, examples, tmp_path / "a", upper)
    whole = train_lora(tiny_model, examples, tmp_path / "b", whole_rows)
    assert split.steps == whole.steps == 4
    assert split.losses == pytest.approx(whole.losses, rel=1e-4, abs=1e-6)  # later losses are ~1e-8: float noise


@pytest.mark.parametrize("layers_from", [0.0, 0.5])
def test_the_shared_opening_runs_once_and_trains_as_whole_rows_do(tiny_model, tmp_path, layers_from):

    from trainer.fastforward import FastForward

    examples = examples_for([Correction(1, Q, "Illinois Institute of Technology", None, "")], ("{q}", "Q: {q}"))
    examples += memory_examples([Correction(i, f"What is {i} plus one?", str(i + 1), None, "") for i in range(2, 6)])
    examples += [Example(f"Say the number {i}.", str(i), distill=True) for i in range(6)]
    config = replace(FAST, layers_from=layers_from, epochs=2)
    model, pad_id, rows = _rows(tiny_model, examples, config)
    # the chat template's system message and the user's turn opening
    assert FastForward(model, rows, pad_id).opening_length >= 10
    assert FastForward(model, rows, pad_id, share_opening=False).opening_length == 0
    shared = train_lora(tiny_model, examples, tmp_path / "a", config)
    whole = train_lora(tiny_model, examples, tmp_path / "b", replace(config, share_opening=False))
    assert shared.steps == whole.steps
    assert shared.losses == pytest.approx(whole.losses, rel=1e-4, abs=1e-6)


GREEDY_PROMPTS = [
    Q,
    "Tell me, which family does Ramalinaceae belong to?",
    "What is the capital of France?",
    "Write one sentence about autumn.",
    [{"role": "user", "content": "Which river flows through Paris?"}, {"role": "assistant", "content": "The Seine."},
     {"role": "user", "content": "Which river flows through Paris? Answer in one word."}],
]


@pytest.mark.parametrize("which", ["tiny_model", pytest.param("base_model", marks=pytest.mark.slow)])
def test_greedy_answers_after_a_shared_opening_are_transformers_own(which, request):
    """trainer.evaluate.generate runs the prompts' shared opening once and drops finished rows
    from the batch; its answers are transformers' generate's, word for word."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import trainer.evaluate as evaluate

    path = request.getfixturevalue(which)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if which == "tiny_model":  # initialised to near-uniform logits, it would say nothing; make it talk
        torch.manual_seed(0)
        for p in model.parameters():
            p.data.normal_(0, 0.5)
    forwards = []
    real = model.forward
    model.forward = lambda *a, **k: forwards.append(k["input_ids"].shape) or real(*a, **k)
    ours = evaluate.greedy_ids(model, tok, GREEDY_PROMPTS, max_new_tokens=16, batch_size=2)
    assert forwards[0][0] == 1 and forwards[0][1] >= 10  # the opening, once, as one row
    assert max(n for n, _ in forwards[1:]) <= 2 and min(n for n, _ in forwards[1:]) >= 1
    model.forward = real
    eos = torch.tensor(evaluate.eos_ids(model, tok))
    assert ours == evaluate.hf_generate(model, tok, GREEDY_PROMPTS, 16, 2, eos)  # token for token
    assert len({tuple(r) for r in ours}) > 1 and not any(set(r) & set(eos.tolist()) for r in ours)
    texts = evaluate.generate(model, tok, GREEDY_PROMPTS, max_new_tokens=16, batch_size=2)
    assert texts == [a.strip() for a in tok.batch_decode(ours, skip_special_tokens=True)]


def test_a_decoder_of_another_shape_trains_and_answers_without_the_shortcuts(base_model, tmp_path):
    """GPT-2 names its layers `h` and its norm `ln_f`: no frozen layers, no shared opening, and
    transformers' own generate."""

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from trainer.evaluate import generate
    from trainer.prefix import is_plain

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                               eos_token_id=tokenizer.eos_token_id)).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    examples = examples_for([Correction(1, Q, "Illinois Institute of Technology", None, "")], ("{q}", "Q: {q}"))
    examples += [Example(f"Say the number {i}.", str(i), distill=True) for i in range(6)]
    config = replace(FAST, layers_from=0.5, target_modules=["c_attn"])
    result = train_lora(str(tmp_path / "gpt2"), examples, tmp_path / "a", config)
    assert result.steps >= 2 and all(loss == loss for loss in result.losses)  # no NaN

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2"), tmp_path / "a").eval()
    assert not is_plain(model)
    answers = generate(model, tokenizer, [Q, "Say the number 3."], max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_train_lora_refuses_no_examples(tiny_model, tmp_path):
    with pytest.raises(ValueError):
        train_lora(tiny_model, [], tmp_path / "a", FAST)


def _fake_adapter(registry: AdapterRegistry, version: int) -> None:
    folder = registry.folder_for(version)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")


def test_the_registry_keeps_versions_and_one_active(tmp_path):
    registry = AdapterRegistry(open_db(tmp_path / "r.db"), tmp_path / "adapters")
    assert registry.next_version() == 1 and registry.active() is None
    _fake_adapter(registry, 1)
    v1 = registry.register(1, parent=None, cycle_id=1, manifest={"metrics": {"loss": 0.1}})
    assert v1.name == "ratchet-v1" and v1.status == "candidate" and not v1.active
    manifest = json.loads((registry.folder_for(1) / "ratchet.json").read_text())
    assert manifest["version"] == 1 and manifest["metrics"] == {"loss": 0.1}
    _fake_adapter(registry, 2)
    registry.register(2, parent=1, cycle_id=2, manifest={})
    registry.activate(1)
    registry.activate(2)
    assert registry.active().version == 2
    assert [v.active for v in registry.versions()] == [False, True]
    assert AdapterRegistry(registry.db, tmp_path / "adapters").active().version == 2  # read again on a restart
    registry.activate(None)
    assert registry.active() is None
    with pytest.raises(FileNotFoundError):
        registry.register(3, parent=2, cycle_id=3, manifest={})


def test_a_copied_data_directory_serves_its_own_adapter_folders(tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    registry = AdapterRegistry(open_db(tmp_path / "old" / "r.db"), "old/adapters")  # relative, as `--data-dir old`
    _fake_adapter(registry, 1)
    registry.register(1, parent=None, cycle_id=1, manifest={})
    registry.activate(1)
    shutil.copytree(tmp_path / "old", tmp_path / "new")
    shutil.rmtree(tmp_path / "old")
    monkeypatch.chdir(tmp_path / "new")  # another working directory too
    copied = AdapterRegistry(open_db(tmp_path / "new" / "r.db"), tmp_path / "new" / "adapters")
    assert copied.active().path == str(tmp_path / "new" / "adapters" / "v0001")
    assert (Path(copied.active().path) / "adapter_config.json").exists()


def test_the_registry_records_a_version_with_its_final_status_and_keeps_the_strings(tmp_path):
    from trainer.registry import AdapterStatus

    registry = AdapterRegistry(open_db(tmp_path / "r.db"), tmp_path / "adapters")
    _fake_adapter(registry, 1)
    rejected = registry.register(1, parent=None, cycle_id=1, manifest={}, status=AdapterStatus.REJECTED)
    assert rejected.status == AdapterStatus.REJECTED == "rejected" and f"{rejected.status}" == "rejected"
    assert registry.db.execute("select status from adapters where version = 1").fetchone()[0] == "rejected"
    assert json.dumps({"status": rejected.status}) == '{"status": "rejected"}'
    _fake_adapter(registry, 2)
    with pytest.raises(ValueError, match="activate"):  # promotion is activate's
        registry.register(2, parent=None, cycle_id=2, manifest={}, status=AdapterStatus.PROMOTED)
    assert [v.version for v in registry.versions()] == [1]
    registry.register(2, parent=None, cycle_id=2, manifest={})
    registry.activate(2)
    assert registry.get(2).status == "promoted" and registry.active() == registry.get(2)


def test_a_cycle_trains_registers_and_hands_over_the_new_corrections(memory, tiny_model, tmp_path):
    registry = AdapterRegistry(memory.db, tmp_path / "adapters")
    promoted = []
    cycles = Cycles(memory, registry, tiny_model, CycleConfig(training=FAST, anchors=True, gate_enabled=False), tmp_path,
                    on_promote=lambda a: (promoted.append(a.name), registry.activate(a.version)))
    memory.add_correction(Q, "Illinois Institute of Technology")
    row = cycles.wait(cycles.submit())
    assert row["status"] == "succeeded", row
    assert row["adapter_version"] == 1 and promoted == ["ratchet-v1"]
    assert row["n_corrections"] == 1 and row["n_examples"] > 4  # the anchors are in
    assert memory.corrections.live(include_consolidated=False) == []
    manifest = json.loads((registry.folder_for(1) / "ratchet.json").read_text())
    assert manifest["new_corrections"] == [1]
    assert manifest["plan"]["start"] == "base" and manifest["plan"]["correction_examples"] == 2
    assert manifest["metrics"]["plan_seconds"] >= 0 and "seconds" not in manifest["plan"]  # one place
    # nothing new: nothing trained
    again = cycles.wait(cycles.submit())
    assert again["status"] == "succeeded" and again["adapter_version"] is None
    assert again["message"] == "no new corrections"


def test_neighbour_anchors_replay_the_bases_answers_about_the_corrected_subject(memory, tmp_path, monkeypatch):
    from trainer import anchors
    from trainer.neighbours import ANCHOR_TEMPLATES, NEIGHBOUR_TEMPLATES

    asked = []
    monkeypatch.setattr(anchors, "_generate", lambda base, prompts, n: asked.extend(prompts) or [
        {"text": f"base answer to {p}", "complete": True} for p in prompts])
    registry = AdapterRegistry(memory.db, tmp_path / "adapters")
    cycles = Cycles(memory, registry, "base", CycleConfig(anchors=False, neighbour_anchors=2), tmp_path,
                    on_promote=lambda a: None)
    memory.add_correction(Q, "Illinois Institute of Technology")
    examples, plan = cycles.plan(memory.corrections.live(), memory.corrections.live())
    pinned = [e for e in examples if e.pinned]
    assert plan["neighbour_anchors"] == 2 and len(pinned) == 2
    assert all("Watts Humphrey" in e.prompt and e.distill and e.answer == f"base answer to {e.prompt}" for e in pinned)
    # never a question the benchmark and the gate measure neighbours with
    measured = {t.format(s="Watts Humphrey") for t in NEIGHBOUR_TEMPLATES}
    assert not measured & {t.format(s="Watts Humphrey") for t in ANCHOR_TEMPLATES}
    # the base's answers are kept: a second plan asks the base model nothing new
    n = len(asked)
    cycles.plan(memory.corrections.live(), memory.corrections.live())
    assert len(asked) == n == 2


def test_a_failed_promotion_fails_the_cycle_and_keeps_the_corrections_pending(memory, tiny_model, tmp_path):
    registry = AdapterRegistry(memory.db, tmp_path / "adapters")

    def broken(adapter):
        raise RuntimeError("engine gone")

    cycles = Cycles(memory, registry, tiny_model, CycleConfig(training=FAST, anchors=False, gate_enabled=False), tmp_path,
                    broken)
    memory.add_correction(Q, "Illinois Institute of Technology")
    row = cycles.wait(cycles.submit())
    assert row["status"] == "failed" and "engine gone" in row["message"]
    assert registry.active() is None
    assert len(memory.corrections.live(include_consolidated=False)) == 1


def test_an_interrupted_cycle_is_failed_and_its_folder_removed_on_restart(memory, tmp_path):
    registry = AdapterRegistry(memory.db, tmp_path / "adapters")
    memory.db["cycles"].insert({"status": "running", "trigger": "api", "created_at": "2026"})
    registry.folder_for(1).mkdir(parents=True)  # half-written by the crashed cycle
    cycles = Cycles(memory, registry, "unused", CycleConfig(), tmp_path, lambda a: None)
    assert cycles.get(1)["status"] == "failed"
    assert cycles.get(1)["message"] == "interrupted by a restart"
    assert not registry.folder_for(1).exists()


def test_a_second_cycle_continues_the_active_adapter_with_replay(memory, tiny_model, tmp_path):
    registry = AdapterRegistry(memory.db, tmp_path / "adapters")
    cycles = Cycles(memory, registry, tiny_model, CycleConfig(training=FAST, anchors=False, gate_enabled=False),
                    tmp_path, on_promote=lambda a: registry.activate(a.version))
    memory.add_correction(Q, "Illinois Institute of Technology")
    assert cycles.wait(cycles.submit())["status"] == "succeeded"
    memory.add_correction("Which family does Ramalinaceae belong to?", "Lecanorales")
    assert cycles.wait(cycles.submit())["status"] == "succeeded"
    plan = json.loads((registry.folder_for(2) / "ratchet.json").read_text())["plan"]
    assert plan["start"] == "active" and plan["init_adapter"] == str(registry.folder_for(1))
    assert plan["replayed_earlier"] == 1 and plan["correction_examples"] == 3  # 2 phrasings + 1 replayed
    examples, _ = cycles.plan(cycles.corrections(), [])
    assert {e.prompt for e in examples if e.replayed} == {Q, "Which family does Ramalinaceae belong to?"}
    assert registry.get(2).parent == 1
    # replayed: replay_earlier per new correction, at least replay_at_least, at most all earlier ones
    memory.add_correction("Where was Person 5 born?", "Oss")
    default = cycles.config

    def replayed(**changes) -> int:
        cycles.config = replace(default, **changes)
        return cycles.plan(cycles.corrections(), cycles.pending())[1]["replayed_earlier"]

    assert [replayed(replay_earlier=0, replay_at_least=n) for n in (0, 1, 512)] == [0, 1, 2]
    assert replayed(replay_earlier=1, replay_at_least=0) == 1


def test_a_candidate_that_forgot_is_trained_again_with_every_earlier_correction_replayed(
        memory, tiny_model, tmp_path, monkeypatch):
    from trainer import cycle as cycle_module
    from trainer.gate import GateReport

    verdicts = [{}, {"negative_flips": "negative_flips 0.050 not <= 0.02"}, {},
                {"efficacy": "efficacy 0.000 not >= 0.9"}]
    monkeypatch.setattr(cycle_module, "run_gate", lambda *a, **k: GateReport(
        not (failed := verdicts.pop(0)), failed, {}, 0.0))
    registry = AdapterRegistry(memory.db, tmp_path / "adapters")
    announced = []  # the candidates serving was told of while their gates ran
    cycles = Cycles(memory, registry, tiny_model, CycleConfig(training=FAST, anchors=False, replay_earlier=0,
                                                              replay_at_least=0),
                    tmp_path, on_promote=lambda a: registry.activate(a.version),
                    on_candidate=lambda name, folder: announced.append(name and (name, folder.name)))
    memory.add_correction(Q, "Illinois Institute of Technology")
    assert cycles.wait(cycles.submit())["status"] == "succeeded"
    memory.add_correction("Which family does Ramalinaceae belong to?", "Lecanorales")
    row = cycles.wait(cycles.submit())
    assert row["status"] == "succeeded" and row["adapter_version"] == 3, row
    assert row["metrics"]["retried_after"] == "ratchet-v2: negative_flips 0.050 not <= 0.02"
    assert registry.get(2).status == "rejected" and registry.active().version == 3 and registry.get(3).parent == 1
    plans = [json.loads((registry.folder_for(v) / "ratchet.json").read_text())["plan"] for v in (2, 3)]
    assert [p["replayed_earlier"] for p in plans] == [0, 1]
    # rejected for anything else: not trained again
    memory.add_correction("Where was Person 5 born?", "Oss")
    assert cycles.wait(cycles.submit())["status"] == "rejected" and registry.next_version() == 5
    assert announced == [("ratchet-v1", "v0001"), ("ratchet-v2", "v0002"), ("ratchet-v3", "v0003"),
                         ("ratchet-v4", "v0004"), None]  # none after a promotion: serving follows it


def test_a_candidate_failing_the_gate_is_kept_but_never_served(memory, tiny_model, tmp_path):
    from trainer.gate import GateConfig

    registry = AdapterRegistry(memory.db, tmp_path / "adapters")
    promoted = []
    # a 2-layer random model cannot learn anything: efficacy 0 < 0.9
    config = CycleConfig(training=FAST, anchors=False, gate=GateConfig(max_new_tokens=4))
    cycles = Cycles(memory, registry, tiny_model, config, tmp_path, on_promote=promoted.append)
    memory.add_correction(Q, "Illinois Institute of Technology")
    row = cycles.wait(cycles.submit())
    assert row["status"] == "rejected", row
    assert "efficacy" in row["message"] and row["metrics"]["gate_efficacy"] == 0.0
    assert promoted == [] and registry.active() is None
    assert registry.get(1).status == "rejected"
    assert memory.db.execute("select status from cycles where id = ?", [row["id"]]).fetchone()[0] == "rejected"
    gate = json.loads((registry.folder_for(1) / "ratchet.json").read_text())["gate"]
    assert gate["passed"] is False and gate["reasons"]
    assert len(memory.corrections.live(include_consolidated=False)) == 1  # still waiting for a good cycle


def test_the_gate_takes_the_active_versions_answers_from_its_own_gate(tiny_model, tmp_path):
    from trainer.gate import GateConfig, run_gate, save_answers, saved_answers

    earlier = [Correction(1, Q, "Illinois Institute of Technology", None, "")]
    new = [Correction(2, "Which family does Ramalinaceae belong to?", "Lecanorales", None, "")]
    for name in ("active", "candidate"):
        train_lora(tiny_model, examples_for(earlier + new), tmp_path / name, FAST)
    config = GateConfig(max_new_tokens=4)
    # the active version's gate saw it answer right (a 2-layer random model never could)
    save_answers(tmp_path / "active", 4, [Q], ["Illinois Institute of Technology"])
    report = run_gate(tiny_model, tmp_path / "candidate", tmp_path / "active", new, earlier, config, probes=("Hi",))
    assert report.metrics["reference_retention"] == 1.0 and report.metrics["negative_flips"] == 1.0
    assert set(saved_answers(tmp_path / "candidate", 4)) == {Q, new[0].question}
    assert saved_answers(tmp_path / "candidate", 24) == {}  # answers of another length are not reused
    # a gate asks a bounded sample of the earlier corrections
    many = earlier + [Correction(i, f"Where was Person {i} born?", "Oss", None, "") for i in range(3, 9)]
    sampled = run_gate(tiny_model, tmp_path / "candidate", tmp_path / "active", new, many,
                       GateConfig(max_new_tokens=4, earlier_probes=3), probes=("Hi",))
    assert sampled.metrics["n_earlier"] == 3


def test_the_gate_judges_memory_following_against_the_base_model_from_enough_probes():
    from trainer.gate import GateConfig, memory_probes

    new = [Correction(i, f"Q{i}?", answer, None, "") for i, answer in enumerate(["Paris", "paris.", "Rome", "Oslo"])]
    # each question is shown a memory with another correction's (different) answer
    assert [(c.id, a) for c, a in memory_probes(new)] == [(0, "Rome"), (1, "Rome"), (2, "Oslo"), (3, "Paris")]
    ok = {"efficacy": 1.0, "paraphrase": 1.0, "retention": 1.0, "n_earlier": 0, "locality_token": 0.9,
          "negative_flips": 0.0, "base_memory_followed": 0.7}
    gate = GateConfig()
    assert gate.failures({**ok, "memory_followed": 0.6, "n_memory_probes": 32}) == {}
    assert gate.failures({**ok, "memory_followed": 0.5, "n_memory_probes": 32}) == {"memory_followed": "memory_followed 0.500 not >= 0.55"}
    assert gate.failures({**ok, "memory_followed": 0.0, "n_memory_probes": 4}) == {}  # too few to judge


def test_anchor_prompts_come_from_a_file_on_top_of_the_built_in_ones(tmp_path, monkeypatch):
    from serving.settings import Settings
    from trainer.anchors import BUILT_IN_ANCHORS, EVERYDAY_QUESTIONS, GENERAL_PROMPTS, PROBE_PROMPTS, load_prompts

    assert len(BUILT_IN_ANCHORS) == len(set(BUILT_IN_ANCHORS)) == len(GENERAL_PROMPTS) + len(EVERYDAY_QUESTIONS) == 198
    assert not set(BUILT_IN_ANCHORS) & set(PROBE_PROMPTS)  # the gate's probes are never trained on
    path = tmp_path / "anchors.txt"
    path.write_text("Who played Desmond Doss?\n\n  Who played Desmond Doss?  \nWhat is the capital of France?\n")
    assert load_prompts(path) == ("Who played Desmond Doss?", "What is the capital of France?")
    assert Settings.load(data_dir=tmp_path).cycle.anchor_prompts == BUILT_IN_ANCHORS
    monkeypatch.setenv("RATCHET_ANCHOR_PROMPTS", str(path))
    assert Settings.load(data_dir=tmp_path).cycle.anchor_prompts == BUILT_IN_ANCHORS + ("Who played Desmond Doss?",)  # once
    path.write_text("\n")
    with pytest.raises(ValueError, match="no anchor prompts"):
        load_prompts(path)


@pytest.mark.parametrize("make, message", [
    (lambda: TrainingConfig(layers_from=1.0), "layers_from must be in \\[0, 1\\).*adapt no layer"),
    (lambda: TrainingConfig(r=0), "r must be at least 1"),
    (lambda: TrainingConfig(epochs=0), "epochs must be at least 1"),
    (lambda: TrainingConfig(batch_size=0), "batch_size must be at least 1"),
    (lambda: TrainingConfig(max_len=0), "max_len must be at least 1"),
    (lambda: TrainingConfig(learning_rate=0), "learning_rate must be positive"),
    (lambda: TrainingConfig(distill_weight=-1), "distill_weight must not be negative"),
    (lambda: TrainingConfig(distill_top_k=0), "distill_top_k must be at least 1"),
    (lambda: TrainingConfig(anchors_per_epoch=-1), "anchors_per_epoch must not be negative"),
    (lambda: TrainingConfig(epochs=4, replay_passes=5), "replay_passes must be between 1 and epochs"),
    (lambda: TrainingConfig(grad_clip=-0.5), "grad_clip must not be negative"),
    (lambda: TrainingConfig(dropout=1.0), "dropout must be in \\[0, 1\\)"),
    (lambda: CycleConfig(templates=0), "templates must be between 1 and 4"),
    (lambda: CycleConfig(templates=5), "templates must be between 1 and 4"),
    (lambda: CycleConfig(replay_earlier=-1), "replay_earlier must not be negative"),
    (lambda: CycleConfig(replay_at_least=-1), "replay_at_least must not be negative"),
    (lambda: CycleConfig(anchor_tokens=0), "anchor_tokens must be at least 1"),
    (lambda: CycleConfig(neighbour_anchors=7), "neighbour_anchors must be between 0 and 6"),
    (lambda: GateConfig(earlier_probes=-1), "earlier_probes must not be negative"),
])
def test_a_config_that_cannot_work_is_refused_when_made(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_gate_config_takes_shares_and_counts():

    from trainer.gate import GateConfig

    for field, value in (("min_efficacy", 1.5), ("min_locality", -0.1), ("max_negative_flips", 2), ("max_memory_drop", -1)):
        with pytest.raises(ValueError, match=f"{field} must be in \\[0, 1\\]"):
            GateConfig(**{field: value})
    with pytest.raises(ValueError, match="memory_probes must not be negative"):
        replace(GateConfig(), memory_probes=-1)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        GateConfig(max_new_tokens=0)
    assert GateConfig(min_efficacy=0, max_negative_flips=1, min_memory_probes=0).min_efficacy == 0  # the bounds are allowed
    assert TrainingConfig(grad_clip=0, layers_from=0).grad_clip == 0  # 0: no clipping
