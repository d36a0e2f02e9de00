"""LongBench v1 (English) protocol: data discovery, which samples calibrate and which evaluate,
prompts (with the context/question split), middle truncation; its official metrics are
longbench_metrics.py. No torch.

References: Bai et al., "LongBench" (ACL 2024), THUDM/LongBench pred.py / eval.py
(reimplemented here, not copied).
"""
import hashlib
import json
import os
import socket
from collections import Counter
from pathlib import Path

import checkpoint as CK  # the model family's chat format


ENGLISH_TASKS = ["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique",
                 "gov_report", "qmsum", "multi_news", "trec", "triviaqa", "samsum",
                 "passage_count", "passage_retrieval_en", "lcc", "repobench-p"]
NO_CHAT_TASKS = {"trec", "triviaqa", "samsum", "lcc", "repobench-p"}  # pred.py: raw prompt
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
    """--data-dir, else $LONGBENCH_DIR, else <project>/data/LongBench (where `download` puts it).
    An explicit folder that holds no task files is an error (silently running something else
    would mislead); no folder at all returns None and the caller says what it does instead."""
    for source, value in (("--data-dir", arg), ("$LONGBENCH_DIR", os.environ.get("LONGBENCH_DIR"))):
        if value:
            found = _task_dir(Path(value).expanduser())
            if found is None:
                raise FileNotFoundError(f"{source}={value}: no LongBench <task>.jsonl files there "
                                        f"(nor in its data/ subfolder)")
            return found
    return _task_dir(Path(project_root) / "data" / "LongBench")


def data_id(data_dir) -> str:
    """Which data a run used, wherever the folder lies: a hash of its task files' contents."""
    digest = hashlib.sha256()
    for path in sorted(Path(data_dir).glob("*.jsonl")):
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return "longbench-" + digest.hexdigest()[:12]


def find_or_download(arg: str | None, project_root) -> tuple[Path | None, str]:
    """(LongBench folder or None, what happened): --data-dir, $LONGBENCH_DIR or data/LongBench, else a
    download into data/LongBench where there is a network; None means RULER (generated, offline)."""
    found = find_data_dir(arg, project_root)
    if found is not None:
        return found, ""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not online():
        return None, "no LongBench folder and no network: running RULER (generated offline) instead"
    try:
        return download(Path(project_root) / "data" / "LongBench"), "downloaded LongBench into data/LongBench"
    except (OSError, ValueError) as e:
        return None, f"LongBench download failed ({e}): running RULER instead"


def online(host: str = "huggingface.co") -> bool:
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


LONGBENCH_HUB = "THUDM/LongBench"  # the Hugging Face Hub dataset whose data.zip holds LongBench v1's <task>.jsonl


def download(dest: Path, repo: str = LONGBENCH_HUB) -> Path:
    """LongBench v1 from the Hugging Face Hub into dest, once: data.zip (with a progress bar), checked
    against the sha256 the Hub lists for it, then the English <task>.jsonl extracted. The prompt and
    generation-length configs ship with LongBench's code, not with data.zip: see install_zip."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url  # installed with tokenizers
    expected = get_hf_file_metadata(hf_hub_url(repo, "data.zip", repo_type="dataset")).etag.strip('"')
    return install_zip(Path(hf_hub_download(repo, "data.zip", repo_type="dataset")), expected, dest)


def install_zip(zip_path: Path, sha256: str, dest: Path) -> Path:
    """Check zip_path's sha256, extract its English <task>.jsonl (and the two config files, if it has
    them) into dest; returns dest. Without the configs, the error says which files to put where."""
    import zipfile
    digest = hashlib.sha256(Path(zip_path).read_bytes()).hexdigest()
    if digest != sha256:
        raise ValueError(f"{zip_path}: sha256 {digest[:16]}... does not match the published {sha256[:16]}...")
    dest = Path(dest)
    (dest / "config").mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path) as z:
        for info in z.infolist():
            name = Path(info.filename).name
            target = dest / name if name in {f"{t}.jsonl" for t in ENGLISH_TASKS} else \
                dest / "config" / name if name in CONFIG_FILES else None
            if target is not None:
                tmp = target.with_name(target.name + ".tmp")
                tmp.write_bytes(z.read(info))
                os.replace(tmp, target)
    missing = [n for n in CONFIG_FILES if not (dest / "config" / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{dest}: the data is there, but LongBench's prompt configs are not: put "
                                f"{' and '.join(missing)} (from the THUDM/LongBench code repository, LongBench/config/) "
                                f"into {dest / 'config'}")
    return dest


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
            raise FileNotFoundError(f"{name} not found; looked in: " + ", ".join(map(str, paths)) + ". LongBench's "
                                    "code repository has both files in LongBench/config/: copy them beside the data")
        try:
            out.append(json.loads(hit.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{hit}: not a readable JSON file ({e})") from None
    return out[0], out[1]


def load_task(data_dir, task: str) -> list[dict]:
    """Parse <data_dir>/<task>.jsonl; errors name the file and the 1-based line."""
    if task not in ENGLISH_TASKS:
        raise ValueError(f"unknown LongBench task {task!r}; valid: {', '.join(ENGLISH_TASKS)}")
    path = Path(data_dir) / f"{task}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no data file for task {task!r}: {path}")
    samples = []
    for lineno, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            s = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
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


def load_samples(data_dir, tasks: list[str] | None = None) -> dict[str, list[dict]]:
    """Samples by task, in file order, each carrying its task's official template and generation
    length ("template", "max_new_tokens"). Every file is read and checked before anything slow."""
    prompts, maxlens = load_config(data_dir)
    valid = available_tasks(data_dir)
    unknown = [t for t in tasks or [] if t not in valid]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; valid here: {', '.join(valid)}")
    tasks = list(dict.fromkeys(tasks or valid))
    missing = [t for t in tasks if t not in prompts or t not in maxlens]
    if missing:
        raise ValueError(f"task(s) {', '.join(missing)} have no prompt template or max length in the config files")
    return {t: [dict(s, template=prompts[t], max_new_tokens=maxlens[t]) for s in load_task(data_dir, t)] for t in tasks}


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
    return task not in NO_CHAT_TASKS


def prompt_ids(tokenizer, sample: dict, max_length: int) -> tuple[list[int], int]:
    """pred.py's prompt: fill the task template, middle-truncate the raw prompt's tokens, decode the
    two halves back to text, wrap in the chat template unless the task is prompted raw, re-encode.
    Returns the ids and how many of them are context: everything before the template's text after
    {context} (the question and the instruction), which query-agnostic compression leaves out."""
    template = sample["template"]
    prompt = build_prompt(sample, template)
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    if len(ids) > max_length:
        kept, half = truncate_middle(ids, max_length), int(max_length / 2)
        prompt = tokenizer.decode(kept[:half]) + tokenizer.decode(kept[half:])
    question = template[template.index("{context}") + len("{context}"):].format(**sample)
    boundary = len(prompt) - len(question) if prompt.endswith(question) else len(prompt)  # cut into: all context
    if use_chat_template(sample["dataset"]):  # the template carries its own special tokens
        before, after = CK.chat_parts(tokenizer)
        return CK.encode_split(tokenizer, before + prompt + after, len(before) + boundary)
    return CK.encode_split(tokenizer, prompt, boundary, add_special_tokens=True)  # raw: the tokenizer's own specials (BOS), as HF


# ----------------------------------------------------------------------------- calibration vs evaluation

RESERVE_PER_TASK = 2  # per task, the first samples by sha256(seed 0:_id) are reserved for calibration
EVAL_PER_TASK = 2  # the standard evaluation (--limit 2): the first samples per task, in file order, outside the reserve


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


def reserved_ids(samples_by_task: dict) -> set[str]:
    """The calibration reserve: never evaluated, whatever plans exist (so every run, with or
    without PolyKV, at any budget, evaluates the same samples)."""
    return set(dataset_split(samples_by_task, RESERVE_PER_TASK, 0)[0])


def evaluation_samples(samples_by_task: dict, limit: int, excluded: set[str]) -> list[dict]:
    """Per task, in file order, the samples outside the reserve and `excluded` (ids a plan was
    calibrated or validated on): the first `limit` of them (0 = all)."""
    out_of_bounds = reserved_ids(samples_by_task) | set(excluded)
    out = []
    for samples in samples_by_task.values():
        kept = [s for s in samples if s["_id"] not in out_of_bounds]
        out += kept[:limit] if limit else kept
    return out


def calibration_pool(samples_by_task: dict) -> dict[str, list[dict]]:
    """Per task, the samples calibration may draw from: all but those of the standard evaluation
    (`evaluation_samples(..., EVAL_PER_TASK, set())`), so a plan never changes what is evaluated."""
    evaluated = {s["_id"] for s in evaluation_samples(samples_by_task, EVAL_PER_TASK, set())}
    return {t: [s for s in samples if s["_id"] not in evaluated] for t, samples in samples_by_task.items()}


def draw(pool: dict[str, list[dict]], n: int, seed: int = 0) -> list[dict]:
    """n samples taken round-robin over the tasks, each task's in sha256(seed:_id) order. Draws
    are nested: a larger n extends a smaller one."""
    queues = [sorted(samples, key=lambda s: _rank(seed, s["_id"])) for samples in pool.values()]
    order = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    if len(order) < n:
        raise ValueError(f"the calibration pool holds {len(order)} samples, fewer than the {n} asked for")
    return order[:n]


def without(pool: dict[str, list[dict]], samples: list[dict]) -> dict[str, list[dict]]:
    """The pool minus some samples (e.g. the validation set before drawing calibration samples)."""
    drop = {s["_id"] for s in samples}
    return {t: [s for s in ss if s["_id"] not in drop] for t, ss in pool.items()}


def check_disjoint(calib_ids, eval_ids) -> None:
    """Raise if any sample is used both to calibrate and to evaluate."""
    overlap = sorted(set(calib_ids) & set(eval_ids))
    if overlap:
        shown = ", ".join(overlap[:20]) + (" ..." if len(overlap) > 20 else "")
        raise ValueError(f"{len(overlap)} sample id(s) in both calibration and evaluation "
                         f"sets: {shown}")
