"""
The command line of longbench_eval.py: what one evaluation run is asked (RunSettings), every flag
checked before anything slow; argparse exits with 2 naming the flag. What the command line leaves
open (benchmark, length, limit, methods, budgets) longbench_eval.complete fills in.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import policies as P
import polykv as K
import ruler as R

QUICK = {"longbench": 1, "ruler": 3}  # the quick default's samples per task: ~15 min on a 2-core CPU
QUICK_MAX_NEW = 128  # the quick default skips LongBench's 512-token summaries (3x the rest's decoding)
MAX_LENGTH = {"longbench": 2048, "ruler": 4096}  # LongBench: middle truncation; RULER: prompt + generation


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
    p.add_argument("--query", choices=("aware", "agnostic"), default="aware",
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
