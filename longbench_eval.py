"""
LongBench v1 evaluation of KV-cache compression: FullKV, every baseline and PolyKV,
every budget, all served by ONE prefill per sample.

    python longbench_eval.py --budget 512                      # quick default run (see --help)
    python longbench_eval.py --data-dir DIR --limit 0 --budgets 128 256 512 1024
    torchrun --nproc_per_node N longbench_eval.py ...          # shards samples over ranks

Per sample: official prompt (template, middle truncation of the raw prompt, chat template
except on trec/triviaqa/samsum/lcc/repobench-p), one prefill that also records what the
scorers need, then for each method and budget a compressed copy of that cache and a greedy
decode of the task's official length (FullKV decodes on a clone). Outputs in --out:
predictions.jsonl (appended and fsynced per run: an interrupted run resumes), metrics.json
(task scores, averages, fidelity to FullKV, gap recovery), results.md and scores.png.

Fidelity to FullKV (far less noisy than task scores on a small model), per method/budget:
- exact_match: share of samples whose generated tokens equal FullKV's;
- prefix_agreement: mean over samples of (common token prefix with FullKV) / len(FullKV),
  i.e. how far the method follows FullKV's greedy output before the first divergence.
- tf_agreement / tf_kl: fed FullKV's own output (teacher forcing), the share of positions
  where the method's next-token argmax is FullKV's token, and the mean KL(FullKV || method):
  the calibration objective, measured on the evaluation samples.
Gap recovery = (PolyKV - best baseline) / (FullKV - best baseline) at the same budget on the
same samples, for the task average and for each fidelity measure (FullKV: agreement 1, KL 0);
the best baseline, chosen per measure, is the best of the requested single-policy methods and
pyramidkv (streamingllm, h2o, snapkv, tova, knorm, random, pyramidkv).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import longbench as LB
import model as M
import polykv as K

PROJECT = Path(__file__).resolve().parent
BASELINES = ("streamingllm", "h2o", "snapkv", "tova", "knorm", "random", "pyramidkv")
POLYKV = ("polykv", "polykv_routing", "polykv_allocation")
METHODS = ("fullkv",) + BASELINES + POLYKV
# Defaults sized so `python longbench_eval.py --budget 512` ends in ~15 min on a 2-core CPU.
DEFAULT_MAX_LENGTH = 2048
DEFAULT_LIMIT = {"longbench": 1, "synthetic": 4}  # samples per task; --limit 0 = all
QUICK_MAX_NEW = 128  # the quick default (no --limit/--tasks/--ids) skips tasks that generate more (the
# 512-token summaries gov_report, qmsum, multi_news decode ~3x longer than the other 13 tasks together)
SYNTHETIC_FULL = 50  # samples per task of the "full" synthetic suite (--limit 0)

# ----------------------------------------------------------------------------- data


def load_tasks(data_dir, tasks) -> tuple[dict | None, dict, dict, list[str]]:
    """(samples by task, dataset2prompt, dataset2maxlen, tasks), checked before anything slow.
    Synthetic (data_dir None): samples by task is None, generated once the exclusions are known."""
    if data_dir is None:
        prompts, maxlens, valid = dict(LB.SYNTHETIC2PROMPT), dict(LB.SYNTHETIC2MAXLEN), list(LB.SYNTHETIC_TASKS)
    else:
        (prompts, maxlens), valid = LB.load_config(data_dir), LB.available_tasks(data_dir)
    unknown = [t for t in tasks or [] if t not in valid]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; valid here: {', '.join(valid)}")
    tasks = list(dict.fromkeys(tasks or valid))
    missing = [t for t in tasks if t not in prompts or t not in maxlens]
    if missing:
        raise ValueError(f"task(s) {', '.join(missing)} have no prompt template or max length in the config files")
    by_task = None if data_dir is None else {t: LB.load_task(data_dir, t) for t in tasks}
    return by_task, prompts, maxlens, tasks


def select_samples(by_task, tasks, limit, ids, excluded, max_length) -> tuple[list[dict], int]:
    """(samples in evaluation order, number excluded as calibration/validation samples).
    Per task: file order, the plans' calibration/validation ids dropped, then the first `limit`."""
    if by_task is None:
        n = (limit or SYNTHETIC_FULL) + len(excluded)
        by_task = LB.synthetic_suite(n, target_words=int(0.6 * max_length))[0]
    samples, n_excluded = [], 0
    for task in tasks:
        kept = [s for s in by_task[task] if s["_id"] not in excluded]
        n_excluded += len(by_task[task]) - len(kept)
        samples += [dict(s, dataset=task) for s in (kept[:limit] if limit and not ids else kept)]
    if ids:
        LB.check_disjoint(excluded, ids)
        found = {s["_id"]: s for s in samples}
        missing = [i for i in ids if i not in found]
        if missing:
            raise ValueError(f"unknown sample id(s): {', '.join(missing[:10])}")
        samples = [found[i] for i in dict.fromkeys(ids)]
    return samples, n_excluded


# ----------------------------------------------------------------------------- plans


def committed_plan_path(model_dir: Path, method: str, budget: int) -> Path:
    return PROJECT / "plans" / model_dir.name / f"budget{budget}" / f"{method}.json"


def load_checked_plan(path, model_dir: Path, n_layers: int) -> K.Plan:
    """A PolyKV plan for THIS model: its name, model and layer count are checked."""
    plan = K.load_plan(path)  # readable, and valid for its own layer count
    if plan.model and Path(plan.model).name != model_dir.name:
        raise ValueError(f"{path}: plan is for model {plan.model!r}, not {model_dir.name!r}; calibrate this model")
    if len(plan.policies) != n_layers:
        raise ValueError(f"{path}: plan has {len(plan.policies)} layers, model {model_dir.name} has {n_layers}")
    if plan.name not in POLYKV:
        raise ValueError(f"{path}: plan name {plan.name!r} is not one of {', '.join(POLYKV)}")
    if plan.average_budget != int(plan.average_budget):
        raise ValueError(f"{path}: average budget {plan.average_budget} is not an integer")
    return plan


def polykv_plans(args, names, budgets, model, tokenizer, model_dir, data_dir) -> dict:
    """{(name, budget): Plan} from --plan files, else committed defaults, else calibration."""
    n = model.cfg.n_layers
    if args.plan:
        plans = [load_checked_plan(p, model_dir, n) for p in args.plan]
        return {(p.name, int(p.average_budget)): p for p in plans}
    default = {(m, b): committed_plan_path(model_dir, m, b) for m in names for b in budgets}
    paths = {k: p for k, p in default.items() if p.is_file()}
    missing = sorted({b for (m, b) in default if (m, b) not in paths})
    if missing:
        import calibrate  # only when PolyKV is requested without plans
        for turn in (0, 1):  # under torchrun rank 0 calibrates first; the others then read its cache
            if (rank_world()[0] == 0) == (turn == 0):
                found = calibrate.ensure_plans(model, tokenizer, model_dir, missing, data_dir, args.max_length, K.Settings())
            barrier()
        paths.update({(m, b): found[b][m] for b in missing for m in names})
    return {k: load_checked_plan(p, model_dir, n) for k, p in paths.items()}


def committed_plans(model_dir: Path, budgets, n_layers: int) -> list[K.Plan]:
    """The committed PolyKV plans of this model at these budgets, whether or not PolyKV runs now."""
    paths = [p for b in budgets for m in POLYKV if (p := committed_plan_path(model_dir, m, b)).is_file()]
    return [load_checked_plan(p, model_dir, n_layers) for p in paths]


def calibration_ids(plans: list[K.Plan]) -> set[str]:
    """Every sample a plan was calibrated or validated on: no method is scored on them, so
    every method (PolyKV or not, in this run or a later one into the same folder) sees the same samples."""
    return {i for p in plans for i in p.info.get("calibration_ids", []) + p.info.get("validation_ids", [])}


def build_runs(methods, budgets, n_layers, plans: dict, settings: K.Settings) -> list[tuple]:
    """[(method, budget, plan)]: FullKV once (budget None, plan None), the rest per budget."""
    runs = [("fullkv", None, None)]
    for b in budgets:
        for m in methods:
            if m in POLYKV:
                if (m, b) not in plans:
                    raise ValueError(f"no {m} plan for budget {b}; plans given: {sorted(plans)}")
                plan = plans[(m, b)]
            elif m != "fullkv":
                plan = K.pyramid_plan(n_layers, b, settings) if m == "pyramidkv" else K.uniform_plan(n_layers, m, b, settings)
                plan.name = m
                K.validate_plan(plan, n_layers, b, source=f"{m} at budget {b}")
            else:
                continue
            runs.append((m, b, plan))
    return runs

# ----------------------------------------------------------------------------- running


def plan_fingerprint(plan: K.Plan | None) -> str | None:
    """Identifies what a method kept: a changed plan is a different run (None for FullKV)."""
    return None if plan is None else hashlib.sha256(json.dumps([plan.policies, plan.budgets]).encode()).hexdigest()[:12]


def run_key(sample_id: str, method: str, budget, fingerprint: str | None) -> str:
    return f"{sample_id}\t{method}\t{budget}\t{fingerprint}"


def batches(runs: list[tuple], size: int) -> list[list[tuple]]:
    """Runs decoded together: same budget (similar cache lengths, so little padding), at most `size`."""
    groups: dict = {}
    for run in runs:
        groups.setdefault(run[1], []).append(run)
    return [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]


TF_TOKENS = 64  # teacher-forced fidelity looks at the first tokens of FullKV's output


@torch.no_grad()
def teacher_forced_fidelity(model, caches: list, full_tokens: list[int], full_logprobs: torch.Tensor) -> list[dict]:
    """Fed FullKV's own output, how closely does each compressed cache follow FullKV, token by token?
    tf_agreement: share of positions where its next-token argmax is FullKV's token; tf_kl: mean
    KL(FullKV || it). The calibration objective, measured on evaluation samples; unlike greedy
    agreement it does not stop counting at the first divergence, so it is far less noisy."""
    if len(full_tokens) < 2:
        return [{"tf_agreement": None, "tf_kl": None}] * len(caches)
    cont = torch.tensor(full_tokens[:TF_TOKENS], device=full_logprobs.device)
    batch = M.stack_caches(caches, room=len(cont))  # a copy: `caches` stay unchanged
    logprobs = F.log_softmax(M.forward(model, cont[None, :-1].expand(len(caches), -1), batch).float(), -1)  # (B, n-1, V)
    agree = (logprobs.argmax(-1) == cont[1:]).float().mean(-1)  # (B,)
    kl = K.mean_kl(full_logprobs, logprobs)  # (B,)
    return [{"tf_agreement": round(a, 5), "tf_kl": round(k, 6)} for a, k in zip(agree.tolist(), kl.tolist())]


def evaluate_sample(model, tokenizer, sample, prompts, maxlens, runs, stops, args, write, full_tokens=None) -> None:
    """One prefill, then every pending (method, budget): compress a copy, decode, write a record.
    Runs of one budget decode as one batch (model.stack_caches): one pass over the weights per
    step serves them all; each row generates what it would alone (tested). FullKV runs first
    (or its tokens come from an earlier run): the teacher-forced fidelity needs its output."""
    task = sample["dataset"]
    ids = LB.prompt_ids(tokenizer, sample, prompts[task], args.max_length)
    tokens = torch.tensor([ids], device=args.device)
    h2o_layers = sorted({l for _, _, p in runs if p for l in K.h2o_layers(p)})
    window = next((p.settings.window for _, _, p in runs if p), 32)
    t0 = time.perf_counter()
    logits, cache, stats = K.prefill_with_stats(model, tokens, window, h2o_layers)
    prefill_s = time.perf_counter() - t0
    max_new, stop_ids = maxlens[task], list(stops)
    if task == "samsum":  # official: also stop at "\n", and at least one new token (min_length)
        stop_ids += tokenizer.encode("\n", add_special_tokens=False).ids[-1:]
        logits = logits.clone()
        logits[:, stop_ids] = float("-inf")
    full_logprobs = None
    for group in batches(runs, args.batch):
        t0 = time.perf_counter()
        caches = [cache.clone() if plan is None else K.apply_plan(cache, stats, plan, room=max_new + 1)
                  for _, _, plan in group]
        kv_bytes = [c.nbytes() for c in caches]  # the compressed prompt, before any generated token
        if group[0][2] is None:  # FullKV: agrees with itself
            fidelity = [{"tf_agreement": 1.0, "tf_kl": 0.0}]
        else:
            if full_logprobs is None and len(full_tokens) > 1:
                full_logprobs = K.teacher_forced_logprobs(model, cache.clone(), tokens.new_tensor(full_tokens[:TF_TOKENS]))
            fidelity = teacher_forced_fidelity(model, caches, full_tokens, full_logprobs)
        batch = caches[0] if len(caches) == 1 else M.stack_caches(caches, room=max_new + 1)
        outs = M.generate_batch(model, batch, logits.expand(len(caches), -1), max_new, stop_ids)
        seconds = (time.perf_counter() - t0) / len(group)  # a batch's time, shared by its runs
        for (method, budget, plan), out, kv, fid in zip(group, outs, kv_bytes, fidelity):
            out = out[:-1] if out and out[-1] in stop_ids else out
            full_tokens = out if plan is None else full_tokens
            write({"id": sample["_id"], "task": task, "method": method, "budget": budget,
                   "plan": plan_fingerprint(plan), "prediction": tokenizer.decode(out), "tokens": out, **fid,
                   "n_prompt_tokens": len(ids), "kv_bytes": kv, "seconds": round(seconds, 4),
                   "prefill_seconds": round(prefill_s, 4)})


def read_records(out: Path) -> dict[str, dict]:
    """Every finished run in predictions*.jsonl; a torn last line (killed mid-write) is skipped."""
    records = {}
    for path in sorted(out.glob("predictions*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[run_key(r["id"], r["method"], r["budget"], r.get("plan"))] = r
    return records


def open_writer(path: Path):
    torn = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    f = open(path, "a", encoding="utf-8")
    if torn:  # a run killed mid-write left half a line: end it, so new records start clean
        f.write("\n")

    def write(record: dict) -> None:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return f, write


def data_id(data_dir: Path | None) -> str:
    """Which data a run used, wherever the folder lies: a hash of its task files' names and sizes."""
    if data_dir is None:
        return "synthetic"
    files = sorted((p.name, p.stat().st_size) for p in Path(data_dir).glob("*.jsonl"))
    return "longbench-" + hashlib.sha256(json.dumps(files).encode()).hexdigest()[:12]


def check_run_config(out: Path, config: dict) -> None:
    """Refuse to resume into a folder holding results made with other settings. (Plans may change:
    each record carries its plan's fingerprint, so a new plan only re-runs its own method.)"""
    path = out / "run.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in config if old.get(k) != config[k]]
        if diff:
            raise ValueError(f"{out} holds a run with different {', '.join(diff)}; use another --out")
    atomic_write(path, json.dumps(config, indent=1))

# ----------------------------------------------------------------------------- metrics


def fidelity(records: list[dict], full: list[list[int]]) -> dict:
    """Agreement with FullKV over samples: greedy outputs (exact, common prefix) and teacher-forced."""
    def prefix(a, b):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return n / len(b) if b else float(a == b)

    def mean_of(key):  # records made before teacher-forced fidelity existed have no value
        values = [r[key] for r in records if r.get(key) is not None]
        return sum(values) / len(values) if values else None
    tokens = [r["tokens"] for r in records]
    return {"exact_match": sum(a == b for a, b in zip(tokens, full)) / len(full),
            "prefix_agreement": sum(prefix(a, b) for a, b in zip(tokens, full)) / len(full),
            "tf_agreement": mean_of("tf_agreement"), "tf_kl": mean_of("tf_kl")}


def compute_metrics(records: dict, samples: list, runs: list, header: dict) -> dict:
    tasks = list(dict.fromkeys(s["dataset"] for s in samples))
    fingerprints = {(m, b): plan_fingerprint(p) for m, b, p in runs}
    rec = lambda s, m, b: records[run_key(s["_id"], m, b, fingerprints[(m, b)])]  # noqa: E731
    full_tokens = [rec(s, "fullkv", None)["tokens"] for s in samples]
    scores, fid, per_sample, tf_kl = {}, {}, {}, {}
    by_task = {t: [s for s in samples if s["dataset"] == t] for t in tasks}
    for method, budget, _ in runs:
        key = "full" if budget is None else str(budget)
        per_sample[method, key] = {t: LB.sample_scores(t, [rec(s, method, budget)["prediction"] for s in ss],
                                                       [s["answers"] for s in ss], ss[0]["all_classes"])
                                   for t, ss in by_task.items()}
        tf_kl[method, key] = [rec(s, method, budget).get("tf_kl") for s in samples]
        per_task = {t: sum(v) / len(v) for t, v in per_sample[method, key].items()}
        scores.setdefault(method, {})[key] = {"tasks": per_task, "average": sum(per_task.values()) / len(tasks)}
        fid.setdefault(method, {})[key] = fidelity([rec(s, method, budget) for s in samples], full_tokens)
    prefills = {s["_id"]: rec(s, "fullkv", None)["prefill_seconds"] for s in samples}
    saved = sum(prefills.values()) * (len(runs) - 1)
    return {**header, "tasks": tasks, "n_samples": len(samples), "scores": scores, "fidelity": fid,
            "gap_recovery": gap_recovery(scores, fid, runs),
            "score_differences": score_differences(scores, fid, per_sample, tf_kl),
            "timing": {"prefill_seconds": sum(prefills.values()), "runs_per_prefill": len(runs),
                       "prefill_seconds_saved": saved,
                       "run_seconds": sum(rec(s, m, b)["seconds"] for s in samples for m, b, _ in runs)}}


def best_baselines(scores: dict, fid: dict, b: str) -> dict | None:
    """Which baseline is best at budget b on each measure: highest average score, prefix agreement
    and teacher-forced agreement; lowest teacher-forced KL. None when no baseline ran at b."""
    base = [m for m in BASELINES if b in scores.get(m, {})]
    if not base:
        return None
    measure = lambda key: {m: fid[m][b][key] for m in base if fid[m][b][key] is not None}  # noqa: E731
    agree, kl = measure("tf_agreement"), measure("tf_kl")
    return {"score": max(base, key=lambda m: scores[m][b]["average"]),
            "prefix": max(base, key=lambda m: fid[m][b]["prefix_agreement"]),
            "tf_agreement": max(agree, key=agree.get, default=None), "tf_kl": min(kl, key=kl.get, default=None)}


def gap_recovery(scores: dict, fid: dict, runs: list) -> dict:
    """Per budget, per PolyKV variant: on the task average, on prefix agreement and on teacher-forced
    agreement and KL, each against the baseline that is best on that measure."""
    out = {}
    full = scores["fullkv"]["full"]["average"]
    for budget in sorted({b for _, b, _ in runs if b is not None}):
        b = str(budget)
        best = best_baselines(scores, fid, b)
        if best is None:
            continue
        base, base_f = scores[best["score"]][b]["average"], fid[best["prefix"]][b]["prefix_agreement"]
        base_t = fid[best["tf_agreement"]][b]["tf_agreement"] if best["tf_agreement"] else None
        base_k = fid[best["tf_kl"]][b]["tf_kl"] if best["tf_kl"] else None
        for m in POLYKV:
            if b in scores.get(m, {}):
                p, pf, pt, pk = (scores[m][b]["average"], fid[m][b]["prefix_agreement"], fid[m][b]["tf_agreement"],
                                 fid[m][b]["tf_kl"])
                out.setdefault(b, {})[m] = {
                    # only defined when FullKV beats the best baseline: with too few samples it may not
                    "score": (p - base) / (full - base) if full > base else None,
                    "best_baseline": best["score"], "best_baseline_average": base, "fullkv_average": full,
                    "baselines_compared": sorted(m for m in BASELINES if b in scores.get(m, {})),
                    "fidelity": (pf - base_f) / (1 - base_f) if base_f < 1 else None,
                    "best_baseline_fidelity": best["prefix"],
                    "tf_agreement": (pt - base_t) / (1 - base_t) if base_t is not None and pt is not None and base_t < 1 else None,
                    "best_baseline_tf_agreement": best["tf_agreement"],
                    # FullKV's KL to itself is 0: the share of the best baseline's KL that is removed
                    "tf_kl": (base_k - pk) / base_k if base_k is not None and pk is not None and base_k > 0 else None,
                    "best_baseline_tf_kl": best["tf_kl"]}
    return out


BOOTSTRAP_RESAMPLES = 2000


def bootstrap_difference(a: dict, b: dict, n: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[float]:
    """[difference, low, high]: the LongBench average of a minus that of b (per-sample scores by task)
    with a 95% paired bootstrap interval: samples are redrawn within each task, the same draws for
    both methods, so the interval shows how much of a difference the sample choice alone can make."""
    g = torch.Generator().manual_seed(seed)
    diffs = torch.zeros(n, dtype=torch.float64)
    for task in a:
        d = torch.tensor(a[task], dtype=torch.float64) - torch.tensor(b[task], dtype=torch.float64)  # (S,)
        draws = torch.randint(0, len(d), (n, len(d)), generator=g)  # (n, S)
        diffs += d[draws].mean(-1) / len(a)
    point = sum(sum(x) / len(x) - sum(y) / len(y) for x, y in zip(a.values(), b.values())) / len(a)
    low, high = torch.quantile(diffs, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [point, low, high]


def score_differences(scores: dict, fid: dict, per_sample: dict, tf_kl: dict) -> dict:
    """Per budget, per PolyKV variant: its score minus the best baseline's and minus FullKV's, and its
    teacher-forced KL minus the lowest baseline KL, with bootstrap intervals (noise or a real gap?).
    Also FullKV's score minus the best baseline's: the gap itself."""
    def paired_kl(a: list, b: list) -> list[float]:  # samples with a KL for both (FullKV said >= 2 tokens)
        pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
        return bootstrap_difference({"all": [x for x, _ in pairs]}, {"all": [y for _, y in pairs]}) if pairs else None
    out = {}
    for b in sorted({k for per in scores.values() for k in per if k != "full"}, key=int):
        found = best_baselines(scores, fid, b)
        if found is None:
            continue
        best, best_kl = found["score"], found["tf_kl"]
        out[b] = {"best_baseline": best, "best_baseline_tf_kl": best_kl,
                  "fullkv_minus_best": bootstrap_difference(per_sample["fullkv", "full"], per_sample[best, b])}
        for m in POLYKV:
            if (m, b) in per_sample:
                out[b][m] = {"minus_best": bootstrap_difference(per_sample[m, b], per_sample[best, b]),
                             "minus_fullkv": bootstrap_difference(per_sample[m, b], per_sample["fullkv", "full"]),
                             "tf_kl_minus_best": paired_kl(tf_kl[m, b], tf_kl[best_kl, b]) if best_kl else None}
    return out


def fmt(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(metrics: dict) -> str:
    tasks = metrics["tasks"]
    lines = [f"{metrics['model']} on {metrics['data']}: {metrics['n_samples']} samples, prompts truncated to "
             f"{metrics['max_length']} tokens, {metrics['excluded_calibration_samples']} calibration samples excluded. "
             "exact / prefix: agreement of the generated tokens with FullKV's (exact match; common prefix share); "
             f"tf agree / tf KL: fed FullKV's output (first {TF_TOKENS} tokens), share of next tokens predicted as "
             "FullKV does / mean KL(FullKV || method)."]
    budgets = sorted({int(b) for m in metrics["scores"].values() for b in m if b != "full"})
    if len(budgets) > 1:  # overview: average score (prefix agreement with FullKV) per method and budget
        lines += ["\n### Summary: average score / prefix agreement / teacher-forced agreement with FullKV\n",
                  "| method | " + " | ".join(str(b) for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
        for m, per in metrics["scores"].items():
            cell = lambda k: (f"{per[k]['average']:.2f} / {metrics['fidelity'][m][k]['prefix_agreement']:.2f} / "  # noqa: E731
                              f"{fmt(metrics['fidelity'][m][k]['tf_agreement'])}" if k in per else "–")
            lines.append(f"| {m} | " + " | ".join(cell("full" if m == "fullkv" else str(b)) for b in budgets) + " |")
        for name in POLYKV:
            gaps = [metrics["gap_recovery"].get(str(b), {}).get(name) for b in budgets]
            if any(gaps):
                pct = lambda g, k: "–" if not g or g.get(k) is None else f"{100 * g[k]:.1f}%"  # noqa: E731
                lines.append(f"| {name} gap recovery: score / prefix / tf agree / tf KL | " + " | ".join(
                    f"{pct(g, 'score')} / {pct(g, 'fidelity')} / {pct(g, 'tf_agreement')} / {pct(g, 'tf_kl')}" for g in gaps) + " |")
        diffs = metrics.get("score_differences", {})
        ci = lambda d: f"{d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]"  # noqa: E731
        lines += [f"\n### Summary: average score minus the best baseline's (points), 95% paired bootstrap interval "
                  f"over samples ({BOOTSTRAP_RESAMPLES} resamples within tasks)\n",
                  "| method | " + " | ".join(str(b) for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|",
                  "| best baseline | " + " | ".join(diffs.get(str(b), {}).get("best_baseline", "–") for b in budgets) + " |",
                  "| fullkv | " + " | ".join(ci(diffs[str(b)]["fullkv_minus_best"]) if str(b) in diffs else "–"
                                          for b in budgets) + " |"]
        for name in POLYKV:
            if any(name in diffs.get(str(b), {}) for b in budgets):
                lines.append(f"| {name} | " + " | ".join(ci(diffs[str(b)][name]["minus_best"]) if name in diffs.get(str(b), {})
                                                        else "–" for b in budgets) + " |")
        lines += ["\nTeacher-forced KL minus the lowest baseline KL, same bootstrap over samples:\n",
                  "| method | " + " | ".join(str(b) for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|",
                  "| lowest-KL baseline | " + " | ".join(str(diffs.get(str(b), {}).get("best_baseline_tf_kl", "–"))
                                                       for b in budgets) + " |"]
        for name in POLYKV:
            cells = [diffs.get(str(b), {}).get(name, {}).get("tf_kl_minus_best") for b in budgets]
            if any(cells):
                lines.append(f"| {name} | " + " | ".join(
                    "–" if d is None else f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]" for d in cells) + " |")
        lines += ["\n### Summary: teacher-forced KL(FullKV || method), lower is better\n",
                  "| method | " + " | ".join(str(b) for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
        for m, per in metrics["fidelity"].items():
            if m != "fullkv":
                lines.append(f"| {m} | " + " | ".join(fmt(per.get(str(b), {}).get("tf_kl"), 4) for b in budgets) + " |")
    for b in budgets:
        lines += [f"\n### Average budget {b} tokens per KV head per layer ({metrics['n_samples']} samples)\n",
                  "| method | " + " | ".join(tasks) + " | avg | exact | prefix | tf agree | tf KL |",
                  "|---" * (len(tasks) + 6) + "|"]
        for m, per in metrics["scores"].items():
            key = "full" if m == "fullkv" else str(b)
            if key in per:
                s, f = per[key], metrics["fidelity"][m][key]
                lines.append(f"| {m} | " + " | ".join(f"{s['tasks'][t]:.1f}" for t in tasks)
                             + f" | **{s['average']:.2f}** | {f['exact_match']:.2f} | {f['prefix_agreement']:.2f} | "
                             f"{fmt(f['tf_agreement'])} | {fmt(f['tf_kl'], 4)} |")
        for m, g in metrics["gap_recovery"].get(str(b), {}).items():
            pct = lambda x: "n/a (FullKV does not beat the best baseline here)" if x is None else f"{100 * x:.1f}%"  # noqa: E731
            lines.append(f"\n{m}: gap recovery {pct(g['score'])} of the gap to FullKV over the best baseline "
                         f"({g['best_baseline']}); on prefix agreement {pct(g['fidelity'])} (vs {g['best_baseline_fidelity']}); "
                         f"on teacher-forced agreement {pct(g.get('tf_agreement'))} (vs {g.get('best_baseline_tf_agreement')}); "
                         f"on teacher-forced KL {pct(g.get('tf_kl'))} (vs {g.get('best_baseline_tf_kl')})")
    return "\n".join(lines) + "\n"


def plot(metrics: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax_f) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m, per in metrics["scores"].items():
        if m == "fullkv":
            ax.axhline(per["full"]["average"], color="black", ls="--", label="fullkv")
            continue
        xs = sorted(int(b) for b in per)
        ax.plot(xs, [per[str(x)]["average"] for x in xs], marker="o", label=m)
        ax_f.plot(xs, [metrics["fidelity"][m][str(x)]["prefix_agreement"] for x in xs], marker="o", label=m)
    ax.set(xscale="log", xlabel="average budget (tokens per KV head per layer)", ylabel="average score",
           title=f"{metrics['model']} ({metrics['n_samples']} samples)")
    ax_f.set(xscale="log", xlabel="average budget (tokens per KV head per layer)",
             ylabel="prefix agreement with FullKV", title="fidelity to FullKV")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

# ----------------------------------------------------------------------------- torchrun


def dist_on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_world() -> tuple[int, int]:
    return (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist_on() else (0, 1)


def barrier() -> None:
    if dist_on():
        torch.distributed.barrier()


def init_distributed(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA (one GPU per local rank)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    cuda = device.startswith("cuda")
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=12))
    if device == "cuda":  # one GPU per process
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(device)
    return device

# ----------------------------------------------------------------------------- command line


def parse_args(argv):
    p = argparse.ArgumentParser(description="LongBench evaluation of FullKV, KV-cache baselines and PolyKV.")
    p.add_argument("--budget", type=int, help="average budget: tokens kept per KV head per layer")
    p.add_argument("--budgets", type=int, nargs="+", help="several budgets, all from the same prefills")
    p.add_argument("--methods", nargs="+", choices=METHODS, metavar="METHOD", help=f"subset of: {', '.join(METHODS)}")
    p.add_argument("--plan", nargs="+", type=Path, help="PolyKV plan JSON files (default: plans/ or calibrate)")
    p.add_argument("--model", type=Path, help="checkpoint folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data-dir", help="LongBench folder (default: $LONGBENCH_DIR, data/LongBench, else synthetic)")
    p.add_argument("--tasks", nargs="+", help="subset of tasks (default: all found)")
    p.add_argument("--ids", nargs="+", help="evaluate exactly these sample ids")
    p.add_argument("--limit", type=int, help=f"samples per task, 0 = all (default: {DEFAULT_LIMIT['longbench']} on LongBench, "
                   f"{DEFAULT_LIMIT['synthetic']} on the synthetic suite: sized for ~15 min on a 2-core CPU)")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="middle-truncate prompts to this many tokens")
    p.add_argument("--out", type=Path, help="output folder (default: results/<model>/<data>_maxlen<L>_limit<N>)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=16, help="runs of one budget decoded together per sample (1 = one by one)")
    args = p.parse_args(argv)
    if args.budget is not None and args.budgets:
        p.error("give --budget or --budgets, not both")
    return args


def choose_methods(args, model, tokenizer, model_dir: Path, data_dir):
    """(methods, budgets, {(polykv name, budget): plan}, settings, ids no method is scored on)."""
    names = [m for m in (args.methods or METHODS) if m in POLYKV]
    budgets = args.budgets or ([args.budget] if args.budget else None)
    plans = {}
    if names or args.plan:
        if budgets is None and args.plan:
            budgets = sorted({int(load_checked_plan(p, model_dir, model.cfg.n_layers).average_budget) for p in args.plan})
        plans = polykv_plans(args, names, budgets or [512], model, tokenizer, model_dir, data_dir)
    budgets = budgets or [512]
    # every plan given or committed counts, even for a method not run now
    excluded = calibration_ids(list(plans.values()) + committed_plans(model_dir, budgets, model.cfg.n_layers))
    methods = args.methods or [m for m in METHODS if m not in POLYKV or not args.plan or any(k[0] == m for k in plans)]
    plans = {k: p for k, p in plans.items() if k[0] in methods and k[1] in budgets}
    settings = next(iter(plans.values())).settings if plans else K.Settings()
    if any(p.settings.window != settings.window for p in plans.values()):
        raise ValueError("the PolyKV plans use different observation windows; one prefill cannot serve them all")
    return methods, budgets, plans, settings, excluded


def setup(args):
    """Everything before the loop: model, data, plans, runs, output folder."""
    if args.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}")
    args.device = init_distributed(args.device)
    model_dir = args.model or M.default_model_dir()
    model = M.load_model(model_dir, args.device, getattr(torch, args.dtype))
    tokenizer = M.load_tokenizer(model_dir)
    data_dir = LB.find_data_dir(args.data_dir, PROJECT)
    data = "synthetic" if data_dir is None else "longbench"
    quick = args.limit is None and not args.tasks and not args.ids
    args.limit = DEFAULT_LIMIT[data] if args.limit is None else args.limit
    by_task, prompts, maxlens, tasks = load_tasks(data_dir, args.tasks)
    skipped = [t for t in tasks if quick and maxlens[t] > QUICK_MAX_NEW]
    tasks = [t for t in tasks if t not in skipped]
    methods, budgets, plans, settings, excluded = choose_methods(args, model, tokenizer, Path(model_dir), data_dir)
    samples, n_excl = select_samples(by_task, tasks, args.limit, args.ids, excluded, args.max_length)
    if not samples:
        raise ValueError("no samples left to evaluate")
    longest = max(maxlens[s["dataset"]] for s in samples)
    if args.max_length + longest + 64 > model.cfg.max_seq_len:
        raise ValueError(f"--max-length {args.max_length} + {longest} new tokens exceeds the model window {model.cfg.max_seq_len}")
    runs = build_runs(methods, budgets, model.cfg.n_layers, plans, settings)
    out = args.out or PROJECT / "results" / Path(model_dir).name / f"{data}_maxlen{args.max_length}_limit{args.limit or 'all'}"
    out.mkdir(parents=True, exist_ok=True)
    header = {"model": Path(model_dir).name, "data": data if data_dir is None else str(data_dir.resolve()),
              "max_length": args.max_length, "dtype": args.dtype, "settings": asdict(settings),
              "excluded_calibration_samples": n_excl, "window": model.cfg.max_seq_len,
              "limit": f"{args.limit} per task" if args.limit and not args.ids else "chosen ids" if args.ids else "all",
              "skipped_tasks": skipped}
    if rank_world()[0] == 0:
        check_run_config(out, {"data_id": data_id(data_dir)} | {k: header[k] for k in ("model", "max_length", "dtype", "settings")})
    return model, tokenizer, Path(model_dir), samples, prompts, maxlens, runs, out, header


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model, tokenizer, model_dir, samples, prompts, maxlens, runs, out, header = setup(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rank, world = rank_world()
    if rank == 0:
        if header["data"] == "synthetic":
            print("!" * 78 + "\nNO LongBench FOLDER FOUND: this run uses the built-in SYNTHETIC suite, not LongBench.\n"
                  "Point --data-dir (or $LONGBENCH_DIR) at a LongBench folder for real results.\n" + "!" * 78)
        if header["skipped_tasks"]:
            print(f"quick default run: {header['limit']}, prompts cut to {header['max_length']} tokens, skipping "
                  f"{', '.join(header['skipped_tasks'])} (> {QUICK_MAX_NEW} new tokens each) to stay near 15 min on a "
                  f"2-core CPU; give --limit or --tasks to choose the scale")
        print(f"{len(samples)} samples ({header['excluded_calibration_samples']} excluded as PolyKV calibration/"
              f"validation samples) x {len(runs)} method-budget runs -> {out}")
    barrier()  # run.json is written
    done = read_records(out)
    mine = samples[rank::world]
    stops = M.stop_token_ids(model_dir, tokenizer)
    f, write = open_writer(out / ("predictions.jsonl" if world == 1 else f"predictions.rank{rank}.jsonl"))
    bar = tqdm(total=len(mine) * len(runs), desc="samples x methods", disable=rank != 0)
    with f, bar:
        for sample in mine:
            pending = [r for r in runs if run_key(sample["_id"], r[0], r[1], plan_fingerprint(r[2])) not in done]
            bar.update(len(runs) - len(pending))
            if pending:
                full = done.get(run_key(sample["_id"], "fullkv", None, None), {}).get("tokens")
                evaluate_sample(model, tokenizer, sample, prompts, maxlens, pending, stops, args,
                                lambda r: (write(r), bar.update(1)), full)
    barrier()
    if rank == 0:
        report(out, samples, runs, header, world)
    if dist_on():
        torch.distributed.destroy_process_group()
    return 0


def report(out: Path, samples, runs, header, world: int) -> None:
    """Merge the ranks' predictions, then metrics.json, results.md, scores.png and the summary."""
    records = read_records(out)
    atomic_write(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records.values()))
    for p in out.glob("predictions.rank*.jsonl"):
        p.unlink()
    metrics = compute_metrics(records, samples, runs, header)
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=1))
    table = markdown(metrics)
    atomic_write(out / "results.md", table)
    plot(metrics, out / "scores.png")
    t = metrics["timing"]
    print(table)
    print(f"one prefill per sample served {t['runs_per_prefill']} method-budget runs: {t['prefill_seconds']:.0f} s of "
          f"prefill instead of {t['prefill_seconds'] * t['runs_per_prefill']:.0f} s (saved {t['prefill_seconds_saved']:.0f} s)")
    print(f"wrote {out}/metrics.json, results.md, scores.png, predictions.jsonl")
    skipped = f", skipped {', '.join(header['skipped_tasks'])}" if header["skipped_tasks"] else ""
    print(f"this run: {len(samples)} samples ({header['limit']}{skipped}), prompts middle-truncated to {header['max_length']} "
          f"tokens, official generation lengths.\nfull suite: python longbench_eval.py --data-dir ../shared/longbench "
          f"--limit 0 --max-length {(header['window'] - 640) // 100 * 100} --budgets 128 256 512 1024 (on a GPU add "
          f"--device cuda --dtype bfloat16; on N GPUs: torchrun --nproc_per_node N longbench_eval.py ...)")


if __name__ == "__main__":
    sys.exit(main())
