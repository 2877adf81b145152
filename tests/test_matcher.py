"""The shipped same-question model (memory.matcher), on questions that are not in the zsRE file."""

from memory.matcher import SAME_QUESTION_PROBABILITY, Matcher


def test_the_shipped_model_tells_a_paraphrase_from_another_question_about_the_subject():
    matcher = Matcher()
    question = "Which city was the painter Elvira Montano born in?"
    same, *others = matcher.probability(question, [
        "In which city was Elvira Montano born?",
        "Who is Elvira Montano?",
        "What is Elvira Montano known for?",
        "Which school did Elvira Montano attend?",
    ])
    assert same >= SAME_QUESTION_PROBABILITY > max(others)


def test_the_probability_does_not_depend_on_which_question_is_asked():
    matcher = Matcher()
    a, b = "Who published The Glass Orchard?", "Which publisher released The Glass Orchard?"
    assert abs(matcher.probability(a, [b])[0] - matcher.probability(b, [a])[0]) < 1e-5
    assert len(matcher.probability(a, [])) == 0


def test_the_matcher_report_lists_neighbours_by_template_at_the_probabilities_in_use(tmp_path, capsys):
    from agent.repair import REPAIR_PROBABILITY
    from evals.same_question import write_matcher
    from trainer.neighbours import NEIGHBOUR_TEMPLATES

    table = [{"threshold": t, "paraphrase": 0.9, "neighbour": 0.05, "other_fact": 0.01,
              "by_template": {x: (0.2 if x == "Who is {s}?" else 0.0) for x in NEIGHBOUR_TEMPLATES}}
             for t in (0.1, SAME_QUESTION_PROBABILITY, REPAIR_PROBABILITY)]
    write_matcher({"report split": table}, [{"similarity": 0.7, "paraphrase": 0.988}], tmp_path, 1.0)
    md = (tmp_path / "matcher.md").read_text()
    assert f"| template | P ≥ {SAME_QUESTION_PROBABILITY} | P ≥ {REPAIR_PROBABILITY} |" in md
    assert "| Who is {s}? | 0.2000 | 0.2000 |" in md and "| When was {s} founded? | 0.0000 | 0.0000 |" in md


def test_a_general_question_about_a_name_is_not_a_particular_fact_about_it():
    from memory.text import asks_in_general, general_about

    assert general_about("Who is The Duck Doctor?") == "the duck doctor"
    assert general_about("What is Fisher information best known for?") == "fisher information"
    assert general_about("Tell me about 167 Urda.") == "167 urda"
    # particular facts in the same words: a relation, a possessive, a trailing preposition
    for q in ("Who is the mother of Momus?", "What was Mark Naley's career?", "What was Balla Tounkara from?",
              "Where is Momus located?"):
        assert general_about(q) is None, q
    assert asks_in_general("Who is Momus?", "Who was the mother of Momus?")
    assert asks_in_general("Who was the mother of Momus?", "Who is Momus?")  # either way round
    assert asks_in_general("What is 167 Urda known for?", "Who found 167 Urda?")
    # paraphrases (dev records) and two general questions are left to the model
    assert not asks_in_general("Who was Momus's mother?", "Who was the mother of Momus?")
    assert not asks_in_general("Who's Strange Luck By?", "Who is Strange Luck by?")
    assert not asks_in_general("Who is Momus?", "What is Momus known for?")
    assert not asks_in_general("Who is Momus?", "Who is Nyx?")  # another name


def test_the_matcher_never_takes_a_general_question_for_a_particular_fact():
    matcher = Matcher()
    general, particular, paraphrase = matcher.probability("Who is Momus?", [
        "Who was the mother of Momus?", "Who is the mother of Momus?", "Who is Momus?"])
    assert general == particular == 0.0
    assert paraphrase >= SAME_QUESTION_PROBABILITY


def test_questions_that_ask_different_kinds_of_answer_are_never_one():
    from memory.text import answer_kinds, different_questions

    assert answer_kinds("By whom was The Color of Pomegranates directed?") == {"person"}
    assert answer_kinds("What is the name of the airport where East African Airlines is located?") == {"place"}
    assert different_questions("Where is 167 Urda located?", "Who found 167 Urda?")
    assert different_questions("When was Schwanheide station created?", "Where is Schwanheide station?")
    assert not different_questions("Who directed Lies of Love?", "Whose direction is Lies of Love?")
    assert not different_questions("What year was X founded?", "When was X founded?")  # no interrogative of a kind in one
    assert Matcher().probability("Where is Lies of Love located?", ["Whose direction is Lies of Love?"])[0] == 0.0


def test_a_particular_question_shaped_like_a_general_one_is_still_particular():
    from memory.text import asks_in_general

    # "What is X named after?" reads like "What is <name>?" with the name "X named after"
    assert asks_in_general("What is Galvani potential known for?", "What is Galvani potential named after?")
