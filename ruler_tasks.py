"""RULER's tasks: the protocol's facts and how each task builds one sample at a given haystack size.

The templates, answer prefixes, generation lengths, metric names, task arguments, the needle sentence
and the noise sentence are transcribed from RULER's task constants and task config (Hsieh et al. 2024,
NVIDIA/RULER, Apache-2.0); the generation rules are RULER's, reimplemented here (not copied); the word
lists are the `wonderwords` package's, as in RULER. A builder `*_sample(rng, size, config, ...)` makes
one sample whose haystack has `size` units (lines, words, sentences' words, documents); ruler.py finds
the largest size that fits a token length and builds the prompt. The departures from RULER's scripts
are listed in ruler.py's docstring.
"""
import itertools
import json
import random
import re
import string
import uuid
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

# ----------------------------------------------------------------------------- protocol

def _family(tokens_to_generate: int, template: str, answer_prefix: str, metric: str = "string_match_all") -> dict:
    return {"tokens_to_generate": tokens_to_generate, "template": template, "answer_prefix": answer_prefix,
            "metric": metric}


TEMPLATES = {  # per task family
    "niah": _family(
        128, "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
        "{type_needle_v} for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are"),
    "variable_tracking": _family(
        30, "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        "Question: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
        "assigned the value {query}, they are: "),
    "common_words_extraction": _family(
        120, "Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
        "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:"),
    "freq_words_extraction": _family(
        50, "Read the following coded text and track the frequency of each coded word. Find the three most "
        "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the "
        "dots '....'. What are the three most frequently appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:"),
    "qa": _family(
        32, "Answer the question based on the given documents. Only give me the answer and do not output any other "
        "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
        "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
        " Answer:", "string_match_part"),
}


def _niah(haystack: str, key: str, value: str, k: int = 1, v: int = 1, q: int = 1) -> dict:
    return {"task": "niah", "type_haystack": haystack, "type_needle_k": key, "type_needle_v": value,
            "num_needle_k": k, "num_needle_v": v, "num_needle_q": q}


TASKS = {  # RULER's 13 standard tasks
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", k=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", v=4),
    "niah_multiquery": _niah("essay", "words", "numbers", q=4),
    "vt": {"task": "variable_tracking", "type_haystack": "noise", "num_chains": 1, "num_hops": 4},
    "cwe": {"task": "common_words_extraction", "freq_cw": 30, "freq_ucw": 3, "num_cw": 10, "num_fewshot": 1},
    "fwe": {"task": "freq_words_extraction", "alpha": 2.0, "coded_wordlen": 6, "vocab_size": 2000},
    "qa_1": {"task": "qa", "dataset": "squad"},
    "qa_2": {"task": "qa", "dataset": "hotpotqa"},
}
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE_SENTENCE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

OFFLINE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt", "cwe", "fwe")
ESSAY_TASKS = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery")
# VARIANT, not standard RULER: the essay tasks on the noise haystack (no data needed); niah_single_2 is left
# out, since on the noise haystack it is niah_single_1
NOISE_VARIANTS = {f"{t}_noise": {**TASKS[t], "type_haystack": "noise"} for t in ESSAY_TASKS if t != "niah_single_2"}
QA_TASKS = ("qa_1", "qa_2")
ALL_TASKS = OFFLINE_TASKS + tuple(NOISE_VARIANTS)  # plus ESSAY_TASKS given a prose file, QA_TASKS given their data
DEFAULT_TASKS = OFFLINE_TASKS  # what an evaluation or a RULER calibration runs unless told otherwise
CALIBRATION_SEED = 1000  # calibration generates from seeds 1000+; evaluation's default seed is 0
MAX_NEW_TOKENS = {t: TEMPLATES[c["task"]]["tokens_to_generate"] for t, c in {**TASKS, **NOISE_VARIANTS}.items()}
DEPTHS = [round(100 * i / 39) for i in range(40)]  # 40 evenly spaced needle depths, in %


def task_config(task: str) -> dict:
    config = {**TASKS, **NOISE_VARIANTS}.get(task)
    if config is None:
        raise ValueError(f"unknown RULER task {task!r}; valid: {', '.join([*TASKS, *NOISE_VARIANTS])}")
    return config

# ----------------------------------------------------------------------------- random material

@lru_cache(maxsize=None)
def wordlist(kind: str) -> tuple[str, ...]:
    """wonderwords' noun, adjective or verb list, read as RULER reads it (one word a line, right-stripped)."""
    text = (files("wonderwords") / "assets" / f"{kind}list.txt").read_text(encoding="utf-8")
    return tuple(line.rstrip() for line in text.splitlines())


@lru_cache(maxsize=None)
def _adjectives_nouns() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """RULER's 'words' keys are all adjective-noun pairs, deduplicated. Pairs of the deduplicated lists
    are already distinct (tested), so drawing a pair is a uniform draw from RULER's list of 6.2
    million strings, without building it."""
    return tuple(sorted(set(wordlist("adjective")))), tuple(sorted(set(wordlist("noun"))))


def random_item(rng: random.Random, kind: str) -> str:
    """A needle key or value: 'numbers' (7 digits), 'uuids' (version 4) or 'words' (adjective-noun)."""
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":
        adjectives, nouns = _adjectives_nouns()
        a, n = divmod(rng.randrange(len(adjectives) * len(nouns)), len(nouns))
        return f"{adjectives[a]}-{nouns[n]}"
    raise ValueError(f"unknown needle type {kind!r}")


def zeta(s: float, n: int = 64) -> float:
    """Riemann zeta(s), s > 1: the first n - 1 terms plus the Euler-Maclaurin tail (error ~ n^-(s+5))."""
    tail = n ** (1 - s) / (s - 1) + n ** -s / 2 + s * n ** (-s - 1) / 12 - s * (s + 1) * (s + 2) * n ** (-s - 3) / 720
    return sum(k ** -s for k in range(1, n)) + tail


def _fill(template: str, context: str, **fields) -> tuple[str, int]:
    """The template filled in, and where the text after the context starts (braces in the context are safe)."""
    head, tail = template.split("{context}")
    head = head.format(**fields)
    return head + context + tail.format(**fields), len(head) + len(context)


def _singular(text: str) -> str:
    """RULER's rewording when a single value is asked for ('are all' goes before 'are')."""
    for plural, singular in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(plural, singular)
    return text


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i}. {w}" for i, w in enumerate(words, 1))

# ----------------------------------------------------------------------------- haystacks

def _insert_lines(rng: random.Random, lines: list[str], needles: list[str]) -> str:
    """Needles at distinct random line positions (from the back, so earlier positions stay valid)."""
    for position, needle in zip(sorted(rng.sample(range(len(lines)), len(needles)), reverse=True), needles):
        lines.insert(position, needle)
    return "\n".join(lines)


def _essay_context(rng: random.Random, words: list[str], size: int, needles: list[str]) -> str:
    """The first `size` words of the prose (repeated if needed), split into sentences, with the needles
    between sentences at depths drawn from DEPTHS."""
    text = " ".join(itertools.islice(itertools.cycle(words), size))
    sentences = re.split(r"(?<=[.!?])\s+", text.strip())
    cuts = [int(len(sentences) * (d / 100)) for d in rng.sample(DEPTHS, len(needles))]
    cuts = [0] + sorted(cuts) + [len(sentences)]
    parts = [" ".join(sentences[cuts[0]:cuts[1]])]
    for i, needle in enumerate(needles, 1):
        parts += [needle, " ".join(sentences[cuts[i]:cuts[i + 1]])]
    return " ".join(parts)


def read_prose(path: str | Path) -> list[str]:
    """The words of a prose file: plain text, or JSON {"text": ...} like RULER's essay file."""
    text = Path(path).read_text(encoding="utf-8")
    words = (json.loads(text)["text"] if Path(path).suffix == ".json" else text).split()
    if not words:
        raise ValueError(f"{path}: no words to build a haystack from")
    return words


def read_qa(path: str | Path, dataset: str) -> tuple[list[dict], list[str]]:
    """(questions, documents) of SQuAD (v2 dev JSON) or HotpotQA (distractor dev JSON), as RULER reads
    them. Documents: SQuAD's paragraphs, HotpotQA's "title\ntext" paragraphs, deduplicated and sorted.
    A question: its text, its answers, the documents it comes with (SQuAD: its paragraph; HotpotQA: all
    of its context paragraphs, the supporting ones and the distractors, as RULER keeps them) and
    (SQuAD) its article's other paragraphs."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if dataset == "squad":
            paragraphs = [(p, [q for q in p["qas"] if not q.get("is_impossible")], [x["context"] for x in d["paragraphs"]])
                          for d in data["data"] for p in d["paragraphs"]]
            docs = sorted({p["context"] for p, _, _ in paragraphs})
            index = {doc: i for i, doc in enumerate(docs)}
            questions = [{"query": q["question"], "answers": [a["text"] for a in q["answers"]], "gold": [index[p["context"]]],
                          "more": [index[c] for c in article if c != p["context"]]} for p, qs, article in paragraphs for q in qs]
        else:
            as_doc = lambda title, sentences: f"{title}\n{''.join(sentences)}"  # noqa: E731
            docs = sorted({as_doc(*c) for d in data for c in d["context"]})
            index = {doc: i for i, doc in enumerate(docs)}
            questions = [{"query": d["question"], "answers": [d["answer"]], "gold": [index[as_doc(*c)] for c in d["context"]],
                          "more": []} for d in data]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not a {dataset} file ({type(e).__name__}: {e})") from None
    if not questions:
        raise ValueError(f"{path}: no answerable questions")
    return questions, docs

# ----------------------------------------------------------------------------- tasks: one sample at a haystack size

def niah_sample(rng: random.Random, size: int, config: dict, essay: list[str] | None = None) -> dict:
    """Needles 'One of the special magic <v> for <key> is: <value>.' in a noise, needle or essay haystack."""
    n_keys = max(config["num_needle_k"], config["num_needle_q"])  # every queried key has its needles
    kind_k, kind_v = config["type_needle_k"], config["type_needle_v"]
    keys, values, needles = [], [], []
    for _ in range(n_keys):
        keys.append(random_item(rng, kind_k))
        values.append([random_item(rng, kind_v) for _ in range(config["num_needle_v"])])
        needles += [NEEDLE.format(type_needle_v=kind_v, key=keys[-1], value=v) for v in values[-1]]
    rng.shuffle(needles)
    if config["type_haystack"] == "essay":
        context = _essay_context(rng, essay, size, needles)
    elif config["type_haystack"] == "noise":
        context = _insert_lines(rng, [NOISE_SENTENCE] * size, needles)
    else:  # 'needle': distractor needles with fresh random keys and values
        lines = [NEEDLE.format(type_needle_v=kind_v, key=random_item(rng, kind_k), value=random_item(rng, kind_v))
                 for _ in range(size)]
        context = _insert_lines(rng, lines, needles)
    queried = rng.sample(range(n_keys), config["num_needle_q"])
    queries = [keys[i] for i in queried]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix = TEMPLATES["niah"]["template"], TEMPLATES["niah"]["answer_prefix"]
    if config["num_needle_q"] * config["num_needle_v"] == 1:
        template, prefix, kind_v = _singular(template), _singular(prefix), kind_v[:-1]  # "numbers" -> "number"
    text, end = _fill(template, context, type_needle_v=kind_v, query=query)
    return {"input": text, "context_end": end, "answer_prefix": prefix.format(type_needle_v=kind_v, query=query),
            "answers": [v for i in queried for v in values[i]]}


def qa_sample(rng: random.Random, size: int, config: dict, question: dict, docs: list[str]) -> dict:
    """`size` documents: the question's own ones, then its article's other paragraphs, then random
    others, shuffled and numbered 'Document i:'; the answer is any of the question's answers."""
    chosen, more = list(question["gold"]), list(question["more"])
    if size - len(chosen) <= len(more):
        chosen += rng.sample(more, size - len(chosen))
    else:
        taken = set(chosen + more)
        chosen += more + rng.sample([i for i in range(len(docs)) if i not in taken], size - len(chosen) - len(more))
    rng.shuffle(chosen)
    context = "\n\n".join(f"Document {i}:\n{docs[d]}" for i, d in enumerate(chosen, 1))
    text, end = _fill(TEMPLATES["qa"]["template"], context, query=question["query"])
    return {"input": text, "context_end": end, "answer_prefix": TEMPLATES["qa"]["answer_prefix"], "answers": question["answers"]}


def vt_sample(rng: random.Random, size: int, config: dict, example: str = "", letters: int = 5) -> dict:
    """Chains 'VAR A = 12345', 'VAR B = VAR A ', ... inserted in order into noise lines; the answer is
    every name of the first chain. `example` (a solved one, RULER's one-shot) goes before the task."""
    n_names = config["num_hops"] + 1
    names = []
    while len(names) < config["num_chains"] * n_names:  # distinct names of random upper-case letters
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        names += [name] if name not in names else []
    chains = [names[c * n_names:(c + 1) * n_names] for c in range(config["num_chains"])]
    values = [str(rng.randint(10000, 99998)) for _ in chains]  # RULER: numpy randint(10000, 99999), high excluded
    lines = [NOISE_SENTENCE] * size
    for chain, value in zip(chains, values):
        statements = [f"VAR {chain[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in zip(chain, chain[1:])]
        for j, position in enumerate(sorted(rng.sample(range(len(lines)), n_names))):
            lines.insert(position + j, statements[j])  # + j: the chain's earlier statements shift the lines
    task = TEMPLATES["variable_tracking"]
    text, end = _fill(task["template"], "\n".join(lines), query=values[0], num_v=n_names)
    return {"input": example + text, "context_end": len(example) + end,
            "answer_prefix": task["answer_prefix"].format(query=values[0], num_v=n_names), "answers": chains[0]}


@lru_cache(maxsize=None)
def cwe_words() -> tuple[str, ...]:
    return tuple(sorted(set(wordlist("noun") + wordlist("adjective") + wordlist("verb"))))


def _word_list(rng: random.Random, n_words: int, common_repeats: int, other_repeats: int, n_common: int):
    """n_words distinct words, the first n_common repeated more often, shuffled and numbered."""
    chosen = rng.sample(cwe_words(), n_words)
    listed = chosen[:n_common] * common_repeats + chosen[n_common:] * other_repeats
    rng.shuffle(listed)
    return _numbered(listed), chosen[:n_common]


def cwe_sample(rng: random.Random, size: int, config: dict, short: bool = False) -> dict:
    """A numbered list of `size` distinct words, num_cw of them common; a solved example goes first.
    Below 4096 tokens RULER shrinks both: example 20 words (x3 / x1), list x6 / x1."""
    task, n_common = TEMPLATES["common_words_extraction"], config["num_cw"]
    example_shape, repeats = ((20, 3, 1), (6, 1)) if short else ((40, 10, 3), (config["freq_cw"], config["freq_ucw"]))
    examples = []
    for _ in range(config["num_fewshot"]):
        listed, common = _word_list(rng, *example_shape, n_common)
        examples.append(_fill(task["template"], listed)[0] + task["answer_prefix"] + " " + _numbered(common))
    listed, common = _word_list(rng, size, *repeats, n_common)
    text, end = _fill(task["template"], listed)
    head = "\n".join(examples) + "\n"
    return {"input": head + text, "context_end": len(head) + end, "answer_prefix": task["answer_prefix"],
            "answers": common}


def fwe_sample(rng: random.Random, size: int, config: dict) -> dict:
    """Coded words with Zipf counts: the word of rank k appears int(size * k^-alpha / zeta(alpha)) times;
    rank 1 is '...' (noise), so the answer is ranks 2-4."""
    vocabulary = set()
    while len(vocabulary) < config["vocab_size"]:
        vocabulary.add("".join(rng.choices(string.ascii_lowercase, k=config["coded_wordlen"])))
    vocabulary = sorted(vocabulary)
    rng.shuffle(vocabulary)
    vocabulary[0] = "..."
    alpha, norm = config["alpha"], zeta(config["alpha"])
    words = [w for k, w in enumerate(vocabulary, 1) for _ in range(int(size * k ** -alpha / norm))]
    rng.shuffle(words)
    task = TEMPLATES["freq_words_extraction"]
    text, end = _fill(task["template"], " ".join(words))
    return {"input": text, "context_end": end, "answer_prefix": task["answer_prefix"], "answers": vocabulary[1:4]}
