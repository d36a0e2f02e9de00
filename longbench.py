"""LongBench v1 (English) protocol: data, prompts, truncation, official metrics, and a
built-in synthetic suite for machines without the data. No model code, no torch.

References: Bai et al., "LongBench" (ACL 2024), THUDM/LongBench pred.py / eval.py /
metrics.py (reimplemented here, not copied); synthetic tasks follow the passkey test
(Mohtashami & Jaggi 2023) and RULER (Hsieh et al. 2024).
"""
import hashlib
import importlib
import inspect
import json
import os
import random
import re
import string
import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path

from rouge import Rouge

import model as M  # the model family's chat format
with warnings.catch_warnings():
    # Without python-Levenshtein, fuzzywuzzy warns once and uses difflib.SequenceMatcher.
    # LongBench does not require python-Levenshtein, so difflib is the expected backend.
    warnings.filterwarnings("ignore", message="Using slow pure-python SequenceMatcher")
    from fuzzywuzzy import fuzz

FUZZ_BACKEND = "difflib" if fuzz.SequenceMatcher.__module__ == "difflib" else "python-Levenshtein"

ENGLISH_TASKS = ["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique",
                 "gov_report", "qmsum", "multi_news", "trec", "triviaqa", "samsum",
                 "passage_count", "passage_retrieval_en", "lcc", "repobench-p"]
NO_CHAT_TASKS = {"trec", "triviaqa", "samsum", "lcc", "repobench-p"}  # pred.py: raw prompt
FIRST_LINE_TASKS = {"trec", "triviaqa", "samsum"}  # eval.py: score the first line only
REQUIRED_KEYS = ("input", "context", "answers", "_id")
CONFIG_FILES = ("dataset2prompt.json", "dataset2maxlen.json")

# ----------------------------------------------------------------------------- data

def _task_dir(d: Path) -> Path | None:
    """The folder holding the <task>.jsonl files: d itself, or d/data (official zip layout)."""
    for cand in (d, d / "data"):
        if cand.is_dir() and any((cand / f"{t}.jsonl").is_file() for t in ENGLISH_TASKS):
            return cand
    return None


def find_data_dir(arg: str | None, project_root) -> Path | None:
    """--data-dir, else $LONGBENCH_DIR, else <project>/data/LongBench, else ../shared/longbench. An explicit arg or env
    var that holds no task files is an error (silently going synthetic would mislead);
    a missing default returns None, and the caller then uses synthetic_suite()."""
    for source, value in (("--data-dir", arg), ("$LONGBENCH_DIR", os.environ.get("LONGBENCH_DIR"))):
        if value:
            found = _task_dir(Path(value).expanduser())
            if found is None:
                raise FileNotFoundError(f"{source}={value}: no LongBench <task>.jsonl files there "
                                        f"(nor in its data/ subfolder)")
            return found
    # the project's own data folder, then the development subset laid beside the project
    return _task_dir(Path(project_root) / "data" / "LongBench") or _task_dir(Path(project_root).parent / "shared" / "longbench")


def available_tasks(data_dir) -> list[str]:
    """English tasks that have a <task>.jsonl in data_dir, in the official order."""
    return [t for t in ENGLISH_TASKS if (Path(data_dir) / f"{t}.jsonl").is_file()]


def load_config(data_dir) -> tuple[dict, dict]:
    """(dataset2prompt, dataset2maxlen), looked up beside the task files, in config/, or in
    ../config (the official repository keeps LongBench/config next to the data)."""
    d = Path(data_dir)
    places = [d, d / "config", d.parent / "config"]
    out = []
    for name in CONFIG_FILES:
        paths = [p / name for p in places]
        hit = next((p for p in paths if p.is_file()), None)
        if hit is None:
            raise FileNotFoundError(f"{name} not found; looked in: " + ", ".join(map(str, paths)))
        out.append(json.loads(hit.read_text(encoding="utf-8")))
    return out[0], out[1]


def load_task(data_dir, task: str) -> list[dict]:
    """Parse <data_dir>/<task>.jsonl; errors name the file and the 1-based line."""
    if task not in ENGLISH_TASKS:
        raise ValueError(f"unknown LongBench task {task!r}; valid: {', '.join(ENGLISH_TASKS)}")
    path = Path(data_dir) / f"{task}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no data file for task {task!r}: {path}")
    samples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                s = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(s, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(s).__name__}")
            missing = [k for k in REQUIRED_KEYS if k not in s]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing required key {missing[0]!r}")
            if not isinstance(s["answers"], list):
                raise ValueError(f"{path}:{lineno}: 'answers' must be a list")
            samples.append({"all_classes": None, "length": None, "dataset": task, **s})
    return samples

# ----------------------------------------------------------------------------- prompts

def build_prompt(sample: dict, template: str) -> str:
    """Fill the task template with the sample's fields (pred.py: prompt_format.format(**obj)).
    Only the template's braces are parsed, so braces inside the context are safe."""
    return template.format(**sample)


def truncate_middle(token_ids: list[int], max_length: int) -> list[int]:
    """LongBench middle truncation (pred.py): if the prompt is longer than max_length, keep
    the first half = int(max_length/2) and the last `half` tokens, i.e. 2*half tokens (one
    fewer than max_length when it is odd). Official pred.py truncates the raw prompt before
    the chat template is applied (and decodes the halves back to text); callers do the same.
    One deliberate difference: for max_length < 2 (half = 0) official `ids[-0:]` would keep
    everything; we keep nothing."""
    if len(token_ids) <= max_length:
        return list(token_ids)
    half = int(max_length / 2)
    return list(token_ids[:half]) + list(token_ids[len(token_ids) - half:])


def use_chat_template(task: str) -> bool:
    """pred.py wraps prompts in the chat template except on few-shot and code tasks."""
    return task not in NO_CHAT_TASKS and task not in SYNTHETIC_NO_CHAT_TASKS


def prompt_ids(tokenizer, sample: dict, template: str, max_length: int) -> list[int]:
    """pred.py: fill the template, middle-truncate the raw prompt's tokens, decode the two halves
    back to text, wrap in the chat template unless the task is prompted raw, re-encode."""
    prompt = build_prompt(sample, template)
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    if len(ids) > max_length:
        kept, half = truncate_middle(ids, max_length), int(max_length / 2)
        prompt = tokenizer.decode(kept[:half]) + tokenizer.decode(kept[half:])
    if use_chat_template(sample["dataset"]):  # the template carries its own special tokens
        return tokenizer.encode(M.chat_prompt(tokenizer, prompt), add_special_tokens=False).ids
    return tokenizer.encode(prompt).ids  # raw prompt: the tokenizer's own specials (e.g. BOS), as HF


# ----------------------------------------------------------------------------- metrics

_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD-style: lowercase, drop punctuation, then articles, then squeeze whitespace
    (official order: punctuation goes before articles, so "the," -> "the" -> "")."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def qa_f1_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Token-level F1 of the normalized strings (bag of tokens, Counter intersection)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


_ROUGE = Rouge()  # stateless; official builds one per call


def rouge_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """ROUGE-L F from the `rouge` PyPI package, as official. Its quirks are kept: sentences
    split on '.', word counts over unique words, and any exception (e.g. an empty
    hypothesis, or RecursionError on a huge sentence) scores 0."""
    try:
        return _ROUGE.get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"]
    except Exception:
        return 0.0


def classification_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """trec: 1/len(matches) if the gold class is among the class names found (as substrings)
    in the prediction, else 0. Matches that are proper substrings of the gold are dropped,
    reproducing official `for m in lst: ... lst.remove(m)`, which skips the element after
    each removal. (Official's difflib fallback sits behind `if list != 0`, always true: dead.)"""
    matches = [c for c in kwargs["all_classes"] if c in prediction]
    i = 0
    while i < len(matches):  # list-iterator semantics: index advances even after a removal
        m = matches[i]
        if m in ground_truth and m != ground_truth:
            matches.remove(m)
        i += 1
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _share_equal(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def retrieval_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Share of the numbers in the prediction equal to N of the gold 'Paragraph N'."""
    return _share_equal(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


def count_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Share of the numbers in the prediction equal to the gold number."""
    return _share_equal(prediction, str(ground_truth))


def code_sim_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """fuzz.ratio/100 between the gold line and the first prediction line (after stripping
    leading newlines) that has no backtick, '#' or '//'; "" if there is none."""
    line = next((l for l in prediction.lstrip("\n").split("\n")
                 if "`" not in l and "#" not in l and "//" not in l), "")
    return fuzz.ratio(line, ground_truth) / 100


DATASET2METRIC = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score,
    "hotpotqa": qa_f1_score, "2wikimqa": qa_f1_score, "musique": qa_f1_score,
    "gov_report": rouge_score, "qmsum": rouge_score, "multi_news": rouge_score,
    "trec": classification_score, "triviaqa": qa_f1_score, "samsum": rouge_score,
    "passage_retrieval_en": retrieval_score, "passage_count": count_score,
    "lcc": code_sim_score, "repobench-p": code_sim_score,
}


def sample_scores(task: str, predictions: list[str], answers_list: list[list[str]],
                  all_classes: list[str] | None) -> list[float]:
    """eval.py's per-sample score x 100: the max over the gold answers."""
    metric = {**DATASET2METRIC, **SYNTHETIC2METRIC}.get(task)
    if metric is None:
        raise ValueError(f"no metric for task {task!r}")
    if not predictions or len(predictions) != len(answers_list):
        raise ValueError(f"{task}: {len(predictions)} predictions for {len(answers_list)} samples")
    if task in FIRST_LINE_TASKS:
        predictions = [pred.lstrip("\n").split("\n")[0] for pred in predictions]
    return [100.0 * max([0.0] + [metric(pred, g, all_classes=all_classes) for g in golds])
            for pred, golds in zip(predictions, answers_list)]


def score_task(task: str, predictions: list[str], answers_list: list[list[str]],
               all_classes: list[str] | None) -> float:
    """eval.py scorer: 100 x mean over samples of the max over gold answers. Not rounded
    (official rounds to 2 decimals when it writes result.json)."""
    scores = sample_scores(task, predictions, answers_list, all_classes)
    return sum(scores) / len(scores)

# ----------------------------------------------------------------------------- synthetic suite

SYNTHETIC_TASKS = ["synthetic_passkey", "synthetic_kv", "synthetic_vartrack", "synthetic_code"]
SYNTHETIC_NO_CHAT_TASKS = {"synthetic_code"}  # code completion is prompted raw, like lcc
SYNTHETIC2METRIC = {"synthetic_passkey": count_score, "synthetic_kv": count_score,
                    "synthetic_vartrack": count_score, "synthetic_code": code_sim_score}
SYNTHETIC2PROMPT = {
    "synthetic_passkey": "There is a pass key hidden inside a lot of irrelevant text. Find it "
                         "and memorize it.\n\n{context}\n\n{input}",
    "synthetic_kv": "Some special magic numbers are hidden within the following text. "
                    "Memorize them.\n\n{context}\n\n{input}",
    "synthetic_vartrack": "Memorize and track the chains of variable assignments hidden in "
                          "the following text.\n\n{context}\n\n{input}",
    "synthetic_code": "Please complete the code given below. \n{context}Next line of code:\n",
}
SYNTHETIC2MAXLEN = {"synthetic_passkey": 16, "synthetic_kv": 16, "synthetic_vartrack": 16,
                    "synthetic_code": 64}
_FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
           "There and back again.", "The river flows slowly past the old mill.",
           "A light wind moves through the trees.", "Nothing much happens in the small town.",
           "The clock on the wall keeps ticking.", "Clouds drift over the quiet hills."]
_KEY_WORDS = ["amber", "brisk", "cedar", "dune", "ember", "fjord", "granite", "harbor", "ivory",
              "juniper", "kelp", "lantern", "meadow", "nectar", "orchid", "pebble", "quartz",
              "raven", "saffron", "thistle", "umber", "velvet", "willow", "zephyr"]
_CODE_MODULES = ["textwrap", "difflib", "fractions", "heapq", "bisect", "shlex", "fnmatch",
                 "calendar", "statistics", "csv", "argparse", "dataclasses", "functools",
                 "string", "glob", "ipaddress", "configparser", "tokenize", "pprint", "gettext"]


def is_synthetic(task_or_id: str) -> bool:
    return task_or_id.startswith("synthetic_")


def _haystack(rng: random.Random, needles: list[str], target_words: int) -> str:
    """Filler sentences of about target_words words with the needles inserted in order at
    random sentence boundaries."""
    budget = target_words - sum(len(n.split()) for n in needles)
    sents, words = [], 0
    while words < budget:
        sents.append(rng.choice(_FILLER))
        words += len(sents[-1].split())
    positions = sorted(rng.randint(0, len(sents)) for _ in needles)
    for pos, needle in reversed(list(zip(positions, needles))):
        sents.insert(pos, needle)  # from the back: earlier positions stay valid, order kept
    return " ".join(sents)


def _passkey(rng, target_words):
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return _haystack(rng, [needle], target_words), "Question: What is the pass key?\nAnswer:", key


def _kv(rng, target_words, n_pairs=8):
    keys = rng.sample(_KEY_WORDS, n_pairs)
    values = [str(rng.randint(1000000, 9999999)) for _ in keys]
    needles = [f"The special magic number for {k} is: {v}." for k, v in zip(keys, values)]
    i = rng.randrange(n_pairs)
    question = f"Question: What is the special magic number for {keys[i]}?\nAnswer:"
    return _haystack(rng, needles, target_words), question, values[i]


def _vartrack(rng, target_words, n_chains=3, hops=4):
    names = []
    while len(names) < n_chains * hops:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    chains = [(names[c * hops:(c + 1) * hops], str(rng.randint(10000, 99999)))
              for c in range(n_chains)]
    stmts = [iter([f"VAR {ch[0]} = {v}."] + [f"VAR {ch[j]} = VAR {ch[j - 1]}." for j in
                   range(1, hops)]) for ch, v in chains]
    order = [c for c in range(n_chains) for _ in range(hops)]
    rng.shuffle(order)  # interleave the chains, each chain's assignments staying in order
    needles = [next(stmts[c]) for c in order]
    question = f"Question: What is the value of VAR {chains[0][0][-1]}?\nAnswer:"
    return _haystack(rng, needles, target_words), question, chains[0][1]


@lru_cache(maxsize=None)
def _module_lines(name: str) -> tuple[str, ...]:
    return tuple(inspect.getsource(importlib.import_module(name)).split("\n"))


_CODE_LINE = re.compile(r"\s*([A-Za-z_][\w.]*\s*(=|\(|\[|\.)|(return|if|for|while|elif|with|"
                        r"raise|yield) )")


def _code(rng, target_words):
    """Next-line completion on real stdlib source: context = the lines just before a
    code line (about target_words words), answer = that line, indentation included."""
    lines = _module_lines(rng.choice(_CODE_MODULES))
    before = [0]
    for l in lines:
        before.append(before[-1] + len(l.split()))  # before[i] = words in lines[:i]
    good = [i for i, l in enumerate(lines) if i >= 10 and _CODE_LINE.match(l)
            and not any(t in l for t in ("#", "`", "//"))]
    full = [i for i in good if before[i] >= target_words]
    i = rng.choice(full or good)
    start = i - 1
    while start > 0 and before[i] - before[start - 1] <= target_words:
        start -= 1
    return "\n".join(lines[start:i]) + "\n", "", lines[i]


_MAKERS = {"synthetic_passkey": _passkey, "synthetic_kv": _kv,
           "synthetic_vartrack": _vartrack, "synthetic_code": _code}


def synthetic_suite(n_per_task: int, seed: int = 0, target_words: int = 1500):
    """Deterministic offline stand-in for LongBench: (samples_by_task, dataset2prompt,
    dataset2maxlen), samples in the official format with ids synthetic_<task>_<n>. The code
    task reads this interpreter's stdlib, so it is deterministic per Python version."""
    by_task = {}
    for task, make in _MAKERS.items():
        samples = []
        for n in range(n_per_task):
            rng = random.Random(f"{seed}/{task}/{n}")  # str seeds hash deterministically
            context, question, answer = make(rng, target_words)
            samples.append({"input": question, "context": context, "answers": [answer],
                            "all_classes": None, "_id": f"{task}_{n}", "dataset": task,
                            "language": "en", "length": len(context.split())})
        by_task[task] = samples
    return by_task, dict(SYNTHETIC2PROMPT), dict(SYNTHETIC2MAXLEN)

# ----------------------------------------------------------------------------- calib/eval split

def _rank(seed: int, _id: str) -> str:
    return hashlib.sha256(f"{seed}:{_id}".encode()).hexdigest()


def dataset_split(samples_by_task: dict, n_calib_per_task: int, seed: int = 0):
    """(calib_ids, eval_ids): per task, order ids by sha256(seed:_id) and give the first
    n_calib_per_task to calibration (at most all but one, so every task stays evaluable).
    Depends only on the ids and seed, not on file order."""
    calib, evaluation, seen = [], [], set()
    for task, samples in samples_by_task.items():
        ids = [s["_id"] for s in samples]
        dup = sorted({i for i, c in Counter(ids).items() if c > 1} | (set(ids) & seen))
        if dup:
            raise ValueError(f"duplicate _id values (task {task}): {dup[:10]}")
        seen |= set(ids)
        ranked = sorted(ids, key=lambda i: _rank(seed, i))
        k = max(0, min(n_calib_per_task, len(ranked) - 1))
        calib += ranked[:k]
        evaluation += ranked[k:]
    check_disjoint(calib, evaluation)
    return calib, evaluation


def check_disjoint(calib_ids, eval_ids) -> None:
    """Raise if any sample is used both to calibrate and to evaluate."""
    overlap = sorted(set(calib_ids) & set(eval_ids))
    if overlap:
        shown = ", ".join(overlap[:20]) + (" ..." if len(overlap) > 20 else "")
        raise ValueError(f"{len(overlap)} sample id(s) in both calibration and evaluation "
                         f"sets: {shown}")
