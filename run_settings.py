"""
What one evaluation run of longbench_eval.py is: what it is asked (RunSettings and the command line,
every flag checked before anything slow; argparse exits with 2 naming the flag), and the runs it
makes of that: the PolyKV plans it needs (committed or --plan; a missing one is an error before
any sample is read) and the (method, budget, plan) triples every sample is evaluated with. What the
command line leaves open (benchmark, length, limit, methods, budgets) longbench_eval.complete fills in.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import checkpoint as CK
import model as M
import policies as P
import polykv as K
import ruler as R
import run_folder as RF

QUICK = {"longbench": 1, "ruler": 3}  # the quick default's samples per task: ~15 min on a 2-core CPU
QUICK_MAX_NEW = 128  # the quick default skips LongBench's 512-token summaries (3x the rest's decoding)
MAX_LENGTH = {"longbench": 2048, "ruler": 4096}  # LongBench: middle truncation; RULER: prompt + generation
QUERY_MODES = ("aware", "agnostic")  # aware: the question is compressed with the context; agnostic: prefilled after


@dataclass(frozen=True)
class RunSettings:
    """One run: what is evaluated, on what, and how (the command line, checked)."""
    benchmark: str  # "longbench" or "ruler"
    budgets: tuple[int, ...]
    methods: tuple[str, ...]
    max_length: int
    limit: int  # samples per task, 0 = all (LongBench), -1 = not given
    quick: bool  # no --limit/--tasks/--ids: LongBench's long-generation tasks are skipped
    query: str = "aware"  # "aware" or "agnostic"
    tasks: tuple[str, ...] = ()  # () = all
    ids: tuple[str, ...] = ()
    plans: tuple[str, ...] = ()  # --plan files or NAME=FILE (default: the committed plans)
    model: str | None = None
    data_dir: Path | None = None  # LongBench folder; None for RULER
    out: Path | None = None
    ruler_seed: int = 0
    haystack: Path | None = None  # RULER: prose for the essay tasks
    qa_files: tuple[tuple[str, Path], ...] = ()  # RULER: (task, dataset file) for qa_1 (SQuAD) / qa_2 (HotpotQA)
    batch: int = 16
    device: str = "cpu"
    dtype: str = "float32"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longbench_eval.py", description=(
        "Evaluation of KV-cache compression on LongBench or RULER: FullKV, every baseline and PolyKV, every "
        "budget, all served by ONE prefill per sample."), epilog=(
        f"Quick default: with none of --limit/--tasks/--ids, {QUICK['longbench']} LongBench sample per task (tasks that "
        f"generate over {QUICK_MAX_NEW} tokens skipped) or {QUICK['ruler']} RULER samples per task, ~15 min on a 2-core "
        "CPU; the run's first line says so. Data: --data-dir, $LONGBENCH_DIR or data/LongBench; with none, LongBench is "
        "downloaded there where there is a network, else RULER runs (generated, offline)."))
    p.add_argument("--budget", "--budgets", dest="budgets", type=int, nargs="+", default=None,
                   help=f"average budgets: tokens kept per KV head per layer (default {K.DEFAULT_BUDGET}; all from the same prefills)")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help=f"subset of: {', '.join(K.METHODS)}, and names given by --plan NAME=FILE (default: all but "
                   f"{K.POLYKV_HEADS})")
    p.add_argument("--plan", nargs="+", default=(), help="PolyKV plan JSON files, or NAME=FILE to run one under a "
                   "polykv* name of its own (default: the committed plans/)")
    p.add_argument("--model", help="checkpoint folder or cached Hugging Face model id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--benchmark", choices=("longbench", "ruler"), help="default: LongBench if found (or downloaded), else RULER")
    p.add_argument("--data-dir", help="LongBench folder (default: $LONGBENCH_DIR, then data/LongBench)")
    p.add_argument("--query", choices=QUERY_MODES, default="aware",
                   help="aware: compress the whole prompt; agnostic: compress the context, then prefill the question")
    p.add_argument("--tasks", nargs="+", default=(), help="subset of tasks (default: all)")
    p.add_argument("--ids", nargs="+", default=(), help="evaluate exactly these sample ids")
    p.add_argument("--limit", type=int, help=f"samples per task, 0 = all (default: the quick default; RULER: "
                   f"{QUICK['ruler']})")
    p.add_argument("--max-length", type=int, help=f"LongBench: middle-truncate prompts to this many tokens "
                   f"(default {MAX_LENGTH['longbench']}); RULER: prompt + generation tokens (default {MAX_LENGTH['ruler']})")
    p.add_argument("--haystack", type=Path, help="RULER: a prose file (text, or JSON {\"text\": ...}) for the essay tasks")
    p.add_argument("--squad", type=Path, help="RULER: SQuAD v2's dev JSON, for qa_1")
    p.add_argument("--hotpotqa", type=Path, help="RULER: HotpotQA's distractor dev JSON, for qa_2")
    p.add_argument("--ruler-seed", type=int, default=0, help=f"RULER samples' seed (below {R.CALIBRATION_SEED}, "
                   "the calibration's)")
    p.add_argument("--out", type=Path, help="output folder (default: results/<model>/<benchmark>_maxlen<L>_limit<N>[_agnostic]; a run of --ids: _ids-<hash> for _limit<N>)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=16, help="runs of one budget decoded together per sample (1 = one by one)")
    return p


def plan_spec(spec: str | Path) -> tuple[str, Path]:
    """--plan FILE or NAME=FILE -> (NAME or "", FILE). NAME is what precedes the first "=" if it is a
    name (no folder in it), so a FILE whose path holds "=" still reads as a file."""
    name, sep, path = str(spec).partition("=")
    return (name, Path(path)) if sep and "/" not in name and os.sep not in name else ("", Path(spec))


def parse_settings(argv=None) -> RunSettings:
    """The command line, each flag checked before anything slow (argparse exits with 2 on a bad one)."""
    p = build_parser()
    a = p.parse_args(argv)
    window = P.Settings().window
    bad = [b for b in a.budgets or [] if b < window]
    named = [name for name, _ in map(plan_spec, a.plan) if name]
    unknown = [m for m in a.methods or [] if m not in K.METHODS + tuple(named)]
    if unknown or not all(K.is_plan_method(n) for n in named):
        p.error(f"argument --methods: invalid choice: {', '.join(map(repr, unknown or named))} (choose from "
                f"{', '.join(K.METHODS)}, or polykv* names given by --plan NAME=FILE)")
    checks = [(bad, f"--budgets {bad[0] if bad else ''}: a budget must be at least the observation window ({window})"),
              (a.limit is not None and a.limit < 0, f"--limit must be >= 0 (0 = all), got {a.limit}"),
              (a.batch < 1, f"--batch must be at least 1, got {a.batch}"),
              (a.max_length is not None and a.max_length < 64, f"--max-length must be at least 64 tokens, got {a.max_length}"),
              (not 0 <= a.ruler_seed < R.CALIBRATION_SEED, f"--ruler-seed must be in [0, {R.CALIBRATION_SEED})"),
              (a.benchmark == "ruler" and a.data_dir, "--data-dir is LongBench's; RULER is generated")]
    checks += [(path is not None and not path.is_file(), f"--{flag} {path}: no such file")
               for flag, path in (("haystack", a.haystack), ("squad", a.squad), ("hotpotqa", a.hotpotqa))]
    checks += [(a.benchmark == "longbench" and (a.haystack or a.squad or a.hotpotqa), "--haystack, --squad and "
                "--hotpotqa are RULER's")]
    for failed, message in checks:
        if failed:
            p.error(message)
    quick = a.limit is None and not a.tasks and not a.ids
    return RunSettings(benchmark=a.benchmark or "", budgets=tuple(sorted(set(a.budgets or []))), methods=tuple(a.methods or ()),
                       max_length=a.max_length or 0, limit=a.limit if a.limit is not None else -1, quick=quick,
                       query=a.query, tasks=tuple(dict.fromkeys(a.tasks)), ids=tuple(a.ids), plans=tuple(a.plan),
                       model=a.model, data_dir=Path(a.data_dir) if a.data_dir else None, out=a.out,
                       ruler_seed=a.ruler_seed, haystack=a.haystack, batch=a.batch, device=a.device, dtype=a.dtype,
                       qa_files=tuple((t, f) for t in R.QA_TASKS if (f := {"squad": a.squad, "hotpotqa": a.hotpotqa}[
                           R.TASKS[t]["dataset"]])))


# ----------------------------------------------------------------------------- the runs: plans, and (method, budget, plan)


def load_given_plans(s: RunSettings, model_dir: Path, cfg: M.Config) -> list[K.Plan]:
    """--plan files, each checked for this model; NAME=FILE runs a plan under another polykv* name
    (e.g. polykv_ruler=plans/<model>/ruler/budget512/polykv.json beside the committed polykv)."""
    plans = []
    for spec in s.plans:
        name, path = plan_spec(spec)
        plan = K.load_model_plan(path, CK.model_name(model_dir), cfg)
        plan.name = name or plan.name
        plans.append(plan)
    return plans


def choose_plans(s: RunSettings, model_dir: Path, cfg: M.Config) -> tuple[dict, set[str], dict]:
    """({(name, budget): plan} for the requested PolyKV methods, ids no method may be scored on,
    every plan at hand: committed or given, at any budget).
    Plans come from --plan or the committed plans/; a missing one is an error naming the command
    that makes it: an evaluation never calibrates behind the user's back."""
    given = {(p.name, int(p.average_budget)): p for p in load_given_plans(s, model_dir, cfg)}
    committed = K.committed_plans(CK.model_name(model_dir), cfg)
    every = {**committed, **given}  # a --plan replaces the committed plan of its name and budget
    excluded = {i for p in list(committed.values()) + list(given.values())
                for i in p.info.get("calibration_ids", []) + p.info.get("validation_ids", [])}
    wanted = [(m, b) for m in s.methods if K.is_plan_method(m) for b in s.budgets]
    missing = [(m, b) for m, b in wanted if (m, b) not in every]
    if missing:  # the command that makes them, on the data, length, mode and tasks of this run
        have = ", ".join(sorted(f"{m}@{b}" for m, b in every)) or "none"
        data = f"--data-dir {s.data_dir}" if s.benchmark == "longbench" else "--benchmark ruler" + (
            f" --tasks {' '.join(s.tasks)}" if s.tasks else "")
        command = (f"python calibrate.py --model {model_dir} --budgets {' '.join(str(b) for b in sorted({b for _, b in missing}))} "
                   f"{data} --max-length {s.max_length}" + (" --query agnostic" if s.query == "agnostic" else ""))
        raise ValueError(f"no {', '.join(f'{m} plan for budget {b}' for m, b in missing)} (plans found: {have}). "
                         f"Make them with: {command}, or pass --plan FILE")
    for m, b in wanted:  # allowed (a transfer between modes is an experiment), but never silently
        mode = (K.calibration_settings(every[m, b].info) or {}).get("query", s.query)
        if mode != s.query:
            print(f"note: the {m} plan for budget {b} was calibrated query-{mode}; this run compresses query-{s.query}")
    return {k: every[k] for k in wanted}, excluded, every


def runs_on_record(s: RunSettings, every: dict, n_layers: int, samples: list[dict], out: Path) -> list[tuple]:
    """The runs the folder's tables cover: this run's methods at its budgets, and at every other
    budget where the folder already holds all their records (with the plans at hand, made with this
    run's policy settings), so rerunning one budget keeps the others in results.md. Nothing is recomputed."""
    records = RF.read_records(out)
    plan_methods = [m for m in s.methods if K.is_plan_method(m)]

    def runs_at(budgets: list[int]) -> list[tuple] | None:
        """build_runs at these budgets; None if a plan is missing or their policy settings differ."""
        if any((m, b) not in every for m in plan_methods for b in budgets):
            return None
        try:
            plans = {(m, b): every[m, b] for m in plan_methods for b in budgets}
            return build_runs(replace(s, budgets=budgets), plans, n_layers)
        except ValueError:
            return None

    def on_record(b: int) -> bool:
        runs = runs_at(sorted({*s.budgets, b}))  # with this run's budgets: the same settings as theirs
        return runs is not None and all(RF.run_key(x["_id"], m, run_budget, RF.plan_fingerprint(p)) in records
                                        for x in samples for m, run_budget, p in runs)  # FullKV: budget None

    recorded = {r["budget"] for r in records.values() if r["budget"] is not None} - set(s.budgets)
    return runs_at(sorted({*s.budgets, *filter(on_record, recorded)}))


def build_runs(s: RunSettings, plans: dict, n_layers: int) -> list[tuple]:
    """[(method, budget, plan)]: FullKV once (budget None, plan None), the rest per budget."""
    settings = next((p.settings for p in plans.values()), P.Settings())
    other = next((p for p in plans.values() if p.settings != settings), None)
    if other is not None:  # one run, one set of policy settings: its baselines and run.json take them
        field = next(f for f, v in asdict(other.settings).items() if asdict(settings)[f] != v)
        raise ValueError(f"the PolyKV plans were made with different policy settings ({field}: "
                         f"{getattr(settings, field)!r} vs {getattr(other.settings, field)!r} in plan {other.name}); "
                         "evaluate them in separate runs")
    runs = [("fullkv", None, None)]  # always: every other run is measured against it
    for b in s.budgets:
        for m in s.methods:
            if K.is_plan_method(m):
                runs.append((m, b, plans[m, b]))
            elif m != "fullkv":
                plan = K.baseline_plan(m, n_layers, b, settings)
                K.validate_plan(plan, n_layers, b, source=f"{m} at budget {b}")
                runs.append((m, b, plan))
    return runs


def policy_settings(runs: list[tuple]) -> P.Settings:
    """The policy settings every plan of a run shares (build_runs made sure of it)."""
    return next((p.settings for _, _, p in runs if p), P.Settings())
