"""The agent's verify-and-repair step (agent.repair): an answer that ignores a memory of the very
question asked is replaced by the correction, streamed or not, and recorded as served."""

from agent import Agent
from agent.protocol import Completion
from agent.repair import REPAIR_PROBABILITY, REPAIR_SCORE, repaired, same_question_memory

Q = "What university did Watts Humphrey attend?"


class StubbornModel:
    """A chat model that ignores its memories: always the same answer."""

    def __init__(self, text: str = "He went to Harvard University."):
        self.text = text
        self.calls = 0

    def complete(self, messages, *, adapter=None, max_tokens=256, temperature=0.0):
        self.calls += 1
        return Completion(text=self.text, prompt_tokens=len(messages), completion_tokens=6)

    def stream(self, messages, *, adapter=None, max_tokens=256, temperature=0.0):
        c = self.complete(messages)
        words = c.text.split(" ")
        yield from [w if i == 0 else " " + w for i, w in enumerate(words)]
        yield c


def test_only_a_confident_same_question_memory_repairs_and_only_an_answer_that_ignores_it():
    memory = {"id": 1, "question": Q, "answer": "No, it's the Illinois Institute of Technology.", "score": 0.97}
    assert same_question_memory([memory, {**memory, "score": 0.88}]) is memory
    assert same_question_memory([{**memory, "score": REPAIR_SCORE - 0.01}]) is None
    assert same_question_memory([]) is None
    wrong = Completion(text="Harvard.", prompt_tokens=9, completion_tokens=2)
    fixed = repaired(wrong, memory, Q)
    assert fixed.text == "the Illinois Institute of Technology" and fixed.prompt_tokens == 9
    assert repaired(Completion(text="Illinois Institute of Technology, in Chicago."), memory, Q) is None
    assert repaired(wrong, None, Q) is None


def test_a_memory_the_matcher_read_repairs_by_its_probability_not_its_similarity():
    memory = {"id": 1, "question": Q, "answer": "Illinois Institute of Technology", "score": 0.8,
              "same": REPAIR_PROBABILITY}
    assert same_question_memory([memory]) is memory  # far in wording, surely the same question
    assert same_question_memory([{**memory, "score": 0.99, "same": REPAIR_PROBABILITY - 0.1}]) is None
    assert same_question_memory([{**memory, "same": 0.5}, {**memory, "id": 2, "score": 0.7}])["id"] == 2


def test_the_agent_answers_with_the_correction_it_ignored_streamed_or_not(memory):
    memory.add_correction(Q, "Illinois Institute of Technology", user="ann")
    model = StubbornModel()
    agent = Agent(memory, model)
    reply = agent.chat([{"role": "user", "content": Q}], user="ann")
    assert reply.text == "Illinois Institute of Technology"
    assert memory.interactions.get(reply.response_id)["response"] == reply.text
    pieces = list(agent.stream([{"role": "user", "content": Q}], user="ann"))
    *deltas, final = pieces
    assert "".join(deltas) == final.text == "Illinois Institute of Technology"  # streamed = recorded
    assert memory.interactions.get(final.response_id)["response"] == final.text


def test_questions_without_a_same_question_memory_keep_their_answer_and_stream(memory):
    memory.add_correction(Q, "Illinois Institute of Technology", user="ann")
    agent = Agent(memory, StubbornModel())
    far = agent.chat([{"role": "user", "content": "How many legs does a spider have?"}], user="ann")
    assert far.text == "He went to Harvard University." and far.memories == []
    *deltas, final = list(agent.stream([{"role": "user", "content": "Who wrote Hamlet?"}], user="ann"))
    assert len(deltas) > 1 and "".join(deltas) == final.text  # streamed token by token as before
    off = agent.chat([{"role": "user", "content": Q}], user="ann", use_memory=False)
    assert off.text == "He went to Harvard University."  # memory off: nothing to repair with


def test_the_repair_replayed_on_a_recorded_run_fixes_ignored_memories_only():
    from evals.repair_replay import replay

    same = [{"score": 1.0, "answer": "Tours"}]
    row = {"answer": "Tours", "question": "Where was Narcy born?", "paraphrase": "Narcy's birthplace?",
           "neighbours": ["Who is Narcy?"],
           "base": {"q": "Paris", "p": "Paris", "l": "x", "n": ["An actor."]},
           "got": {"q": "Paris", "p": "In Tours.", "l": "x", "n": ["An actor."],
                   "shown": {"q": same, "p": [{"score": 0.9, "answer": "Tours"}], "l": [], "n": [[]]}}}
    scores, counts = replay({"memory_tier_answers": [row]})
    assert scores["before"]["reliability"] == 0.0 and scores["after"]["reliability"] == 1.0
    assert counts == {"q": 1, "p": 0, "n": 0, "partial": 0}  # the paraphrase gave it already; the neighbour saw no memory
    assert scores["after"]["neighbour_locality_strict"] == 1.0


def test_the_replay_serves_the_answer_shown_no_memory_where_a_memory_changed_it_without_being_given():
    from evals.repair_replay import replay

    near = [{"score": 0.9, "answer": "Tours"}]
    row = {"answer": "Tours", "question": "Where was Narcy born?", "paraphrase": "Narcy's birthplace?",
           "neighbours": ["Who is Narcy?", "Where is Narcy from?"],
           "base": {"q": "Tours", "p": "Paris", "l": "x", "n": ["An actor.", "France."]},
           "got": {"q": "Tours", "p": "Lyon", "l": "x", "n": ["A French actor.", "From Tours."],
                   "shown": {"q": [], "p": near, "l": [], "n": [near, near]}}}
    scores, counts = replay({"memory_tier_answers": [row]})
    assert counts == {"q": 0, "p": 1, "n": 1, "partial": 0}  # the paraphrase and the first neighbour: back to the base's
    assert scores["before"]["neighbour_locality_strict"] == 0.0
    assert scores["after"]["neighbour_locality_strict"] == 0.5 and scores["after"]["neighbour_bleed"] == 0.5
    _, unchecked = replay({"memory_tier_answers": [row]}, check=False)
    assert unchecked == {"q": 0, "p": 0, "n": 0, "partial": 0}


def test_the_replay_with_a_matcher_gives_a_neighbour_whose_memory_it_rejects_the_base_answer():
    from evals.repair_replay import replay

    memory = {"score": 0.9, "answer": "Tours", "question": "Where was Narcy born?"}
    row = {"answer": "Tours", "question": "Where was Narcy born?", "paraphrase": "Narcy's birthplace?",
           "neighbours": ["Where is Narcy from?"],
           "base": {"q": "Paris", "p": "Paris", "l": "x", "n": ["France."]},
           "got": {"q": "Tours", "p": "Tours", "l": "x", "n": ["From Tours."],
                   "shown": {"q": [memory], "p": [memory], "l": [], "n": [[memory]]}}}
    pairs = {("Where was Narcy born?", memory["question"]): 0.99, ("Narcy's birthplace?", memory["question"]): 0.8,
             ("Where is Narcy from?", memory["question"]): 0.3}
    scores, _ = replay({"memory_tier_answers": [row]})
    assert scores["after"]["neighbour_bleed"] == 1.0  # the memory took over the neighbour
    scores, counts = replay({"memory_tier_answers": [row]}, same=(pairs, 0.5))
    assert scores["after"]["neighbour_bleed"] == 0.0 and scores["after"]["neighbour_locality_strict"] == 1.0
    assert scores["after"]["generalisation"] == 1.0  # the paraphrase keeps its memory
    scores, _ = replay({"memory_tier_answers": [row]}, same=(pairs, 0.9))
    assert scores["after"]["generalisation"] == 0.0  # rejected too: the base model's answer
