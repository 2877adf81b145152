"""The merged lane (blue/green beside the LoRA engine), with fake engines: routing, and a lane
that is retired only after its running requests are done; the merge itself on a tiny model."""

import threading

import pytest

import serving.engines.lanes as lanes
from serving.engines.lanes import lane_args
from serving.engines.vllm import VLLMOptions


class FakeLane:
    started: list = []

    def __init__(self, model_path, options, log_path=None):
        self.model_path, self.options, self.up = model_path, options, False
        self.hold: threading.Event | None = None
        self.entered = threading.Event()

    def start(self):
        self.up = True
        FakeLane.started.append(self)

    def stop(self):
        self.up = False

    def alive(self):
        return self.up

    def running(self):
        return self.up

    def complete(self, messages, *, adapter=None, max_tokens=256, temperature=0.0):
        from agent.protocol import Completion

        assert adapter is None and self.up  # a lane is a plain model; a stopped one fails
        self.entered.set()
        if self.hold:
            self.hold.wait(10)
        assert self.up, "the lane was stopped under a running request"
        return Completion(text=f"lane {self.model_path}")

    def agreement(self, prompt_ids, answer_ids, adapter=None):
        assert adapter is None and self.up
        return len(answer_ids) - 1


@pytest.fixture
def engine(tmp_path, echo_model, monkeypatch):
    FakeLane.started = []
    monkeypatch.setattr(lanes, "VLLMEngine", FakeLane)
    monkeypatch.setattr(lanes, "merge_in_child", lambda base, path, out: out)
    e = lanes.MergedLanes(echo_model, "base", VLLMOptions(port=1234), tmp_path / "merged", None)
    e.start()
    yield e
    e.stop()


def wait_for(predicate):
    for _ in range(400):
        if predicate():
            return True
        threading.Event().wait(0.025)
    return False


def test_the_active_adapter_moves_to_its_merged_lane_and_the_rest_stays_on_lora(engine, echo_model, tmp_path):
    msg = [{"role": "user", "content": "hi"}]
    assert engine.complete(msg, adapter="ratchet-v1").text == "I do not know"  # no lane yet: LoRA
    engine.follow("ratchet-v1", "/adapters/v0001")
    assert wait_for(lambda: engine.lanes == ["ratchet-v1"])
    lane = FakeLane.started[0]
    assert lane.options.enable_lora is False and lane.options.port == 0  # plain, on a port of its own
    assert "--enforce-eager" in lane.options.extra_args  # no torch.compile at every cycle's lane start
    assert engine.complete(msg, adapter="ratchet-v1").text == f"lane {tmp_path / 'merged' / 'ratchet-v1'}"
    assert engine.complete(msg, adapter="ratchet-v2").text == "I do not know"
    assert engine.complete(msg, adapter=None).text == "I do not know"
    assert [c["adapter"] for c in echo_model.calls] == ["ratchet-v1", "ratchet-v2", None]
    # token agreement with the adapter is scored on its lane (vLLM cannot with LoRA), the rest on LoRA
    assert engine.agreement([1], [2, 3, 4], adapter="ratchet-v1") == 2
    assert engine.agreement([1], [2, 3, 4], adapter="ratchet-v2") == 0
    assert engine.agreement([1], [2, 3, 4]) == 3


def test_a_replaced_lane_finishes_its_requests_before_it_stops(engine):
    msg = [{"role": "user", "content": "hi"}]
    engine.follow("ratchet-v1", "/a1")
    assert wait_for(lambda: engine.lanes == ["ratchet-v1"])
    old = FakeLane.started[0]
    old.hold = threading.Event()
    result = {}
    request = threading.Thread(target=lambda: result.update(c=engine.complete(msg, adapter="ratchet-v1")))
    request.start()
    assert old.entered.wait(10)
    engine.follow("ratchet-v2", "/a2")
    assert wait_for(lambda: "ratchet-v1" not in engine.lanes)  # no new requests go to it...
    assert old.up  # ...but it is not stopped under the running one
    old.hold.set()
    request.join(10)
    assert result["c"].text.startswith("lane") and wait_for(lambda: not old.up)
    assert wait_for(lambda: engine.lanes == ["ratchet-v2"])
    engine.follow(None, None)  # rolled back to the base model: no lane
    assert wait_for(lambda: engine.lanes == [])


def test_a_lane_is_eager_unless_the_operator_says_how_to_compile():
    assert lane_args([]) == ["--enforce-eager"]
    assert lane_args(["--max-num-seqs", "8"]) == ["--max-num-seqs", "8", "--enforce-eager"]
    for chosen in (["--enforce-eager"], ["--compilation-config", "{}"], ["--compilation-config={}"], ["-O3"]):
        assert lane_args(chosen) == chosen


def test_a_candidates_lane_starts_while_its_gate_runs_and_goes_if_it_is_not_promoted(engine):
    engine.follow("ratchet-v1", "/a1")
    assert wait_for(lambda: engine.lanes == ["ratchet-v1"])
    engine.prepare("ratchet-v2", "/a2")  # v2's gate is running: its lane starts beside v1's
    assert wait_for(lambda: engine.lanes == ["ratchet-v1", "ratchet-v2"])
    engine.follow("ratchet-v2", "/a2")  # promoted: served by the lane already up, v1's retired
    assert wait_for(lambda: engine.lanes == ["ratchet-v2"])
    assert [lane.model_path.rsplit("/", 1)[-1] for lane in FakeLane.started] == ["ratchet-v1", "ratchet-v2"]
    engine.prepare("ratchet-v3", "/a3")
    assert wait_for(lambda: engine.lanes == ["ratchet-v2", "ratchet-v3"])
    engine.prepare(None, None)  # v3 rejected: its lane goes, the active one stays
    assert wait_for(lambda: engine.lanes == ["ratchet-v2"])
    assert [lane.up for lane in FakeLane.started] == [False, True, False]


def test_an_adapter_is_merged_in_a_child_process_and_a_bad_one_says_why(tiny_model, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    out = lanes.merge_in_child(tiny_model, str(tmp_path / "adapter"), tmp_path / "merged")
    merged, base = load_file(out / "model.safetensors"), load_file(f"{tiny_model}/model.safetensors")
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert (out / "tokenizer_config.json").exists() and not (tmp_path / "merged.partial").exists()
    with pytest.raises(RuntimeError, match="merging .* failed"):
        lanes.merge_in_child(tiny_model, str(tmp_path / "no-such-adapter"), tmp_path / "merged2")
