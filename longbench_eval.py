"""
Evaluation of KV-cache compression on LongBench or RULER: FullKV, every baseline and PolyKV, every
budget, all served by ONE prefill per sample.

    python longbench_eval.py --budget 512                       # the quick default run (see --help)
    python longbench_eval.py --data-dir DIR --limit 0 --budgets 128 256 512 1024
    python longbench_eval.py --benchmark ruler --query agnostic --budgets 128 512
    torchrun --nproc_per_node N longbench_eval.py ...           # shards the samples over ranks

Per sample: the benchmark's prompt (longbench.prompt_ids / ruler.prompt_ids), one prefill that
also keeps what the scorers need, then for each method and budget a compressed copy of that cache
and a greedy decode of the task's generation length; one budget's runs decode as one batch.
- query-aware (LongBench's default, as in SnapKV/PyramidKV): the whole prompt is compressed;
- query-agnostic (kvpress's default): only the context is prefilled and compressed, then the
  question is prefilled on top of each compressed cache (SnapKV and TOVA see context queries only).
Outputs in --out: predictions.jsonl (appended and fsynced per run: an interrupted run resumes;
a lock keeps a second run out), then the report (report.py): metrics.json, results.md, scores.png.
"""
from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import longbench as LB
import longbench_metrics as LM
import checkpoint as CK
import model as M
import polykv as K
import report
import run_folder as RF
import ruler as R
from run_settings import (MAX_LENGTH, QUICK, QUICK_MAX_NEW, RunSettings, build_runs, choose_plans, load_given_plans,
                          parse_settings, policy_settings, runs_on_record)

PROJECT = Path(__file__).resolve().parent
TF_TOKENS = 64  # teacher-forced fidelity looks at the first tokens of FullKV's output


# ----------------------------------------------------------------------------- samples


def load_benchmark(s: RunSettings, tokenizer) -> dict[str, list[dict]]:
    """Samples by task, every file read and checked: LongBench's folder, or RULER's samples generated
    from the evaluation seed (never a calibration seed). Each sample knows its generation length."""
    if s.benchmark == "ruler":
        qa_files = dict(s.qa_files)
        enabled = R.ESSAY_TASKS * (s.haystack is not None) + tuple(qa_files)  # tasks whose data was given
        unknown = [t for t in s.tasks if t not in R.ALL_TASKS + enabled]
        if unknown:
            raise ValueError(f"unknown RULER task(s) {', '.join(unknown)}; valid: {', '.join(R.ALL_TASKS + enabled)} "
                             "(essay tasks with --haystack, qa_1 with --squad, qa_2 with --hotpotqa)")
        return {t: R.generate(t, s.limit, tokenizer, s.max_length, s.ruler_seed,
                              haystack_file=s.haystack, qa_file=qa_files.get(t))
                for t in s.tasks or R.DEFAULT_TASKS + enabled}
    skipped = quick_skipped(s)
    return {t: v for t, v in LB.load_samples(s.data_dir, list(s.tasks) or None).items() if t not in skipped}


def quick_skipped(s: RunSettings) -> list[str]:
    """The LongBench tasks the quick default leaves out: those that generate over QUICK_MAX_NEW tokens."""
    if not (s.quick and s.benchmark == "longbench"):
        return []
    max_new = LB.load_config(s.data_dir)[1]
    return [t for t in LB.available_tasks(s.data_dir) if max_new.get(t, 0) > QUICK_MAX_NEW]


def select_samples(s: RunSettings, by_task: dict, excluded: set[str]) -> tuple[list[dict], int]:
    """(the evaluated samples in order, how many were left out as calibration samples): per task, in
    file order, those outside LongBench's calibration reserve and the plans' ids; or --ids."""
    out_of_bounds = (LB.reserved_ids(by_task) if s.benchmark == "longbench" else set()) | excluded
    samples = LB.evaluation_samples(by_task, 0 if s.ids else s.limit, excluded) if s.benchmark == "longbench" \
        else [x for v in by_task.values() for x in v if x["_id"] not in excluded]
    if s.ids:
        LB.check_disjoint(out_of_bounds, s.ids)
        found = {x["_id"]: x for x in samples}
        missing = [i for i in s.ids if i not in found]
        if missing:
            raise ValueError(f"unknown sample id(s): {', '.join(missing[:10])}")
        samples = [found[i] for i in dict.fromkeys(s.ids)]
    if not samples:
        raise ValueError("no samples left to evaluate")
    return samples, sum(x["_id"] in out_of_bounds for v in by_task.values() for x in v)


# ----------------------------------------------------------------------------- running


def batches(runs: list[tuple], size: int) -> list[list[tuple]]:
    """Runs decoded together: same budget (similar cache lengths, so little padding), at most `size`."""
    groups: dict = {}
    for run in runs:
        groups.setdefault(run[1], []).append(run)
    return [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]


@torch.no_grad()
def teacher_forced_fidelity(model, batch: M.KVCache, full_tokens: list[int], full_logprobs) -> list[dict]:
    """Fed FullKV's own output, how closely does each row of a batch of caches follow FullKV?
    tf_agreement: share of positions where its next-token argmax is FullKV's token; tf_kl: mean
    KL(FullKV || it), the calibration objective measured on evaluation samples. Unlike greedy
    agreement it does not stop counting at the first divergence, so it is far less noisy."""
    B = batch.k[0].shape[0]
    if len(full_tokens) < 2:
        return [{"tf_agreement": None, "tf_kl": None}] * B
    cont = torch.tensor(full_tokens[:TF_TOKENS], device=full_logprobs.device)
    logits = M.forward(model, cont[None, :-1].expand(B, -1), batch.clone())  # (B, n-1, V); the batch is kept
    logprobs = F.log_softmax(logits.float(), -1)
    agree = (logprobs.argmax(-1) == cont[1:]).float().mean(-1)  # (B,)
    kl = K.mean_kl(full_logprobs, logprobs)  # (B,)
    return [{"tf_agreement": round(a, 5), "tf_kl": round(k, 6)} for a, k in zip(agree.tolist(), kl.tolist())]


def prefill_sample(model, ids: list[int], n_context: int, s: RunSettings, runs: list[tuple]):
    """(logits or None, cache, stats, question ids): query-aware prefills the whole prompt,
    query-agnostic the context only (its question is prefilled on each compressed cache)."""
    cut = n_context if s.query == "agnostic" and n_context < len(ids) else len(ids)
    tokens = torch.tensor([ids[:cut]], device=s.device)
    h2o_layers = sorted({l for _, _, p in runs if p for l in K.h2o_layers(p)})
    window = policy_settings(runs).window
    logits, cache, stats = K.prefill_with_stats(model, tokens, window, h2o_layers)
    question = tokens.new_tensor(ids[cut:])
    return (None if len(question) else logits), cache, stats, question


def evaluate_sample(model, tokenizer, sample: dict, runs: list[tuple], stops: list[int], s: RunSettings,
                    bench, write, full_tokens=None) -> None:
    """One prefill, then every pending (method, budget): compress a copy, decode, write a record.
    Runs of one budget decode as one batch (model.stack_caches): one pass over the weights per step
    serves them all, and each row generates what it would alone (tested). FullKV runs first (or its
    tokens come from an earlier run): the teacher-forced fidelity needs its output."""
    ids, n_context = bench.prompt_ids(tokenizer, sample, s.max_length)
    t0 = time.perf_counter()
    logits, cache, stats, question = prefill_sample(model, ids, n_context, s, runs)
    prefill_s = time.perf_counter() - t0
    max_new, stop_ids = sample["max_new_tokens"], list(stops)
    banned = []  # samsum, officially: also stop at "\n", which may not be the first token
    if sample["dataset"] == "samsum":
        banned = tokenizer.encode("\n", add_special_tokens=False).ids[-1:]
        stop_ids += banned
    room, full_logprobs = len(question) + max_new + TF_TOKENS, None
    for group in batches(runs, s.batch):
        t0 = time.perf_counter()
        caches = [cache.clone() if plan is None else K.apply_plan(cache, stats, plan, room) for _, _, plan in group]
        # the cache when decoding starts: the (compressed) prompt, and the question query-agnostic adds on top
        kv_bytes = [c.nbytes() + len(question) * cache.nbytes() // cache.lengths[0] for c in caches]
        batch = caches[0] if len(caches) == 1 else M.stack_caches(caches, room)
        first = first_logits(model, batch, logits, question, banned)  # (B, V)
        if group[0][2] is None:  # FullKV: agrees with itself
            fidelity = [{"tf_agreement": 1.0, "tf_kl": 0.0}]
        else:
            full_logprobs = full_logprobs if full_logprobs is not None else fullkv_logprobs(model, cache, question, full_tokens)
            fidelity = teacher_forced_fidelity(model, batch, full_tokens, full_logprobs)
        outs = M.generate_batch(model, batch, first, max_new, stop_ids)
        seconds = (time.perf_counter() - t0) / len(group)  # a batch's time, shared by its runs
        for (method, budget, plan), out, kv, fid in zip(group, outs, kv_bytes, fidelity):
            out = out[:-1] if out and out[-1] in stop_ids else out
            full_tokens = out if plan is None else full_tokens
            write({"id": sample["_id"], "task": sample["dataset"], "method": method, "budget": budget,
                   "plan": RF.plan_fingerprint(plan), "prediction": tokenizer.decode(out), "tokens": out, **fid,
                   "n_prompt_tokens": len(ids), "kv_bytes": kv, "seconds": round(seconds, 4),
                   "prefill_seconds": round(prefill_s, 4)})


def first_logits(model, batch: M.KVCache, prefill_logits, question: torch.Tensor, banned: list[int]) -> torch.Tensor:
    """Each row's logits for its first generated token (B, V): the prefill's (query-aware), or those
    after prefilling the question on the row's compressed cache (query-agnostic)."""
    B = batch.k[0].shape[0]
    if prefill_logits is not None:
        logits = prefill_logits.expand(B, -1).clone()
    else:
        logits = M.forward(model, question[None].expand(B, -1), batch, last_only=True)
    logits[:, banned] = float("-inf")
    return logits


def fullkv_logprobs(model, cache: M.KVCache, question: torch.Tensor, full_tokens: list[int] | None):
    """FullKV's teacher-forced log-probs over its own first TF_TOKENS output tokens (None if fewer than 2)."""
    if not full_tokens or len(full_tokens) < 2:
        return None
    full = cache.clone()
    if len(question):
        M.forward(model, question[None], full, last_only=True)
    return K.teacher_forced_logprobs(model, full, question.new_tensor(full_tokens[:TF_TOKENS]))


def run_config(s: RunSettings, model_dir: Path, runs: list[tuple]) -> dict:
    """What the records in a folder depend on: resuming with anything else is refused. Plans may
    change: each record carries its plan's fingerprint, so a new plan only re-runs its method."""
    data = LB.data_id(s.data_dir) if s.benchmark == "longbench" else f"ruler-seed{s.ruler_seed}" + "".join(
        f"+{name}-{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
        for name, path in ((("essay", s.haystack),) if s.haystack else ()) + s.qa_files)
    return {"data_id": data, "model": CK.model_name(model_dir), "model_id": CK.model_fingerprint(model_dir),
            "max_length": s.max_length, "dtype": s.dtype, "query": s.query,
            "settings": asdict(policy_settings(runs))}


def run_samples(model, tokenizer, model_dir: Path, samples: list[dict], runs: list[tuple], s: RunSettings,
                out: Path) -> None:
    """This rank's samples, resuming: a run already in the folder's records is not redone."""
    rank, world = RF.rank_world()
    done = RF.read_records(out)
    mine = samples[rank::world]
    bench = R if s.benchmark == "ruler" else LB
    stops = CK.stop_token_ids(model_dir, tokenizer)
    f, write = RF.open_writer(out / ("predictions.jsonl" if world == 1 else f"predictions.rank{rank}.jsonl"))
    bar = tqdm(total=len(mine) * len(runs), desc="samples x methods", disable=rank != 0)
    with f, bar:
        for sample in mine:
            pending = [r for r in runs if RF.run_key(sample["_id"], r[0], r[1], RF.plan_fingerprint(r[2])) not in done]
            bar.update(len(runs) - len(pending))
            if pending:
                full = done.get(RF.run_key(sample["_id"], "fullkv", None, None), {}).get("tokens")
                evaluate_sample(model, tokenizer, sample, pending, stops, s, bench,
                                lambda r: (write(r), bar.update(1)), full)


# ----------------------------------------------------------------------------- command line


def complete(s: RunSettings, model_dir: Path, cfg: M.Config) -> tuple[RunSettings, str]:
    """Fill in what the command line left open: benchmark and data, length, limit, methods, budgets
    (those of --plan files when none are given). Returns the settings and a note on the data."""
    note = ""
    if not s.benchmark and (s.haystack or s.qa_files):  # RULER's data files: a RULER run
        s = replace(s, benchmark="ruler")
    if s.benchmark != "ruler":
        data_dir, note = LB.find_or_download(str(s.data_dir) if s.data_dir else None, PROJECT)
        if data_dir is None and s.benchmark == "longbench":
            raise ValueError(f"no LongBench folder: {note}")
        s = replace(s, benchmark="longbench" if data_dir else "ruler", data_dir=data_dir)
    if s.benchmark == "ruler" and s.tasks:  # only the files the chosen tasks read (they identify the data)
        s = replace(s, haystack=s.haystack if set(s.tasks) & set(R.ESSAY_TASKS) else None,
                    qa_files=tuple((t, f) for t, f in s.qa_files if t in s.tasks))
    given = load_given_plans(s, model_dir, cfg)
    methods = s.methods or tuple(dict.fromkeys([m for m in K.DEFAULT_METHODS if m not in K.PLAN_METHODS or not given]
                                               + [p.name for p in given]))
    budgets = s.budgets or tuple(sorted({int(p.average_budget) for p in given})) or (K.DEFAULT_BUDGET,)
    limit = s.limit if s.limit >= 0 else QUICK[s.benchmark] if s.quick or s.benchmark == "ruler" else 0
    if s.benchmark == "ruler" and limit == 0:
        raise ValueError("--limit 0 (all) has no meaning for RULER, whose samples are generated: give a number per task")
    s = replace(s, methods=methods, budgets=budgets, limit=limit, max_length=s.max_length or MAX_LENGTH[s.benchmark])
    longest = s.max_length if s.benchmark == "ruler" else s.max_length + 512 + TF_TOKENS  # 512: the longest generation
    if longest > cfg.max_seq_len:
        raise ValueError(f"--max-length {s.max_length}: prompt + generation would exceed the model's context window "
                         f"({cfg.max_seq_len} tokens)")
    return s, note


def default_out(s: RunSettings, model_dir: Path) -> Path:
    """results/<model>/<benchmark>_maxlen<L>_limit<N>[_agnostic]; a run of chosen --ids gets a folder of its
    own (named by them), so it never rewrites the report of the run whose samples it picks from."""
    chosen = f"ids-{hashlib.sha256(' '.join(sorted(s.ids)).encode()).hexdigest()[:8]}" if s.ids else \
        f"limit{s.limit or 'all'}"
    return PROJECT / "results" / CK.model_name(model_dir) / (
        f"{s.benchmark}_maxlen{s.max_length}_{chosen}" + ("_agnostic" if s.query == "agnostic" else ""))


def haystacks(samples: list[dict]) -> list[str]:
    """What RULER's samples were built from (noise, needles, words, a named prose or QA file)."""
    return sorted({x["haystack"] for x in samples if x.get("haystack")})


def announce(s: RunSettings, samples: list, runs: list, n_excluded: int, note: str, out: Path) -> None:
    """The run's first line: which mode, what data, how much work (and why, if the data changed)."""
    if s.quick:
        skipped = quick_skipped(s)
        mode = (f"quick default run ({s.limit} per task" + (f", skipping {', '.join(skipped)}: over {QUICK_MAX_NEW} "
                f"new tokens each" if skipped else "") + "; --limit, --tasks or --ids choose the scale)")
    else:
        mode = "chosen ids" if s.ids else f"{s.limit or 'all'} per task"
    length = f"prompts cut to {s.max_length} tokens" if s.benchmark == "longbench" else \
        f"{s.max_length}-token prompts, haystacks: {', '.join(haystacks(samples))}"
    print(f"{s.benchmark}, query-{s.query}, {mode}, {length}: {len(samples)} samples ({n_excluded} calibration samples "
          f"excluded) x {len(runs)} method-budget runs -> {out}" + (f"\n{note}" if note else ""), flush=True)


def main(argv=None) -> int:
    s = parse_settings(argv)
    rank = 0
    try:
        s = replace(s, device=RF.init_distributed(s.device))
        rank = RF.rank_world()[0]
        model_dir = CK.resolve_model_dir(s.model)
        cfg, tokenizer = CK.load_config(model_dir), CK.load_tokenizer(model_dir)
        CK.check_tokenizer(cfg, tokenizer, model_dir)
        s, note = complete(s, model_dir, cfg)
        plans, excluded, every_plan = choose_plans(s, model_dir, cfg)  # a missing plan fails before any sample is read
        runs = build_runs(s, plans, cfg.n_layers)
        samples, n_excluded = select_samples(s, load_benchmark(s, tokenizer), excluded)
        out = s.out or default_out(s, model_dir)
        config = run_config(s, model_dir, runs)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            RF.take_lock(out)
            RF.check_run_config(out, config)
        model = CK.load_model(model_dir, s.device, getattr(torch, s.dtype))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        announce(s, samples, runs, n_excluded, note, out)
    RF.barrier()  # run.json is written
    run_samples(model, tokenizer, model_dir, samples, runs, s, out)
    RF.barrier()
    if rank == 0:
        header = {"benchmark": s.benchmark, "query": s.query, "model": config["model"], "data": config["data_id"],
                  "tf_tokens": TF_TOKENS,
                  "max_length": s.max_length, "dtype": s.dtype, "settings": config["settings"],
                  "excluded_calibration_samples": n_excluded, "fuzzy_backend": LM.FUZZ_BACKEND,
                  "limit": "chosen ids" if s.ids else f"{s.limit} per task" if s.limit else "all",
                  **({"haystacks": haystacks(samples)} if s.benchmark == "ruler" else {})}
        metrics = report.write_report(out, samples, runs_on_record(s, every_plan, cfg.n_layers, samples, out), header,
                                      (R if s.benchmark == "ruler" else LM).sample_scores)
        print(report.markdown(metrics) + f"wrote {out}/metrics.json, results.md, scores.png, predictions.jsonl")
    if RF.dist_on():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
