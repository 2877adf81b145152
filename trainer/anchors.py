"""Self-distillation anchors: the base model's own answers to general prompts, replayed in
every cycle so that learning a correction does not rewrite everything else.

Without them an adapter trained on corrections alone changes the answers to unrelated questions
too (see reports/consolidation/report.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.dataset import Example

# Replayed in training: the base model's answers to these keep its general behaviour in place.
GENERAL_PROMPTS = (
    "What is the capital of France?",
    "Who wrote Romeo and Juliet?",
    "How many days are there in a week?",
    "What is photosynthesis?",
    "Give me a synonym for happy.",
    "What is 12 times 12?",
    "Name three primary colors.",
    "What language is spoken in Brazil?",
    "Who painted the Mona Lisa?",
    "What is the boiling point of water in Celsius?",
    "Write a haiku about the sea.",
    "What does a computer's CPU do?",
    "Translate 'thank you' into Spanish.",
    "What is the largest planet in the solar system?",
    "Explain what a noun is.",
    "Who was the first person to walk on the Moon?",
    "What is the chemical symbol for gold?",
    "How many continents are there?",
    "What is the tallest mountain in the world?",
    "Who developed the theory of relativity?",
    "What is the freezing point of water in Fahrenheit?",
    "Which ocean is the largest?",
    "What do bees make?",
    "What is the square root of 81?",
    "Who is the author of Pride and Prejudice?",
    "What gas do plants absorb from the air?",
    "What is the currency of Japan?",
    "Give me a tip for sleeping better.",
    "What is the main ingredient of guacamole?",
    "In which country are the pyramids of Giza?",
    "What is the longest river in Africa?",
    "How many legs does a spider have?",
    "What is an adjective?",
    "Who composed the Fifth Symphony?",
    "What is the speed of light?",
    "Which planet is known as the Red Planet?",
    "What is the capital of Canada?",
    "Write one sentence about autumn.",
    "What does DNA stand for?",
    "Who invented the telephone?",
    "What is the hardest natural substance?",
    "How many minutes are in an hour?",
    "What is the opposite of cold?",
    "Which animal is known as the king of the jungle?",
    "What is the capital of Australia?",
    "What is a prime number?",
    "Who discovered penicillin?",
    "What is the smallest country in the world?",
)

# Replayed too: everyday questions of the kind users ask a search engine (written for this project;
# none is a question of the zsRE file, its NQ queries included, nor a probe): with them an adapter
# keeps more of its unrelated answers than with the prompts above alone (see
# reports/consolidation/report.md).
EVERYDAY_QUESTIONS = (
    "Who sang the original version of hallelujah?",
    "When did the first iphone come out?",
    "Where is the great barrier reef located?",
    "Who played the joker in the dark knight?",
    "How many episodes are in the first season of friends?",
    "What is the population of new york city?",
    "When was the eiffel tower built?",
    "Who won the world cup in 2014?",
    "What is the largest organ in the human body?",
    "Who wrote the harry potter books?",
    "When did world war 2 end?",
    "What is the capital of kenya?",
    "Who is the lead singer of coldplay?",
    "How long does it take the earth to orbit the sun?",
    "What does the acronym nasa stand for?",
    "Who directed jurassic park?",
    "Where was the declaration of independence signed?",
    "What is the national animal of scotland?",
    "When did the titanic sink?",
    "Who plays sheldon cooper in the big bang theory?",
    "How many bones are in the adult human body?",
    "What year did the berlin wall fall?",
    "Who was the roman god of war?",
    "Which country gifted the statue of liberty to the united states?",
    "What is the deepest point in the ocean?",
    "Who sings shake it off?",
    "When does the summer solstice occur?",
    "What river flows through london?",
    "Who was the british prime minister during world war 2?",
    "How many states are in the united states?",
    "What is the most spoken language in the world?",
    "Who founded microsoft?",
    "When was the first modern olympic games held?",
    "Where is mount kilimanjaro?",
    "What is the main language spoken in argentina?",
    "Who played forrest gump?",
    "What is the hottest planet in the solar system?",
    "How many strings does a standard guitar have?",
    "Who wrote the great gatsby?",
    "When did the american civil war start?",
    "What is the capital city of turkey?",
    "Who discovered gravity when an apple fell?",
    "Which blood type is the universal donor?",
    "Who voiced woody in toy story?",
    "How many teaspoons are in a tablespoon?",
    "What is the largest city in canada?",
    "Who painted the ceiling of the sistine chapel?",
    "When did neil armstrong land on the moon?",
    "Where do kangaroos live in the wild?",
    "What organ pumps blood through the body?",
    "Who is known as the father of computers?",
    "What is the currency of the united kingdom?",
    "Which band released the album abbey road?",
    "Who won the first season of american idol?",
    "How many time zones does russia have?",
    "What is the longest bone in the human body?",
    "Who wrote to kill a mockingbird?",
    "When was the united nations founded?",
    "Where is the headquarters of the european union?",
    "What is the fastest land animal?",
    "Who played rose in the movie titanic?",
    "How many players are on a basketball team on the court?",
    "What is the capital of new zealand?",
    "Who was the first woman to win a nobel prize?",
    "When did the beatles break up?",
    "What sport is played at wimbledon?",
    "Who invented the printing press?",
    "Where is machu picchu?",
    "What is the chemical symbol for sodium?",
    "Who sang i will always love you?",
    "How many chambers does the human heart have?",
    "What is the largest lake in africa?",
    "Who wrote the declaration of independence?",
    "When did the first harry potter movie come out?",
    "What is the capital of south korea?",
    "Who played iron man in the marvel movies?",
    "How many rings are on the olympic flag?",
    "What is the official language of brazil?",
    "Who was the first emperor of rome?",
    "Where is the amazon rainforest?",
    "What is the boiling point of water in fahrenheit?",
    "Who sings the song rolling in the deep?",
    "When did the cold war end?",
    "What does a thermometer measure?",
    "Who was the 16th president of the united states?",
    "Which planet has the most moons?",
    "How many weeks are in a year?",
    "Who wrote the lord of the rings?",
    "Where did the olympic games originate?",
    "What is the capital of norway?",
    "Who played harry potter in the films?",
    "When is the next leap year?",
    "What is the smallest planet in our solar system?",
    "Who discovered america in 1492?",
    "How many letters are in the english alphabet?",
    "Which city is known as the big apple?",
    "Who composed the four seasons?",
    "What is the highest waterfall in the world?",
    "When did the great depression start?",
    "Who is the main character in the legend of zelda?",
    "What is the largest country in south america?",
    "Who sang billie jean?",
    "Where is the taj mahal located?",
    "How many teeth does an adult human have?",
    "What is the capital of portugal?",
    "Who wrote war and peace?",
    "When was the first star wars movie released?",
    "What gas makes up most of the earth's atmosphere?",
    "Who played captain jack sparrow?",
    "Which country hosted the 2016 summer olympics?",
    "How long is a marathon in miles?",
    "Who developed the polio vaccine?",
    "What is the capital of thailand?",
    "Who sings the theme song for the fresh prince of bel air?",
    "When did the roman empire fall?",
    "What is the largest island in the world?",
    "Who won the super bowl in 2020?",
    "How many keys are on a standard computer keyboard?",
    "Where is the sahara desert?",
    "Who wrote the song imagine?",
    "What is the national sport of canada?",
    "When did women get the right to vote in the united states?",
    "Who played the lead role in the movie gladiator?",
    "What is the most common element in the universe?",
    "How many countries are in the european union?",
    "Who is the author of the hunger games?",
    "Where is the louvre museum?",
    "What is the capital of ireland?",
    "Who was the first man in space?",
    "When did the chernobyl disaster happen?",
    "Which organ produces insulin?",
    "Who sang purple rain?",
    "What is the tallest building in the world?",
    "How many hearts does an octopus have?",
    "Who wrote the origin of species?",
    "Where is the golden gate bridge?",
    "What is the capital of vietnam?",
    "Who played the main character in the matrix?",
    "When was the internet invented?",
    "What is the primary ingredient in hummus?",
    "Who is the greek goddess of wisdom?",
    "How many minutes are in a soccer match?",
    "Which country is famous for inventing pizza?",
    "Who directed the godfather?",
    "What is the largest state in the united states by area?",
    "When did the first man climb mount everest?",
    "Who sings hotel california?",
    "What is the capital of chile?",
    "Who wrote the catcher in the rye?",
    "How many days are in a leap year?",
)

# What a cycle replays unless told otherwise (trainer.cycle.CycleConfig.anchor_prompts).
BUILT_IN_ANCHORS = GENERAL_PROMPTS + EVERYDAY_QUESTIONS

# Never trained on: the gate's locality probes (are unrelated answers unchanged?).
PROBE_PROMPTS = (
    "What is the capital of Germany?",
    "Who wrote Hamlet?",
    "How many hours are in a day?",
    "What is gravity?",
    "Give me a synonym for fast.",
    "What is 7 plus 8?",
    "Name a fruit that is yellow.",
    "What language is spoken in Mexico?",
    "Who painted The Starry Night?",
    "What is the largest mammal?",
    "Write a short poem about rain.",
    "What does a refrigerator do?",
    "Translate 'hello' into French.",
    "What is the closest star to Earth?",
    "Explain what a verb is.",
    "Who was the first president of the United States?",
    "What is the chemical formula of water?",
    "How many players are on a soccer team?",
    "What is the capital of Italy?",
    "Who wrote The Odyssey?",
    "What is the largest desert in the world?",
    "What do cows drink?",
    "What is 100 divided by 4?",
    "Which metal is liquid at room temperature?",
    "What is the capital of Spain?",
    "Give me a tip for learning a new language.",
    "What is the main ingredient of bread?",
    "Which country has the largest population?",
    "How many sides does a hexagon have?",
    "What instrument has 88 keys?",
    "What is the capital of Egypt?",
    "Who invented the light bulb?",
)


def load_prompts(path: str | Path) -> tuple[str, ...]:
    """Anchor prompts from a text file, one per line (blank lines skipped)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = tuple(dict.fromkeys(line.strip() for line in lines if line.strip()))
    if not prompts:
        raise ValueError(f"no anchor prompts in {path}")
    return prompts


def base_answers(base_model: str, cache: Path, prompts=GENERAL_PROMPTS, max_new_tokens: int = 32) -> list[Example]:
    """The base model's greedy answers to `prompts`, each computed once and kept in `cache`."""
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    key = f"{base_model}|{max_new_tokens}|v2"
    known = cached.setdefault(key, {})
    missing = [p for p in dict.fromkeys(prompts) if p not in known]
    if missing:
        known.update(zip(missing, _generate(base_model, missing, max_new_tokens)))
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(cached, indent=2))
    # A cut-off answer is trained without an end of turn, so replay does not teach stopping early.
    return [Example(p, known[p]["text"], complete=known[p]["complete"], distill=True) for p in dict.fromkeys(prompts)]


def _generate(base_model: str, prompts: list[str], max_new_tokens: int) -> list[dict]:
    from transformers import AutoTokenizer

    from trainer.base_model import load_causal_lm
    from trainer.evaluate import greedy_ids

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = load_causal_lm(base_model).eval()
    rows = greedy_ids(model, tokenizer, prompts, max_new_tokens)
    return [{"text": tokenizer.decode(row, skip_special_tokens=True).strip(), "complete": len(row) < max_new_tokens}
            for row in rows]
