"""Neighbour questions: other questions about a corrected subject, whose answers a correction
must leave alone (locality on the neighbourhood, not only on unrelated questions).

A correction of "What university did X attend?" should change that answer and its paraphrases,
and nothing else about X: "Who is X?" or "Where is X from?" keep the base model's answers, and
the corrected answer must not leak into them (bleed). The reference answers are the base
model's greedy ones; the benchmark (evals/zsre.py) and the gate (trainer/gate.py) both ask these.
"""

from __future__ import annotations

import re

from memory.text import gives, normalise

# Generic questions about any subject, person, place, work or organisation: the base model's
# answers to them are the reference, so a question that fits a subject badly still measures
# whether a correction moved its answer.
NEIGHBOUR_TEMPLATES = (
    "Who is {s}?",
    "What is {s} known for?",
    "Where is {s} located?",
    "Where is {s} from?",
    "When was {s} founded?",
    "Tell me one fact about {s}.",
)

# The kind of thing a template asks, and the words by which a corrected question asks that kind
# (read off the questions of dev records 1-2000). A template of the corrected question's kind asks
# its relation, not another one ("Where is X located?" after "In which state is X located?": the
# corrected state is then its right answer, not a leak), so it is not that question's neighbour.
TEMPLATE_KINDS = {"Where is {s} located?": "place", "Where is {s} from?": "place", "When was {s} founded?": "time"}
KIND_WORDS = {
    "place": frozenset("where located location city town village state country province region county continent "
                       "place birthplace home nationality citizen citizenship river water".split()),
    "time": frozenset("when year date century decade".split()),
}

# Other questions about a corrected subject that training replays with the base model's answers
# (neighbour anchors, trainer.cycle.CycleConfig.neighbour_anchors), so that an adapter learns the
# corrected fact rather than "subject → answer". Kept apart from NEIGHBOUR_TEMPLATES, which
# measure it: a locality that held only on trained phrasings would not hold for users.
ANCHOR_TEMPLATES = (
    "What is {s}?",
    "Give me some background on {s}.",
    "Which country is {s} connected with?",
    "What do people say about {s}?",
    "Describe {s} in one sentence.",
    "What kind of thing is {s}?",
)

_QUESTION_WORDS = frozenset("what which who whom whose where when why how is are was were did do does in of the "
                            "a an tell name".split())
_CAPITALISED = re.compile(r"[A-Z0-9][\w'’.-]*")


def kinds_asked(question: str, subject: str) -> set[str]:
    """The kinds (KIND_WORDS) `question` asks about `subject`, judged by its words other than the
    subject's ("What river does Anglesea River join?" asks a place for its "river", not the name's)."""
    rest = re.sub(re.escape(subject.strip()), " ", question, flags=re.IGNORECASE) if subject.strip() else question
    words = set(re.findall(r"[a-z]+", rest.lower()))
    return {kind for kind, kind_words in KIND_WORDS.items() if words & kind_words}


def template_neighbours(subject: str, k: int = len(NEIGHBOUR_TEMPLATES), asked: str = "") -> list[str]:
    """The first `k` template questions about `subject` that ask another kind of thing than the
    corrected question(s) `asked` (TEMPLATE_KINDS): its neighbours."""
    kinds = kinds_asked(asked, subject)
    return [t.format(s=subject.strip()) for t in NEIGHBOUR_TEMPLATES if TEMPLATE_KINDS.get(t) not in kinds][:k]


def record_neighbours(record: dict, k: int = len(NEIGHBOUR_TEMPLATES)) -> list[str]:
    """template_neighbours of a zsRE-style record: of another kind than its question and paraphrase."""
    return template_neighbours(record["subject"], k, asked=f"{record['question']} {record.get('paraphrase', '')}")


def anchor_neighbours(subject: str, k: int) -> list[str]:
    """`k` of ANCHOR_TEMPLATES about `subject`, starting at a place the subject picks, so that
    across subjects every template is trained on."""
    s = subject.strip()
    start = sum(s.encode()) % len(ANCHOR_TEMPLATES)
    return [ANCHOR_TEMPLATES[(start + i) % len(ANCHOR_TEMPLATES)].format(s=s) for i in range(min(k, len(ANCHOR_TEMPLATES)))]


def anchor_questions(questions: list[str], k: int, exclude: list[str] = ()) -> list[str]:
    """Neighbour anchors for corrected `questions`: `k` anchor questions per subject named in them
    (subject_of), a subject once, none that is one of `questions` or `exclude` (a corrected one)."""
    asked = {normalise(q) for q in [*questions, *exclude]}
    subjects = dict.fromkeys(s for s in map(subject_of, questions) if s)
    return [q for s in subjects for q in anchor_neighbours(s, k) if normalise(q) not in asked]


def neighbour_questions(record: dict, records: list[dict] = (), k: int = len(NEIGHBOUR_TEMPLATES),
                        exclude: set[str] = frozenset()) -> list[str]:
    """Up to `k` questions about `record`'s subject and another relation: first the other
    records (zsRE-style dicts) about the same subject with another answer (same-subject records
    with the same answer are rewordings of the same fact, not neighbours), then the templates that
    ask another kind of thing than its question and paraphrase (record_neighbours).
    Questions in `exclude` (e.g. ones corrected in the same run) are left out."""
    subject = record["subject"]
    answer = normalise(record["answer"])
    own = {normalise(record["question"]), normalise(record.get("paraphrase", ""))}
    left_out = {normalise(q) for q in exclude} | own
    others = [r["question"] for r in records if r["subject"] == subject and normalise(r["answer"]) != answer]
    out: list[str] = []
    for q in others + record_neighbours(record):
        if normalise(q) not in left_out and normalise(q) not in {normalise(o) for o in out}:
            out.append(q)
    return out[:k]


def first_per_subject(subjects: list[str], among: set[int] | None = None) -> set[int]:
    """The index of each subject's first occurrence in `subjects` (after normalising), among the
    indices `among` (all by default): where a subject's neighbours are asked, once however many
    corrections it has."""
    firsts: dict[str, int] = {}
    for i, s in enumerate(subjects):
        if among is None or i in among:
            firsts.setdefault(normalise(s), i)
    return set(firsts.values())


def subject_of(question: str) -> str | None:
    """The subject of a question a user corrected, when it names one: the longest run of
    capitalised words after the first word ("What university did Watts Humphrey attend?" →
    "Watts Humphrey"). None when the question names nothing capitalised."""
    words = question.strip().rstrip("?.!").split()
    runs: list[list[str]] = []
    current: list[str] = []
    for i, w in enumerate(words):
        if i > 0 and _CAPITALISED.fullmatch(w) and (current or w.lower() not in _QUESTION_WORDS):
            current.append(w)
        elif current and w.lower() in ("of", "the", "de", "von", "van", "and") and i + 1 < len(words) \
                and _CAPITALISED.fullmatch(words[i + 1]):
            current.append(w)  # "Bank of England", "Ludwig van Beethoven"
        else:
            if current:
                runs.append(current)
            current = []
    if current:
        runs.append(current)
    if not runs:
        return None
    best = max(runs, key=lambda r: (len(r), sum(len(w) for w in r)))
    return " ".join(best).strip(",;:")


def bleed(corrected_answer: str, base_answer: str, new_answer: str) -> bool:
    """Did the correction leak here: the new answer gives the corrected answer (memory.text.gives,
    whole words) where the base model's answer did not?"""
    return gives(corrected_answer, new_answer) and not gives(corrected_answer, base_answer)


def neighbour_scores(corrected: list[str], base: list[str], new: list[str]) -> dict:
    """Strict locality (the share of neighbour answers identical to the base model's) and bleed
    (the share that now give their subject's corrected answer), over parallel lists: per
    neighbour question, its subject's correction, the base's answer and the new answer."""
    n = len(new)
    if not n:
        return {"neighbour_locality_strict": None, "neighbour_bleed": None, "n_neighbours": 0}
    return {
        "neighbour_locality_strict": sum(b == a for b, a in zip(base, new)) / n,
        "neighbour_bleed": sum(bleed(c, b, a) for c, b, a in zip(corrected, base, new)) / n,
        "n_neighbours": n,
    }
