"""RULER: synthetic long-context tasks generated at an exact token length, and their metrics.

RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?", NVIDIA/RULER, Apache-2.0) hides what the model must find, track or count inside a
haystack grown to fill the model's context: needles in a haystack (niah), variable tracking (vt),
common and frequent words extraction (cwe, fwe). The templates, answer prefixes, generation
lengths, metric names, task arguments, the needle sentence and the noise sentence below are
transcribed from RULER's task constants and task config; the generation rules are RULER's,
reimplemented here (not copied). The word lists are the `wonderwords` package's, as in RULER.

A sample is the task text (template filled in, not chat-wrapped; for vt and cwe a solved example
first, as in RULER) plus an answer prefix; the prompt is chat-wrap(text) + answer prefix
(`prompt_ids`). Each sample's haystack is the largest for which prompt tokens + tokens_to_generate
<= max_seq_length, found with the model's own tokenizer.

Offline, six standard tasks need no data (OFFLINE_TASKS). The essay tasks need prose (RULER uses
Paul Graham's essays): pass any text file as `haystack_file`. The `*_noise` tasks are a labelled
VARIANT, not standard RULER: the essay tasks' arguments on the noise haystack. QA needs its data:
qa_1 SQuAD v2's dev JSON, qa_2 HotpotQA's distractor dev JSON (`qa_file`). Where this file departs
from RULER's scripts, on purpose:
- one random.Random per sample, seeded by (seed, task, index), also shuffles the needles and the
  word lists (RULER reuses one fixed-seed shuffle for every sample);
- the haystack size is searched per sample, from the first sample's size (RULER searches once,
  then shrinks a sample that overflows); fwe follows the same length rule as the other tasks
  (RULER fills its prompt to max_seq_length, leaving no room for the answer);
- essays are split into sentences after . ! ? (RULER uses nltk's Punkt);
- cwe draws from wonderwords' 8166 words only (beyond ~100k tokens RULER adds another word list);
- QA asks the questions in a seeded order, evaluation seeds from the even-numbered questions and
  calibration seeds (CALIBRATION_SEED on) from the odd-numbered ones, so the two never share a
  question (RULER asks them in file order); its length, like every task's, counts the model's
  tokens (RULER counts whitespace-separated words for QA).
"""
import itertools
import json
import random
import re
import string
import uuid
from functools import lru_cache, partial
from importlib.resources import files
from pathlib import Path

import checkpoint as CK  # the model family's chat format

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


@lru_cache(maxsize=4)
def read_qa(path: str | Path, dataset: str) -> tuple[list[dict], list[str]]:
    """(questions, documents) of SQuAD (v2 dev JSON) or HotpotQA (distractor dev JSON), as RULER reads
    them. Documents: SQuAD's paragraphs, HotpotQA's "title\ntext" paragraphs, deduplicated and sorted.
    A question: its text, its answers, its gold documents and (SQuAD) its article's other paragraphs."""
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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a {dataset} file ({type(e).__name__}: {e})") from None
    if not questions:
        raise ValueError(f"{path}: no answerable questions")
    return questions, docs

# ----------------------------------------------------------------------------- tasks: one sample at a haystack size

def _niah_sample(rng: random.Random, size: int, config: dict, essay: list[str] | None = None) -> dict:
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


def _qa_sample(rng: random.Random, size: int, config: dict, question: dict, docs: list[str]) -> dict:
    """`size` documents: the question's gold ones, then its article's other paragraphs, then random
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


def _vt_sample(rng: random.Random, size: int, config: dict, example: str = "", letters: int = 5) -> dict:
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


def _vt_example(name: str, config: dict, tokenizer) -> str:
    """RULER's one-shot vt example: a solved chain of 3-letter names in noise, at most 500 tokens
    (task text + answer prefix, no chat format), then a blank line before the task."""
    config = {**config, "num_hops": min(10, config["num_hops"])}
    build = lambda size: _vt_sample(random.Random(name), size, config, letters=3)  # noqa: E731

    def fits(example: dict) -> bool:
        return len(tokenizer.encode(example["input"] + example["answer_prefix"], add_special_tokens=False).ids) <= 500

    solved, _ = largest_fitting(build, fits, low=config["num_hops"] + 1, high=10 ** 6, start=config["num_hops"] + 1)
    return solved["input"] + solved["answer_prefix"] + " " + " ".join(solved["answers"]) + "\n\n"


@lru_cache(maxsize=None)
def _cwe_words() -> tuple[str, ...]:
    return tuple(sorted(set(wordlist("noun") + wordlist("adjective") + wordlist("verb"))))


def _word_list(rng: random.Random, n_words: int, common_repeats: int, other_repeats: int, n_common: int):
    """n_words distinct words, the first n_common repeated more often, shuffled and numbered."""
    chosen = rng.sample(_cwe_words(), n_words)
    listed = chosen[:n_common] * common_repeats + chosen[n_common:] * other_repeats
    rng.shuffle(listed)
    return _numbered(listed), chosen[:n_common]


def _cwe_sample(rng: random.Random, size: int, config: dict, short: bool = False) -> dict:
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


def _fwe_sample(rng: random.Random, size: int, config: dict) -> dict:
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

# ----------------------------------------------------------------------------- prompts and length

def prompt_ids(tokenizer, sample: dict, max_length: int | None = None) -> tuple[list[int], int]:
    """RULER's prompt: the task text as the user turn, the answer prefix opening the assistant turn.
    Returns the ids and how many of them are context (everything before the question).
    (max_length: unused, the sample's length was fixed when it was generated; the signature is
    longbench.prompt_ids', so one runner builds both benchmarks' prompts.)"""
    before, after = CK.chat_parts(tokenizer)
    text = before + sample["input"] + after + sample["answer_prefix"]
    return CK.encode_split(tokenizer, text, len(before) + sample["context_end"])


def largest_fitting(build, fits, low: int, high: int, start: int) -> tuple[dict, int]:
    """(sample, size) for the largest size in [low, high] whose built sample fits: from `start`,
    gallop (steps 1, 2, 4, ...) until a fitting and a failing size bracket the answer, then bisect.
    Assumes fitting is monotone in the size, as RULER's binary search does."""
    samples = {}
    good, bad, step, size = low - 1, high + 1, 1, min(max(start, low), high)  # good fits, bad does not
    while bad - good > 1:
        samples[size] = build(size)
        good, bad = (size, bad) if fits(samples[size]) else (good, size)
        if bad > high:  # nothing failed yet: gallop up
            size, step = min(good + step, high), step * 2
        elif good < low:  # nothing fitted yet: gallop down
            size, step = max(bad - step, low), step * 2
        else:
            size = (good + bad) // 2
    if good < low:
        raise ValueError(f"even the smallest haystack ({low}) does not fit: raise max_seq_length")
    return samples[good], good


def qa_questions(task: str, n: int, seed: int, qa_file) -> tuple[list[dict], list[str]]:
    """The n questions a QA run asks, and the documents: a seeded order over the even-numbered questions
    for evaluation seeds, the odd-numbered ones for calibration seeds (they never share a question)."""
    if qa_file is None:
        raise ValueError(f"{task}: RULER's QA needs its data (qa_file=...): SQuAD v2's dev JSON for qa_1, "
                         "HotpotQA's distractor dev JSON for qa_2")
    questions, docs = read_qa(str(qa_file), TASKS[task]["dataset"])
    pool = questions[int(seed >= CALIBRATION_SEED)::2]
    if n > len(pool):
        raise ValueError(f"{qa_file}: {n} samples asked, {len(pool)} questions available to this seed")
    return random.Random(f"{seed}/{task}/questions").sample(pool, n), docs


def _task_builder(task: str, config: dict, max_seq_length: int, haystack_file) -> tuple:
    """How to build the task's sample at a haystack size: (builder, smallest size, haystack label)."""
    family = config["task"]
    if family == "niah" and config["type_haystack"] != "essay":  # each needle needs a line of its own
        n_needles = max(config["num_needle_k"], config["num_needle_q"]) * config["num_needle_v"]
        return _niah_sample, n_needles, config["type_haystack"]
    if family == "niah":
        if haystack_file is None:
            raise ValueError(f"{task}: the essay haystack needs prose (haystack_file=...); "
                             f"or use the labelled noise variant {task}_noise")
        return partial(_niah_sample, essay=read_prose(haystack_file)), 1, f"essay:{Path(haystack_file).name}"
    if family == "variable_tracking":
        return _vt_sample, config["num_hops"] + 1, config["type_haystack"]
    if family == "common_words_extraction":
        return partial(_cwe_sample, short=max_seq_length < 4096), config["num_cw"], "words"
    if family == "freq_words_extraction":
        return _fwe_sample, 1, "words"
    if family == "qa":  # the builder takes its question per sample (generate)
        return _qa_sample, 1, f"{config['dataset']}:{Path(haystack_file).name}" if haystack_file else config["dataset"]
    raise ValueError(f"{task}: unknown task family {family!r}")


def generate(task: str, n: int, tokenizer, max_seq_length: int = 4096, seed: int = 0,
             haystack_file: str | Path | None = None, qa_file: str | Path | None = None) -> list[dict]:
    """n samples of a task, each filled to max_seq_length with this tokenizer; deterministic per
    (task, seed, index, max_seq_length, tokenizer). haystack_file: prose for the essay tasks;
    qa_file: the QA task's dataset."""
    config = task_config(task)
    build, low, haystack = _task_builder(task, config, max_seq_length, qa_file if config["task"] == "qa" else haystack_file)
    high = len(_cwe_words()) if config["task"] == "common_words_extraction" else 10 ** 7
    if config["task"] == "qa":
        questions, docs = qa_questions(task, n, seed, qa_file)
        high = len(docs)
    tokens = MAX_NEW_TOKENS[task]
    fits = lambda s: len(prompt_ids(tokenizer, s)[0]) + tokens <= max_seq_length  # noqa: E731
    samples, start = [], low
    for index in range(n):
        name = f"{seed}/{task}/{index}"
        if config["task"] == "variable_tracking":
            build = partial(_vt_sample, example=_vt_example(name + "/example", config, tokenizer))
        if config["task"] == "qa":
            build, low = partial(_qa_sample, question=questions[index], docs=docs), len(questions[index]["gold"])

        def at_size(s: int, build=build, name=name) -> dict:  # a fresh generator per try: only the size changes
            return build(random.Random(name), s, config)

        sample, size = largest_fitting(at_size, fits, low, high, start)
        start = size if index == 0 else start  # the next searches start from sample 0's size (a hint)
        samples.append({"_id": f"ruler_{task}_{max_seq_length}_s{seed}_{index}", "dataset": task,
                        "answers": sample["answers"], "all_classes": None, "input": sample["input"],
                        "context_end": sample["context_end"], "answer_prefix": sample["answer_prefix"],
                        "haystack": haystack, "length": len(prompt_ids(tokenizer, sample)[0]),
                        "max_new_tokens": tokens})
    return samples

# ----------------------------------------------------------------------------- metrics

def postprocess(prediction: str) -> str:
    """RULER's post-processing: strip, control characters (\\x00-\\x1f) become newlines, strip."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """Share of the references found in the prediction (case-insensitive substrings)."""
    return sum(r.lower() in prediction.lower() for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """1 if any reference is found in the prediction (case-insensitive substring), else 0."""
    return float(any(r.lower() in prediction.lower() for r in references))


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def sample_scores(task: str, predictions: list[str], answers_list: list[list[str]], all_classes=None) -> list[float]:
    """Per-sample score x 100 after RULER's post-processing (same signature as longbench.sample_scores)."""
    metric = METRICS[TEMPLATES[task_config(task)["task"]]["metric"]]
    if not predictions or len(predictions) != len(answers_list):
        raise ValueError(f"{task}: {len(predictions)} predictions for {len(answers_list)} samples")
    return [100.0 * metric(postprocess(p), answers) for p, answers in zip(predictions, answers_list)]


def score_task(task: str, predictions: list[str], answers_list: list[list[str]], all_classes=None) -> float:
    """RULER's task score: 100 x the mean over samples. Not rounded (RULER rounds to 2 decimals)."""
    scores = sample_scores(task, predictions, answers_list, all_classes)
    return sum(scores) / len(scores)
