"""RULER: synthetic long-context tasks generated at an exact token length, and their metrics.

RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?", NVIDIA/RULER, Apache-2.0) hides what the model must find, track or count inside a
haystack grown to fill the model's context: needles in a haystack (niah), variable tracking (vt),
common and frequent words extraction (cwe, fwe), question answering over documents (qa).
The protocol's facts (transcribed from RULER's task constants and task config) and what each task
generates (RULER's rules, reimplemented, not copied) are in ruler_tasks.py; this file fits each
sample to a token length, builds its prompt and scores it. Where the two depart from RULER's
scripts, on purpose, is listed below.

A sample is the task text (template filled in, not chat-wrapped; for vt and cwe a solved example
first, as in RULER) plus an answer prefix; the prompt is chat-wrap(text) + answer prefix
(`prompt_ids`). Each sample's haystack is the largest for which prompt tokens + tokens_to_generate
<= max_seq_length, found with the model's own tokenizer.

Offline, six standard tasks need no data (OFFLINE_TASKS). The essay tasks need prose (RULER uses
Paul Graham's essays): pass any text file as `haystack_file`. The `*_noise` tasks are a labelled
VARIANT, not standard RULER: the essay tasks' arguments on the noise haystack. QA needs its data:
qa_1 SQuAD v2's dev JSON, qa_2 HotpotQA's distractor dev JSON (`qa_file`). The departures:
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

import random
import re
from functools import partial
from pathlib import Path

import checkpoint as CK  # the model family's chat format
from ruler_tasks import (  # noqa: F401  (the task lists are the runner's, through this file)
    ALL_TASKS, CALIBRATION_SEED, DEFAULT_TASKS, ESSAY_TASKS, MAX_NEW_TOKENS, NOISE_VARIANTS, OFFLINE_TASKS, QA_TASKS,
    TASKS, TEMPLATES, cwe_sample, cwe_words, fwe_sample, niah_sample, qa_sample, read_prose, read_qa, task_config,
    vt_sample)

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


def _vt_example(name: str, config: dict, tokenizer) -> str:
    """RULER's one-shot vt example: a solved chain of 3-letter names in noise, at most 500 tokens
    (task text + answer prefix, no chat format), then a blank line before the task."""
    config = {**config, "num_hops": min(10, config["num_hops"])}
    build = lambda size: vt_sample(random.Random(name), size, config, letters=3)  # noqa: E731

    def fits(example: dict) -> bool:
        return len(tokenizer.encode(example["input"] + example["answer_prefix"], add_special_tokens=False).ids) <= 500

    solved, _ = largest_fitting(build, fits, low=config["num_hops"] + 1, high=10 ** 6, start=config["num_hops"] + 1)
    return solved["input"] + solved["answer_prefix"] + " " + " ".join(solved["answers"]) + "\n\n"


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
        return niah_sample, n_needles, config["type_haystack"]
    if family == "niah":
        if haystack_file is None:
            raise ValueError(f"{task}: the essay haystack needs prose (haystack_file=...); "
                             f"or use the labelled noise variant {task}_noise")
        return partial(niah_sample, essay=read_prose(haystack_file)), 1, f"essay:{Path(haystack_file).name}"
    if family == "variable_tracking":
        return vt_sample, config["num_hops"] + 1, config["type_haystack"]
    if family == "common_words_extraction":
        return partial(cwe_sample, short=max_seq_length < 4096), config["num_cw"], "words"
    if family == "freq_words_extraction":
        return fwe_sample, 1, "words"
    if family == "qa":  # the builder takes its question per sample (generate)
        return qa_sample, 1, f"{config['dataset']}:{Path(haystack_file).name}" if haystack_file else config["dataset"]
    raise ValueError(f"{task}: unknown task family {family!r}")


def generate(task: str, n: int, tokenizer, max_seq_length: int = 4096, seed: int = 0,
             haystack_file: str | Path | None = None, qa_file: str | Path | None = None) -> list[dict]:
    """n samples of a task, each filled to max_seq_length with this tokenizer; deterministic per
    (task, seed, index, max_seq_length, tokenizer). haystack_file: prose for the essay tasks;
    qa_file: the QA task's dataset."""
    config = task_config(task)
    build, low, haystack = _task_builder(task, config, max_seq_length, qa_file if config["task"] == "qa" else haystack_file)
    high = len(cwe_words()) if config["task"] == "common_words_extraction" else 10 ** 7
    if config["task"] == "qa":
        questions, docs = qa_questions(task, n, seed, qa_file)
        high = len(docs)
    tokens = MAX_NEW_TOKENS[task]
    fits = lambda s: len(prompt_ids(tokenizer, s)[0]) + tokens <= max_seq_length  # noqa: E731
    samples, start = [], low
    for index in range(n):
        name = f"{seed}/{task}/{index}"
        if config["task"] == "variable_tracking":
            build = partial(vt_sample, example=_vt_example(name + "/example", config, tokenizer))
        if config["task"] == "qa":
            build, low = partial(qa_sample, question=questions[index], docs=docs), len(questions[index]["gold"])

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
    """Per-sample score x 100 after RULER's post-processing (same signature as longbench_metrics.sample_scores)."""
    metric = METRICS[TEMPLATES[task_config(task)["task"]]["metric"]]
    if not predictions or len(predictions) != len(answers_list):
        raise ValueError(f"{task}: {len(predictions)} predictions for {len(answers_list)} samples")
    return [100.0 * metric(postprocess(p), answers) for p, answers in zip(predictions, answers_list)]


def score_task(task: str, predictions: list[str], answers_list: list[list[str]], all_classes=None) -> float:
    """RULER's task score: 100 x the mean over samples. Not rounded (RULER rounds to 2 decimals)."""
    scores = sample_scores(task, predictions, answers_list, all_classes)
    return sum(scores) / len(scores)
