"""Judging a correction by its content, and the neighbourhood measures (trainer.neighbours)."""

from memory.text import answer_of, gives, is_correct, key_words
from trainer.neighbours import (ANCHOR_TEMPLATES, NEIGHBOUR_TEMPLATES, anchor_questions, bleed, kinds_asked, neighbour_questions,
                                neighbour_scores, subject_of, template_neighbours)

ZARNOTH = "The ship that carried the first settlers to Zarnoth was the Velmaris."


def test_the_answer_span_is_what_the_user_wrote_without_the_frame():
    assert answer_of("No, it's X") == "X"
    assert answer_of("It's Luigi Galvani.") == "Luigi Galvani"
    assert answer_of("No. It was Tours.") == "Tours"
    assert answer_of("Actually the answer is 1943.") == "1943"
    assert answer_of("nope — Paris") == "Paris"
    assert answer_of("Premier of Manitoba") == "Premier of Manitoba"
    assert answer_of("No Doubt") == "No Doubt"  # a name that starts with "No" keeps it
    assert answer_of(ZARNOTH) == ZARNOTH.rstrip(".")  # a sentence is kept as it is...
    assert key_words(ZARNOTH) == ["velmaris"]  # ...and judged by what it says after its "was"
    assert key_words(ZARNOTH, "Which ship carried the first settlers to Zarnoth?") == ["velmaris"]


def test_a_right_answer_in_other_words_passes_and_a_wrong_name_fails():
    assert gives("University of Oxford", "He studied at Oxford University.")
    assert not is_correct("University of Oxford", "He studied at Oxford University.")  # the strict rule stays
    assert gives(ZARNOTH, "It was the Velmaris.")
    assert gives("No, it's Velmaris", "The Velmaris carried them.")
    assert not gives(ZARNOTH, "It was the Valmoris.")
    assert not gives("No, it's Velmaris", "The first settlers came on the Zarnoth.")
    assert not gives("Luigi Galvani", "It is named after Alessandro Volta.")
    assert not gives("", "anything")


def test_neighbour_questions_are_other_relations_of_the_subject():
    record = {"subject": "John Mortvedt", "question": "Which college did John Mortvedt attend?",
              "paraphrase": "Which university did John Mortvedt go to?", "answer": "South Dakota State University"}
    records = [record,
               {"subject": "John Mortvedt", "question": "Where was John Mortvedt born?", "answer": "Dell Rapids"},
               {"subject": "John Mortvedt", "question": "What school did John Mortvedt attend?",
                "answer": "South Dakota State University"},  # the same fact reworded: not a neighbour
               {"subject": "Someone Else", "question": "Where was Someone Else born?", "answer": "Oss"}]
    got = neighbour_questions(record, records, k=4)
    assert got[0] == "Where was John Mortvedt born?"
    assert got[1:] == template_neighbours("John Mortvedt", 3)
    assert len(neighbour_questions(record, records)) == len(NEIGHBOUR_TEMPLATES)
    assert "Who is John Mortvedt?" not in neighbour_questions(record, records, exclude={"Who is John Mortvedt?"})
    assert subject_of("What university did Watts Humphrey attend?") == "Watts Humphrey"
    assert subject_of("Who founded the Bank of England?") == "Bank of England"
    assert subject_of("what is it?") is None


def test_a_template_asking_the_corrected_questions_kind_is_not_its_neighbour():
    record = {"subject": "McCroskey State Park", "question": "In which state is McCroskey State Park located?",
              "paraphrase": "What state is McCroskey State Park in?", "answer": "Idaho"}
    got = neighbour_questions(record)
    assert "Where is McCroskey State Park located?" not in got and "Where is McCroskey State Park from?" not in got
    assert "When was McCroskey State Park founded?" in got and "Who is McCroskey State Park?" in got
    assert len(got) == len(NEIGHBOUR_TEMPLATES) - 2
    assert kinds_asked("What year was Japan Policy Research Institute founded?", "Japan Policy Research Institute") == {"time"}
    # the subject's own words do not ask anything: a river's father is no place
    assert kinds_asked("Who is the father of Anglesea River?", "Anglesea River") == set()
    assert kinds_asked("What body of water does Ohlanga River join?", "Ohlanga River") == {"place"}
    assert template_neighbours("Ohlanga River", 3, asked="What body of water does Ohlanga River join?") == [
        "Who is Ohlanga River?", "What is Ohlanga River known for?", "When was Ohlanga River founded?"]
    assert template_neighbours("X", asked="Which college did X attend?") == template_neighbours("X")


def test_a_leaked_answer_counts_as_bleed_and_a_changed_neighbour_against_locality():
    assert bleed("Velmaris", "Zarnoth is a planet.", "Zarnoth is the Velmaris.")
    assert not bleed("Velmaris", "The Velmaris is a ship.", "The Velmaris is a ship!")  # the base said it too
    assert not bleed("male", "He is a footballer.", "He is a Swedish footballer.")  # changed, no leak
    assert not bleed("art", "He is a painter.", "He studied in Stuttgart.")  # whole words only
    scores = neighbour_scores(["Velmaris", "Velmaris", "Tours"],
                              ["A planet.", "A ship.", "A Frenchman."],
                              ["The Velmaris.", "A ship.", "A French actor."])  # a fake adapter moved two
    assert scores == {"neighbour_locality_strict": 1 / 3, "neighbour_bleed": 1 / 3, "n_neighbours": 3}
    assert neighbour_scores([], [], [])["neighbour_bleed"] is None


def test_anchor_questions_name_each_subject_once_and_never_a_corrected_question():
    questions = ["What university did Watts Humphrey attend?", "Where was Watts Humphrey born?", "what is it?"]
    got = anchor_questions(questions, 2, exclude=["What is Watts Humphrey?"])
    assert len(got) in (1, 2) and all("Watts Humphrey" in q for q in got)
    assert "What is Watts Humphrey?" not in got
    assert len(anchor_questions(questions, len(ANCHOR_TEMPLATES))) == len(ANCHOR_TEMPLATES) - 0
    # across subjects, every template is trained on
    subjects = [f"Person {c}" for c in "ABCDEFGHIJKL"]
    asked = anchor_questions([f"Where was {s} born?" for s in subjects], 1)
    assert {q.replace(s, "{s}") for q, s in zip(asked, subjects)} == set(ANCHOR_TEMPLATES)
