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
