"""The synthetic instruction set of the tiny default (`--data synthetic`): eight task families with short
verifiable answers, so moekd runs end to end anywhere, offline.

Facts ("which city does X live in") come from a fixed table of 240 made-up people shared by every split:
closed-book knowledge, which a bigger model memorises better; the other families are skills over small
spaces (arithmetic on 1..20, copying, counting, spelling, reading a colour from a context).

Two more closed-book families ("color": X's favourite colour, "password": X's password word) ask other
attributes of the same people; they are not in the default mix and serve repro.py's capacity preset,
which also grows the table (n_facts) so that memorising it needs the teacher's capacity. A few made-up
names repeat in the table (49 of the first 50 are distinct); their questions have two answers, as in "fact".
"""
import random

# Synthetic instruction families with short verifiable answers, so the tiny default runs anywhere.
# Facts ("which city does X live in") come from a fixed table of 240 made-up people shared by every
# split: closed-book knowledge, which a bigger model memorises better; the other families are skills
# over small spaces (arithmetic on 1..20, copying, counting, spelling, reading a colour from a context).
_WORDS = ("apple river stone cloud tiger piano garden rocket silver candle forest mirror violet "
          "window planet dragon ocean castle lemon falcon bridge copper meadow pepper").split()


_COLORS = "red blue green yellow black white orange purple".split()


_OBJECTS = "cup hat ball book lamp coat box key".split()


_SYLLABLES = "ka lo mi ra tu ve zo pe ni sa do ru".split()


DEFAULT_FAMILIES = ("add", "count", "fact", "lookup", "reverse", "sequence", "sort", "spell")
FAMILIES = DEFAULT_FAMILIES + ("color", "password")


def _fact_table(n_facts: int = 240) -> list[tuple[str, str]]:
    """(person, city) for n_facts made-up people; a longer table extends a shorter one."""
    rng = random.Random(1234)  # fixed: the same facts in every split and seed
    def name() -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(3)).capitalize()
    cities = [name() for _ in range(12)]
    return [(name(), rng.choice(cities)) for _ in range(n_facts)]


def _attributes(n_facts: int) -> list[tuple[str, str]]:
    """(favourite colour, password word) of each person of _fact_table(n_facts), from a stream of their
    own."""
    rng = random.Random(4321)
    return [(rng.choice(_COLORS), rng.choice(_WORDS)) for _ in range(n_facts)]


def synthetic_rows(n: int, *, seed: int, families: tuple[str, ...] = DEFAULT_FAMILIES,
                   n_facts: int = 240) -> list[dict]:
    """n Dolly-schema rows (instruction, context, response, category), deterministic in seed; the task
    family of each row is drawn uniformly from `families`."""
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown or not families or n_facts < 3:
        raise ValueError(f"synthetic families must be a non-empty subset of {', '.join(FAMILIES)} "
                         f"(unknown: {', '.join(unknown) or 'none'}) and n_facts >= 3")
    rng, facts, attributes = random.Random(seed), _fact_table(n_facts), _attributes(n_facts)
    def nums(k: int, hi: int = 20) -> list[int]:
        return [rng.randint(1, hi) for _ in range(k)]
    def words(k: int) -> list[str]:
        return [rng.choice(_WORDS) for _ in range(k)]
    def add():
        a, b = nums(2)
        return "Add the two numbers.", f"{a} and {b}", str(a + b)
    def reverse():
        w = words(rng.randint(3, 5))
        return "Reverse the order of the words.", " ".join(w), " ".join(reversed(w))
    def sort():
        x = nums(rng.randint(3, 5))
        return ("Sort the numbers from smallest to largest.", ", ".join(map(str, x)),
                ", ".join(map(str, sorted(x))))
    def count():
        w = words(rng.randint(2, 9))
        return "How many words are in the text?", " ".join(w), str(len(w))
    def spell():
        w = rng.choice(_WORDS)
        return "Spell the word with dashes between the letters.", w, "-".join(w)
    def sequence():
        a, d = rng.randint(1, 10), rng.randint(2, 5)
        return ("Continue the sequence with the next two numbers.",
                ", ".join(str(a + d * i) for i in range(3)), f"{a + 3 * d}, {a + 4 * d}")
    def lookup():
        people = rng.sample([p for p, _ in facts], 3)
        items = [(p, rng.choice(_COLORS), rng.choice(_OBJECTS)) for p in people]
        p, c, o = rng.choice(items)
        return f"What color is {p}'s {o}?", " ".join(f"{a} has a {b} {c_}." for a, b, c_ in items), c
    def fact():
        p, city = rng.choice(facts)
        return f"Which city does {p} live in?", "", city
    def color():
        i = rng.randrange(len(facts))
        return f"What is {facts[i][0]}'s favorite color?", "", attributes[i][0]
    def password():
        i = rng.randrange(len(facts))
        return f"Which word is {facts[i][0]}'s password?", "", attributes[i][1]
    known = {f.__name__: f
             for f in (add, reverse, sort, count, spell, sequence, lookup, fact, color, password)}
    families = {name: known[name] for name in families}
    rows = []
    for _ in range(n):
        category = rng.choice(sorted(families))
        instruction, context, response = families[category]()
        rows.append(dict(instruction=instruction, context=context, response=response, category=category))
    return rows
