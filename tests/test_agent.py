import json
import sqlite3

import pytest
from langgraph.checkpoint.sqlite import SqliteSaver

from agent import Agent
from memory.text import with_memories

Q = "What university did Watts Humphrey attend?"


def test_memories_enter_the_prompt_as_earlier_exchanges_after_the_system_message():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}]
    memories = [{"question": "best?", "answer": "A1"}, {"question": "second?", "answer": "A2"}]
    prompt = with_memories(messages, memories)
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert prompt[-2]["content"] == "A1"  # the best match sits nearest to the question
    assert prompt[-1] == {"role": "user", "content": "Q?"}
    assert with_memories(messages, []) == messages


def test_the_graph_retrieves_responds_and_records(memory, echo_model):
    memory.add_correction(Q, "Illinois Institute of Technology", user="ann")
    agent = Agent(memory, echo_model)
    reply = agent.chat([{"role": "user", "content": Q}], user="ann", model_name="ratchet")
    assert reply.text == "Illinois Institute of Technology"
    assert reply.response_id.startswith("chatcmpl-")
    assert [m["answer"] for m in reply.memories] == ["Illinois Institute of Technology"]
    row = memory.interactions.get(reply.response_id)
    assert row["prompt"] == Q and row["response"] == reply.text and row["user"] == "ann"
    assert json.loads(row["memory_ids"]) == [reply.memories[0]["id"]]


def test_memory_can_be_switched_off_per_request(memory, echo_model):
    memory.add_correction(Q, "Illinois Institute of Technology", user="ann")
    agent = Agent(memory, echo_model)
    reply = agent.chat([{"role": "user", "content": Q}], user="ann", use_memory=False)
    assert reply.text == "I do not know" and reply.memories == []
    assert memory.interactions.get(reply.response_id)["use_memory"] == 0


def test_the_adapter_is_passed_to_the_model(memory, echo_model):
    Agent(memory, echo_model).chat([{"role": "user", "content": "hi"}], adapter="ratchet-v3")
    assert echo_model.calls[-1]["adapter"] == "ratchet-v3"


def test_with_a_scope_the_adapter_answers_only_questions_near_a_correction(memory, echo_model):
    memory.add_correction(Q, "Illinois Institute of Technology", user="ann")
    agent = Agent(memory, echo_model, scope=0.7)
    echo_model.taught["ratchet-v3"] = "Illinois Institute of Technology"
    near = agent.chat([{"role": "user", "content": "Which university did Watts Humphrey go to?"}], user="ann",
                      adapter="ratchet-v3", use_memory=False)
    assert echo_model.calls[-1]["adapter"] == "ratchet-v3" and near.adapter == "ratchet-v3" and near.memories == []
    far = agent.chat([{"role": "user", "content": "How many legs does a spider have?"}], user="ann", adapter="ratchet-v3")
    assert echo_model.calls[-1]["adapter"] is None and far.adapter is None
    assert memory.interactions.get(far.response_id)["adapter"] is None  # recorded as what answered


def test_an_answer_a_correction_changed_without_giving_it_is_the_base_models(memory, echo_model):
    memory.add_correction(Q, "Illinois Institute of Technology", user="ann")
    agent = Agent(memory, echo_model, scope=0.5)
    echo_model.taught["ratchet-v3"] = "Hugh Redfield Humphrey"  # an adapter that rewrote the whole subject
    asked = [{"role": "user", "content": "Who is Watts Humphrey?"}]
    reply = agent.chat(asked, user="ann", adapter="ratchet-v3", use_memory=False)
    assert [c["adapter"] for c in echo_model.calls] == ["ratchet-v3", None]
    assert reply.text == "I do not know" and reply.adapter is None  # the base model's own answer
    assert memory.interactions.get(reply.response_id)["adapter"] is None
    # a stream whose answer a correction may change is checked first, then sent in one piece
    *pieces, streamed = agent.stream(asked, user="ann", adapter="ratchet-v3", use_memory=False)
    assert pieces == ["I do not know"] and streamed.adapter is None
    # an answer that gives the correction stands
    echo_model.taught["ratchet-v3"] = "He went to the Illinois Institute of Technology."
    assert agent.chat(asked, user="ann", adapter="ratchet-v3", use_memory=False).adapter == "ratchet-v3"
    # a memory shown to another question about the subject, and not given: the answer without it
    unscoped = Agent(memory, echo_model, threshold=0.5)
    echo_model.taught["ratchet-v3"] = "Hugh Redfield Humphrey"
    shown = unscoped.chat(asked, user="ann", adapter="ratchet-v3")
    assert shown.memories and echo_model.calls[-1]["adapter"] is None and shown.text == "I do not know"
    assert not any(m["role"] == "assistant" for m in echo_model.calls[-1]["messages"])  # shown no memory


def test_a_thread_keeps_its_history_across_calls(memory, echo_model, tmp_path):
    saver = SqliteSaver(sqlite3.connect(tmp_path / "threads.db", check_same_thread=False))
    agent = Agent(memory, echo_model, checkpointer=saver)
    agent.chat([{"role": "user", "content": "first"}], thread_id="t1")
    agent.chat([{"role": "user", "content": "second"}], thread_id="t1")
    sent = echo_model.calls[-1]["messages"]
    assert [m["content"] for m in sent] == ["first", "I do not know", "second"]
    agent.chat([{"role": "user", "content": "other"}], thread_id="t2")
    assert [m["content"] for m in echo_model.calls[-1]["messages"]] == ["other"]


def test_threads_need_a_checkpointer(memory, echo_model):
    with pytest.raises(ValueError):
        Agent(memory, echo_model).chat([{"role": "user", "content": "x"}], thread_id="t1")


def test_the_adapter_scope_is_a_setting(tmp_path, monkeypatch):
    from memory import ADAPTER_SCOPE
    from serving.settings import Settings

    assert Settings.load(data_dir=tmp_path).adapter_scope == ADAPTER_SCOPE
    monkeypatch.setenv("RATCHET_ADAPTER_SCOPE", "0.8")
    assert Settings.load(data_dir=tmp_path).adapter_scope == 0.8
    monkeypatch.setenv("RATCHET_ADAPTER_SCOPE", "off")
    assert Settings.load(data_dir=tmp_path).adapter_scope == 0.0  # the adapter answers everything


def test_training_shows_memories_exactly_as_the_agent_serves_them(memory, echo_model):
    """The trainer's memory examples and the gate build their prompts with trainer.dataset.messages_of;
    the agent with memory.text.with_memories. For the same memories both must give the same messages."""
    from trainer.dataset import messages_of

    memory.add_correction("Who founded the Zarnoth colony?", "Velmaris", user="ann")
    memory.add_correction(Q, "Illinois Institute of Technology", user="ann")
    reply = Agent(memory, echo_model).chat([{"role": "user", "content": Q}], user="ann")
    served = json.loads(memory.interactions.get(reply.response_id)["messages"])
    shown = tuple((m["question"], m["answer"]) for m in reversed(reply.memories))  # in the order they appear
    assert reply.memories and served == messages_of(Q, shown)


class UniversityMatcher:
    """A stand-in for memory.matcher.Matcher: two questions are the same when both ask about a university."""

    def probability(self, query, questions):
        import numpy as np

        return np.array([0.9 if "universit" in query.lower() and "universit" in q.lower() else 0.1 for q in questions])


def test_with_a_matcher_a_neighbour_question_sees_no_memory_and_stays_out_of_the_adapters_scope(memory, echo_model):
    memory.add_correction(Q, "Illinois Institute of Technology", user="ann")
    echo_model.taught["ratchet-v3"] = "Illinois Institute of Technology"
    neighbour = [{"role": "user", "content": "Who is Watts Humphrey?"}]
    loose = Agent(memory, echo_model, threshold=0.5, scope=0.5)
    assert loose.chat(neighbour, user="ann", adapter="ratchet-v3").memories  # similar enough without a matcher
    memory.corrections.matcher = UniversityMatcher()
    agent = Agent(memory, echo_model, threshold=0.5, scope=0.5, same=0.5)
    reply = agent.chat(neighbour, user="ann", adapter="ratchet-v3")
    assert reply.memories == [] and reply.adapter is None and echo_model.calls[-1]["adapter"] is None
    paraphrase = agent.chat([{"role": "user", "content": "Which university did Watts Humphrey go to?"}], user="ann",
                            adapter="ratchet-v3")
    assert paraphrase.adapter == "ratchet-v3" and echo_model.calls[-1]["adapter"] == "ratchet-v3"
    assert [m["answer"] for m in paraphrase.memories] == ["Illinois Institute of Technology"]
    assert loose.chat(neighbour, user="ann", adapter="ratchet-v3").memories  # no `same`: the matcher is not asked


def test_with_a_matcher_a_paraphrase_below_the_similarity_threshold_sees_its_memory(memory, echo_model):
    from memory.matcher import CANDIDATE_SIMILARITY

    memory.add_correction(Q, "Illinois Institute of Technology", user="ann")
    paraphrase = [{"role": "user", "content": "Which university did Watts Humphrey go to?"}]
    assert Agent(memory, echo_model, threshold=0.99).chat(paraphrase, user="ann").memories == []
    memory.corrections.matcher = UniversityMatcher()
    shown = Agent(memory, echo_model, threshold=0.99, same=0.5).chat(paraphrase, user="ann").memories
    assert [m["answer"] for m in shown] == ["Illinois Institute of Technology"]
    assert shown[0]["same"] == 0.9 and CANDIDATE_SIMILARITY <= shown[0]["score"] < 0.99


def test_the_same_question_probability_is_a_setting(tmp_path, monkeypatch):
    from memory.matcher import SAME_QUESTION_PROBABILITY
    from serving.settings import Settings

    assert Settings.load(data_dir=tmp_path).same_question == SAME_QUESTION_PROBABILITY
    monkeypatch.setenv("RATCHET_SAME_QUESTION", "0.8")
    assert Settings.load(data_dir=tmp_path).same_question == 0.8
    monkeypatch.setenv("RATCHET_SAME_QUESTION", "off")
    assert Settings.load(data_dir=tmp_path).same_question == 0.0  # cosine similarity alone
    with pytest.raises(ValueError, match="same_question"):
        Settings(data_dir=tmp_path, same_question=1.5)
