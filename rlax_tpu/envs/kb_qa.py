"""Knowledge-base QA: multi-hop questions over a small knowledge base generated per problem
(invented people, companies, cities and countries, so no answer can come from memory), answered
through `lookup` calls over several turns. difficulty = hops (1-3; higher is capped at 3)."""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from rlax_tpu.envs.base import ToolEnv
from rlax_tpu.envs.generated import Generated
from rlax_tpu.envs.tool_calls import ToolCall, format_call
from rlax_tpu.tasks.answers import extract_answer
from rlax_tpu.tasks.base import Problem, Reward, combine

_SYLLABLES = ("ka", "lo", "mi", "ra", "ven", "tor", "sel", "dun", "bri", "qua", "zel", "mor", "fin", "tal", "ush")
_ENTITY = re.compile(r"[^a-z0-9 ]")


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def build_kb(rng: random.Random, people: int = 6) -> dict[str, dict[str, str]]:
    """{entity: {relation: value}}: people (born_in, works_for), companies (headquarters,
    founded_by), cities (country). Every value a question reaches is itself an entry."""
    names: set[str] = set()

    def fresh(parts: int, suffix: str = "") -> str:
        while True:
            n = _name(rng, parts) + suffix
            if n not in names:
                names.add(n)
                return n

    countries = [fresh(2, "ia") for _ in range(3)]
    cities = [fresh(2, "ville") for _ in range(4)]
    persons = [f"{fresh(2)} {fresh(2)}" for _ in range(people)]
    companies = [fresh(2, " Corp") for _ in range(3)]
    kb: dict[str, dict[str, str]] = {c: {"country": rng.choice(countries)} for c in cities}
    for co in countries:
        kb[co] = {"continent": rng.choice(("North", "South", "East", "West")) + " Continent"}
    for p in persons:
        kb[p] = {"born_in": rng.choice(cities), "works_for": rng.choice(companies)}
    for co in companies:
        kb[co] = {"headquarters": rng.choice(cities), "founded_by": rng.choice(persons)}
    return kb


# (hops, question template, path of relations from the person)
QUESTIONS = (
    (1, "In which city was {p} born?", ("born_in",)),
    (1, "Which company does {p} work for?", ("works_for",)),
    (2, "In which country was {p} born?", ("born_in", "country")),
    (2, "Who founded the company that {p} works for?", ("works_for", "founded_by")),
    (2, "In which city is the headquarters of the company that {p} works for?", ("works_for", "headquarters")),
    (3, "In which country is the headquarters of the company that {p} works for?",
     ("works_for", "headquarters", "country")),
    (3, "In which city was the founder of the company that {p} works for born?",
     ("works_for", "founded_by", "born_in")),
)


def normalize(text: str) -> str:
    return " ".join(_ENTITY.sub(" ", text.lower()).split())


class KbQaEnv(Generated, ToolEnv):
    name = "kb_qa"
    preamble = ("You answer questions about a private knowledge base that only the lookup tool can read; "
                "look up each entity you need, one hop at a time.")

    def __init__(self, config, count_tokens: Callable[[str], int]):
        super().__init__(config, count_tokens)
        self._ranges(config.task)
        self.weights = (float(config.task.correct_weight), float(config.task.format_weight))

    def tool_functions(self):
        def lookup(entity: str) -> str:
            """Returns the facts the knowledge base holds about one entity.

            Args:
                entity: The exact name of a person, company, city or country.
            """
            kb = self.problem.meta["kb"] if self.problem is not None else {}
            key = {normalize(k): k for k in kb}.get(normalize(entity))
            if key is None:
                return f"No entry for {entity!r}."
            return f"{key}: " + "; ".join(f"{rel} = {val}" for rel, val in kb[key].items())

        return [lookup]

    def generate(self, rng: random.Random, difficulty: int) -> tuple[str, str, dict]:
        kb = build_kb(rng)
        hops = min(difficulty, 3)
        _, template, path = rng.choice([q for q in QUESTIONS if q[0] == hops])
        person = rng.choice(sorted(k for k, v in kb.items() if "born_in" in v))
        value = person
        for rel in path:
            value = kb[value][rel]
        prompt = template.format(p=person) + " Give the final answer as '#### <name>'."
        return prompt, value, {"kb": kb, "hops": hops, "path": list(path), "person": person}

    def reference_turns(self, problem: Problem) -> list[str]:
        kb, entity, turns = problem.meta["kb"], problem.meta["person"], []
        for rel in problem.meta["path"]:
            call = format_call(ToolCall("lookup", {"entity": entity}))
            turns.append(f"I need the {rel.replace('_', ' ')} of {entity}.\n{call}")
            entity = kb[entity][rel]
        return turns + [f"The answer is {entity}.\n#### {entity}"]

    def score_answer(self, problem: Problem, answer: str) -> Reward:
        got, _ = extract_answer(answer, "any")
        if got is None:
            return Reward(combine(False, False, *self.weights), {"correct": False, "reason": "no_answer"})
        correct = normalize(got) == normalize(problem.answer)
        return Reward(combine(correct, True, *self.weights),
                      {"correct": correct, "reason": "" if correct else "wrong", "answer": got})
