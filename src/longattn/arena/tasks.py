"""Long-context tasks for the arena: generators, prompts and exact-match scoring.

Every generator takes a tokenizer (any object with ``encode(text)``; a Hugging Face tokenizer's
chat template is used when it has one), a target ``length`` in tokens and a ``seed``, and
returns a :class:`Sample` whose whole prompt, as :func:`build_prompt` writes it, is within about
half a percent of ``length`` tokens (at most 2%). The same arguments give the same sample; the
seed alone fixes the hidden facts (pass key, keys, values, variable names), so a sweep over
lengths or depths with one seed changes only the length or the depth.

Tasks (RULER, Hsieh et al. 2024, describes the family; the texts here are our own):

* ``passkey`` - a five-digit pass key hidden in filler (Mohtashami & Jaggi, 2023).
* ``niah`` - one needle "The magic number for <key> is <7 digits>." at ``depth``.
* ``niah_multikey`` - several such needles with different keys; one is asked for.
* ``variable_tracking`` - chains ``VAR A = 12345``, ``VAR B = VAR A``, ... spread through the
  filler; name every variable that holds the value.
* ``mqar`` - multi-query associative recall (Arora et al., 2023): a long list of
  ``key: number`` pairs, then the numbers of several keys are asked for at once.

Perplexity windows over long text come from :func:`perplexity_windows`.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .data import count_tokens, haystack_pieces, insert_pieces, resolve_haystack_kind

__all__ = [
    "Sample",
    "TASKS",
    "DEPTH_TASKS",
    "passkey",
    "niah",
    "niah_multikey",
    "variable_tracking",
    "mqar",
    "make_sample",
    "build_prompt",
    "score",
    "max_new_tokens",
    "depth_grid",
    "perplexity_windows",
]


@dataclass(frozen=True)
class Sample:
    """One task instance.

    ``length`` is the target length in tokens of the whole prompt (:func:`build_prompt`);
    ``metadata["prompt_tokens"]`` is what it came to. ``depth`` is where the asked-for needle
    sits, as a fraction of the context's characters before it (``None`` for tasks without one).
    The prompt is ``instruction``, ``context`` and ``question`` as one user message, then
    ``answer_prefix`` as the start of the reply. ``answer`` is a string, or a list of strings for
    tasks with several answers."""

    task: str
    length: int
    seed: int
    depth: float | None
    context: str
    question: str
    answer: str | list[str]
    instruction: str = ""
    answer_prefix: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def answers(self) -> list[str]:
        return list(self.answer) if isinstance(self.answer, (list, tuple)) else [self.answer]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# prompts


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def build_prompt(sample: Sample, tokenizer: Any, *, chat: bool | None = None) -> str:
    """The prompt text, ending where the answer should start.

    With a chat template (``chat=None`` uses one when the tokenizer has it): the user turn holds
    the instruction, context and question, and the assistant turn is opened and begun with
    ``sample.answer_prefix``. Without: the same parts separated by blank lines, then the prefix.
    Tokenize it without adding special tokens (the template already holds them)."""
    user = "\n\n".join(part for part in (sample.instruction, sample.context, sample.question) if part)
    if chat is None:
        chat = _has_chat_template(tokenizer)
    if chat:
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        return head + sample.answer_prefix
    return user + "\n\n" + sample.answer_prefix


# --------------------------------------------------------------------------------------------
# seeded building blocks

_KEY_ADJECTIVES = (
    "amber", "ancient", "azure", "bitter", "bold", "brave", "brisk", "calm", "clever", "coral",
    "crimson", "curious", "dapper", "eager", "early", "electric", "fancy", "fierce", "frosty",
    "fuzzy", "giant", "golden", "grumpy", "happy", "hidden", "humble", "icy", "jolly", "keen",
    "lively", "lucky", "lunar", "mellow", "misty", "modern", "noble", "odd", "olive", "polar",
    "proud", "purple", "rapid", "royal", "rustic", "scarlet", "secret", "shiny", "silver",
    "sleepy", "smooth", "solar", "spicy", "stormy", "swift", "tender", "tiny", "tropical",
    "velvet", "vivid", "wild", "windy", "wise", "young", "zesty",
)
_KEY_NOUNS = (
    "anchor", "badger", "balloon", "beacon", "biscuit", "blossom", "boulder", "canyon", "castle",
    "cedar", "comet", "compass", "crystal", "dolphin", "dragon", "falcon", "feather", "fiddle",
    "galaxy", "glacier", "goblet", "granite", "harbor", "helmet", "horizon", "island", "jaguar",
    "jigsaw", "kettle", "lagoon", "lantern", "lemon", "lobster", "magnet", "maple", "marble",
    "meteor", "mirror", "nectar", "oasis", "otter", "panther", "parrot", "pebble", "pepper",
    "piano", "planet", "pumpkin", "quartz", "rocket", "saddle", "sapphire", "scooter", "shadow",
    "spider", "squirrel", "summit", "teapot", "thunder", "tiger", "trumpet", "tulip", "walrus",
    "zeppelin",
)


def _key_stream(rng: random.Random):
    """Unique keys like ``swift-falcon`` in seeded order; after the 4096 two-word keys come
    three-word ones (``swift-falcon-comet``)."""
    n_adj, n_noun = len(_KEY_ADJECTIVES), len(_KEY_NOUNS)
    order = list(range(n_adj * n_noun))
    rng.shuffle(order)
    for i in order:
        yield f"{_KEY_ADJECTIVES[i // n_noun]}-{_KEY_NOUNS[i % n_noun]}"
    order = list(range(n_adj * n_noun * n_noun))
    rng.shuffle(order)
    for i in order:
        i, third = divmod(i, n_noun)
        if i % n_noun != third:
            yield f"{_KEY_ADJECTIVES[i // n_noun]}-{_KEY_NOUNS[i % n_noun]}-{_KEY_NOUNS[third]}"


def _keys(rng: random.Random, n: int) -> list[str]:
    stream = _key_stream(rng)
    return [next(stream) for _ in range(n)]


def _variable_names(rng: random.Random, n: int) -> list[str]:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(letters) for _ in range(5))
        if name not in names and "VAR" not in name:
            names.append(name)
    return names


def _rng(task: str, seed: int) -> random.Random:
    return random.Random(f"longattn.arena.tasks:{task}:{seed}")


# --------------------------------------------------------------------------------------------
# fitting a sample to its target length


def _tolerance(length: int) -> int:
    return max(1, length // 200)


def _fit_haystack(task: str, tokenizer: Any, length: int, seed: int, kind: str,
                  inserts: Sequence[tuple[float, str]],
                  make: Callable[[str], Sample]) -> tuple[Sample, list[int]]:
    """Fill the context with haystack so the whole prompt has ``length`` tokens, the
    ``inserts`` placed at their depths. Returns the sample and the inserts' character offsets."""
    kind = resolve_haystack_kind(kind)
    bare, _ = insert_pieces([], inserts)
    overhead = count_tokens(tokenizer, build_prompt(make(bare), tokenizer))
    if overhead > length:
        raise ValueError(f"{task} needs at least {overhead} tokens of prompt; length={length} is too short")
    budget = length - overhead
    best: tuple[int, Sample, list[int]] | None = None
    for _ in range(5):
        context, positions = insert_pieces(haystack_pieces(kind, budget, tokenizer, seed), inserts)
        sample = make(context)
        n = count_tokens(tokenizer, build_prompt(sample, tokenizer))
        if best is None or abs(n - length) < abs(best[0] - length):
            best = (n, sample, positions)
        if abs(n - length) <= _tolerance(length):
            break
        budget = max(0, budget - (n - length))
    n, sample, positions = best
    meta = dict(sample.metadata, prompt_tokens=n, haystack=kind)
    return dataclasses.replace(sample, metadata=meta), positions


def _measured_depth(context: str, position: int, needle: str) -> float:
    rest = len(context) - len(needle)
    return position / rest if rest > 0 else 0.0


# --------------------------------------------------------------------------------------------
# the tasks


def passkey(tokenizer: Any, length: int, seed: int = 0, *, depth: float = 0.5,
            haystack: str = "repeat") -> Sample:
    """Find a five-digit pass key hidden in filler (Mohtashami & Jaggi, 2023, "Landmark
    Attention"). The default filler is their repeated five sentences; any haystack kind works."""
    rng = _rng("passkey", seed)
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."

    def make(context: str) -> Sample:
        return Sample(
            task="passkey", length=length, seed=seed, depth=depth, context=context,
            instruction=("A pass key is hidden inside the long, unrelated text below. Find it "
                         "and remember it; you will be asked for it at the end."),
            question="What is the pass key?", answer=key, answer_prefix="The pass key is",
            metadata={"needle": needle},
        )

    sample, (position,) = _fit_haystack("passkey", tokenizer, length, seed, haystack, [(depth, needle)], make)
    meta = dict(sample.metadata, needle_char=position,
                measured_depth=_measured_depth(sample.context, position, needle))
    return dataclasses.replace(sample, metadata=meta)


_NIAH_INSTRUCTION = (
    "Hidden in the text below {what}. Each is stated as \"The magic number for <key> is "
    "<number>.\" Read carefully: afterwards you will be asked for one of them."
)


def _niah(task: str, tokenizer: Any, length: int, seed: int, depth: float, haystack: str,
          n_keys: int) -> Sample:
    if n_keys < 1:
        raise ValueError(f"n_keys must be at least 1, not {n_keys}")
    rng = _rng(task, seed)
    keys = _keys(rng, n_keys)
    values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), n_keys)]
    needles = [f"The magic number for {k} is {v}." for k, v in zip(keys, values)]
    depths = [depth] + [rng.random() for _ in range(n_keys - 1)]  # key 0 is the one asked for
    what = "is a magic number" if n_keys == 1 else "are several magic numbers, each for a different key"

    def make(context: str) -> Sample:
        return Sample(
            task=task, length=length, seed=seed, depth=depth, context=context,
            instruction=_NIAH_INSTRUCTION.format(what=what),
            question=f"What is the magic number for {keys[0]}?", answer=values[0],
            answer_prefix=f"The magic number for {keys[0]} is",
            metadata={"needle": needles[0], "key": keys[0], "keys": keys, "values": values,
                      "depths": depths},
        )

    sample, positions = _fit_haystack(task, tokenizer, length, seed, haystack,
                                      list(zip(depths, needles)), make)
    meta = dict(sample.metadata, needle_chars=positions,
                measured_depth=_measured_depth(sample.context, positions[0], needles[0]))
    return dataclasses.replace(sample, metadata=meta)


def niah(tokenizer: Any, length: int, seed: int = 0, *, depth: float = 0.5,
         haystack: str = "auto") -> Sample:
    """Single needle in a haystack: "The magic number for <key> is <7 digits>." at ``depth``
    (RULER's S-NIAH with a word key and a number value)."""
    return _niah("niah", tokenizer, length, seed, depth, haystack, 1)


def niah_multikey(tokenizer: Any, length: int, seed: int = 0, *, depth: float = 0.5,
                  haystack: str = "auto", n_keys: int = 4) -> Sample:
    """``n_keys`` needles with different keys; the one asked for sits at ``depth``, the others
    at seeded random depths (RULER's MK-NIAH)."""
    return _niah("niah_multikey", tokenizer, length, seed, depth, haystack, n_keys)


def variable_tracking(tokenizer: Any, length: int, seed: int = 0, *, haystack: str = "auto",
                      n_chains: int = 1, n_hops: int = 4) -> Sample:
    """Chains of assignments ``VAR A = 12345.``, ``VAR B = VAR A.``, ... (``n_hops`` copies
    each) at seeded random places in the filler, each chain in order; the answer is every
    variable of the first chain (RULER's VT). Other chains hold other values."""
    if n_chains < 1 or n_hops < 0:
        raise ValueError(f"need n_chains >= 1 and n_hops >= 0, not {n_chains}, {n_hops}")
    rng = _rng("variable_tracking", seed)
    names = _variable_names(rng, n_chains * (n_hops + 1))
    values = [str(v) for v in rng.sample(range(10000, 100000), n_chains)]
    chains = []
    for c in range(n_chains):
        chain = names[c * (n_hops + 1):(c + 1) * (n_hops + 1)]
        statements = [f"VAR {chain[0]} = {values[c]}."]
        statements += [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        chains.append((chain, statements))
    # random places, filled in an order that keeps each chain's statements in sequence
    depths = sorted(rng.random() for _ in range(n_chains * (n_hops + 1)))
    turn = [c for c in range(n_chains) for _ in range(n_hops + 1)]
    rng.shuffle(turn)
    next_of = [0] * n_chains
    inserts = []
    for d, c in zip(depths, turn):
        inserts.append((d, chains[c][1][next_of[c]]))
        next_of[c] += 1
    answer = chains[0][0]
    value = values[0]

    def make(context: str) -> Sample:
        return Sample(
            task="variable_tracking", length=length, seed=seed, depth=None, context=context,
            instruction=(
                "The text below hides statements that assign values to variables, of the form "
                "\"VAR <name> = <number>.\" or \"VAR <name> = VAR <other name>.\"; the second "
                "form gives <name> the value of <other name>. Track every assignment."),
            question=(f"Which variables are assigned the value {value}, directly or through "
                      "other variables? Name all of them."),
            answer=list(answer), answer_prefix=f"The variables assigned the value {value} are:",
            metadata={"value": value, "chains": [c[0] for c in chains],
                      "statements": [s for _, s in inserts]},
        )

    sample, positions = _fit_haystack("variable_tracking", tokenizer, length, seed, haystack,
                                      inserts, make)
    return dataclasses.replace(sample, metadata=dict(sample.metadata, statement_chars=positions))


def mqar(tokenizer: Any, length: int, seed: int = 0, *, n_queries: int = 4) -> Sample:
    """Multi-query associative recall (Arora et al., 2023, "Zoology"), in words: as many
    ``key: number`` lines as fill ``length`` tokens, then the numbers of ``n_queries`` keys,
    chosen at seeded random places in the list, are asked for together."""
    if n_queries < 1:
        raise ValueError(f"n_queries must be at least 1, not {n_queries}")
    rng = _rng("mqar", seed)
    key_stream = _key_stream(rng)
    value_rng = random.Random(f"longattn.arena.tasks:mqar-values:{seed}")
    keys: list[str] = []
    values: list[str] = []

    def grow(n: int) -> None:
        while len(keys) < n:
            keys.append(next(key_stream))
            values.append(str(value_rng.randint(10000, 99999)))

    def make(n: int, asked: Sequence[int]) -> Sample:
        grow(n)
        asked_keys = [keys[i] for i in asked]
        return Sample(
            task="mqar", length=length, seed=seed, depth=None,
            context="\n".join(f"{k}: {v}" for k, v in zip(keys[:n], values[:n])),
            instruction=("Below is a list of keys, each with its number. Memorize them: "
                         "afterwards you will be asked for the numbers of several keys."),
            question=(f"What are the numbers of the keys {', '.join(asked_keys)}? Answer with "
                      "one line per key, in this order, each as <key>: <number>."),
            answer=[values[i] for i in asked], answer_prefix=f"{asked_keys[0]}:",
            metadata={"keys": asked_keys, "positions": list(asked), "n_pairs": n},
        )

    def tokens(n: int) -> int:
        return count_tokens(tokenizer, build_prompt(make(n, range(n_queries)), tokenizer))

    lo = n_queries
    if tokens(lo) > length:
        raise ValueError(f"mqar with {n_queries} queries needs more than length={length} tokens")
    hi = lo * 2
    while tokens(hi) <= length:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # tokens(lo) <= length < tokens(hi)
        mid = (lo + hi) // 2
        if tokens(mid) <= length:
            lo = mid
        else:
            hi = mid
    asked = rng.sample(range(lo), n_queries)
    sample = make(lo, asked)
    n = count_tokens(tokenizer, build_prompt(sample, tokenizer))
    return dataclasses.replace(sample, metadata=dict(sample.metadata, prompt_tokens=n))


TASKS: dict[str, Callable[..., Sample]] = {
    "passkey": passkey,
    "niah": niah,
    "niah_multikey": niah_multikey,
    "variable_tracking": variable_tracking,
    "mqar": mqar,
}
DEPTH_TASKS = frozenset({"passkey", "niah", "niah_multikey"})


def make_sample(task: str, tokenizer: Any, length: int, seed: int = 0,
                depth: float | None = None, **options: Any) -> Sample:
    """``TASKS[task](...)``, passing ``depth`` only to tasks that place a needle."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    if depth is not None:
        if task not in DEPTH_TASKS:
            raise ValueError(f"task {task!r} has no needle depth; depth tasks: {sorted(DEPTH_TASKS)}")
        options["depth"] = depth
    return TASKS[task](tokenizer, length, seed, **options)


def depth_grid(n: int = 5) -> list[float]:
    """``n`` needle depths evenly from 0 to 1."""
    if n < 1:
        raise ValueError("n must be at least 1")
    return [0.5] if n == 1 else [round(i / (n - 1), 6) for i in range(n)]


# --------------------------------------------------------------------------------------------
# scoring


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _word_pattern(word: str) -> str:
    return rf"(?<![\w-]){re.escape(word.lower())}(?![\w-])"


def score(sample: Sample, generated_text: str) -> float:
    """Exact-match score in [0, 1] of a model's continuation of :func:`build_prompt`.

    Texts are normalised (case folded, whitespace collapsed) and answers must match as whole
    words. One answer (passkey, niah, niah_multikey): 1 if it is in the first non-empty line of
    the reply, else 0. Several (variable_tracking): the fraction of them named anywhere in the
    reply. mqar: the fraction of asked keys whose first mention in ``answer_prefix + reply`` is
    followed, on the same line, by their number as the first number."""
    if sample.task == "mqar":
        text = (sample.answer_prefix + generated_text).lower()
        hits = 0
        for key, value in zip(sample.metadata["keys"], sample.answers):
            match = re.search(_word_pattern(key) + r"[^\d\n]*?(\d+)", text)
            hits += bool(match and match.group(1) == value)
        return hits / len(sample.answers)
    if isinstance(sample.answer, (list, tuple)):
        text = _normalise(generated_text)
        found = sum(bool(re.search(_word_pattern(a), text)) for a in sample.answers)
        return found / len(sample.answers)
    lines = [line for line in generated_text.strip().splitlines() if line.strip()]
    first = _normalise(lines[0]) if lines else ""
    return float(bool(re.search(_word_pattern(sample.answer), first)))


def max_new_tokens(sample: Sample) -> int:
    """A generous budget for the reply: room for the answer(s) and a few words around them."""
    if sample.task == "variable_tracking":
        return 8 * len(sample.answers) + 16
    if sample.task == "mqar":
        return 12 * len(sample.answers) + 8
    return 16 if sample.task == "passkey" else 20


# --------------------------------------------------------------------------------------------
# perplexity


def _ids(tokenizer: Any, text: str) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tokenizer.encode(text))


def perplexity_windows(text: str, tokenizer: Any, length: int, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` windows of ``length`` token ids from ``text``, as a ``[n, length]`` int64 tensor.

    The text is cut into ``n`` equal stretches and each window starts at a seeded place in its
    own stretch, at a paragraph or word start, so windows do not overlap and cover the whole
    text (pass :func:`longattn.arena.data.austen_text` for real English). Raises
    ``ValueError`` when the text is too short for ``n`` separate windows."""
    if length < 1 or n < 1:
        raise ValueError(f"need length >= 1 and n >= 1, not {length}, {n}")
    rng = random.Random(f"longattn.arena.tasks:perplexity:{seed}")
    probe = text[:20000]
    chars_per_token = len(probe) / max(1, len(_ids(tokenizer, probe)))
    need = int(length * chars_per_token * 1.15) + 64
    stretch = len(text) // n
    if stretch < need:
        raise ValueError(
            f"text of {len(text)} characters is too short for {n} windows of {length} tokens "
            f"(about {need} characters each)")
    windows = []
    for i in range(n):
        limit = (i + 1) * stretch - need  # the latest start that keeps the window in its stretch
        start = rng.randint(i * stretch, limit)
        paragraph = text.find("\n\n", start, min(limit, start + 2000))
        space = text.find(" ", start, limit)
        if paragraph >= 0:
            start = paragraph + 2
        elif space >= 0 and start > 0 and not text[start - 1].isspace():
            start = space + 1
        end = start + need
        ids = _ids(tokenizer, text[start:end])
        while len(ids) < length and end < len(text):  # denser than the probe: read further
            end = min(len(text), end + need // 2)
            ids = _ids(tokenizer, text[start:end])
        if len(ids) < length:
            raise ValueError(f"text too short for {n} windows of {length} tokens")
        windows.append(ids[:length])
    return torch.tensor(windows, dtype=torch.long)
