"""
Paired comparison of methods across two result folders (each longbench_eval.py's metrics.json).

Runs made with other settings (a span, another plan) on the same samples are paired sample by
sample, as one run's own results.md pairs its methods: the average of method A in folder NEW minus
that of method B in folder OLD, with its 95% paired bootstrap interval, and the share of
FullKV's lead over B that A recovers (score gap recovery; FullKV from OLD).

    python compare.py NEW OLD --pairs polykv_span:best polykv_span:polykv knorm [--budget 512]

A pair "A:B" is method A of NEW against method B of OLD; a bare "m" is m:m (the same method in both
folders, e.g. a baseline with and without a setting); "best" on the B side is OLD's best published
baseline at the budget (highest average score). NEW and OLD may be the same folder. `--pool NEW2 OLD2`
(repeatable) joins the samples of further folder pairs, the same runs on other samples (another
RULER seed); "best" is then the best baseline on the joined samples:

    python compare.py FIT3 BASE3 --pool FIT4 BASE4 --pairs polykv:best
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import polykv as K
import report


def load_metrics(folder: Path) -> dict:
    path = folder / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.json (is {folder} a longbench_eval.py --out folder?)")
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if "per_sample_scores" not in metrics or "sample_ids" not in metrics:
        raise ValueError(f"{path} has no per-sample scores: rerun its longbench_eval.py command to rewrite it")
    return metrics


def scores(metrics: dict, folder: Path, method: str, budget: str) -> dict:
    """{task: [score per sample]} of one method at one budget (FullKV: at its full cache)."""
    by_budget = metrics["per_sample_scores"].get(method)
    if by_budget is None:
        raise ValueError(f"{folder}: no method {method!r}; it has {', '.join(metrics['per_sample_scores'])}")
    key = report.score_key(method, budget)
    if key not in by_budget:
        raise ValueError(f"{folder}: {method} has no budget {budget}; it has {', '.join(by_budget)}")
    return by_budget[key]


def pooled_scores(sets: list[tuple[Path, dict]], method: str, budget: str) -> dict:
    """{task: scores} of one method joined over several folders holding different samples."""
    joined = {}
    for folder, metrics in sets:
        for task, values in scores(metrics, folder, method, budget).items():
            joined.setdefault(task, []).extend(values)
    return joined


SAME_EXPERIMENT = ("model", "benchmark", "query", "max_length", "dtype", "settings")  # what pooled folders share


def check_same_experiment(folder: Path, metrics: dict, first: Path, first_metrics: dict) -> None:
    if changed := [f"{k} {metrics.get(k)} ({first}: {first_metrics.get(k)})" for k in SAME_EXPERIMENT
                   if metrics.get(k) != first_metrics.get(k)]:
        raise ValueError(f"{folder} is another experiment than {first}: {', '.join(changed)}; it cannot be pooled")


def check_pairable(sets: list[tuple[Path, dict, Path, dict]]) -> None:
    """Each NEW/OLD pair holds the same samples; pooled pairs are the same experiment (model,
    settings, tasks) on other samples, none of them twice."""
    (first_new, first_a, first_old, first_b), owner = sets[0], {}
    for new, a_metrics, old, b_metrics in sets:
        if a_metrics["sample_ids"] != b_metrics["sample_ids"]:
            raise ValueError(f"{new} and {old} hold different samples: their scores cannot be paired")
        check_same_experiment(new, a_metrics, first_new, first_a)
        check_same_experiment(old, b_metrics, first_old, first_b)
        if set(a_metrics["sample_ids"]) != set(first_a["sample_ids"]):
            raise ValueError(f"{new} holds other tasks than {first_new}: their samples cannot be pooled")
        for i in (i for task_ids in a_metrics["sample_ids"].values() for i in task_ids):
            if owner.setdefault(i, new) != new:
                raise ValueError(f"{new} repeats samples of {owner[i]} (e.g. {i}): pooled folders need other samples")


def best_baseline(olds: list[tuple[Path, dict]], budget: str) -> str:
    """The published baseline with the highest average on the OLD folders' joined samples (the rule
    of report.best_baselines). Every OLD folder must have run the same baselines at the budget, or
    the choice would depend on which folder lacks one."""
    ran = [[m for m in K.BASELINES if budget in metrics["per_sample_scores"].get(m, {})] for _, metrics in olds]
    for (folder, _), names in zip(olds, ran):
        if names != ran[0]:
            raise ValueError(f"{folder} ran the baselines {', '.join(names) or 'none'} at budget {budget}, "
                             f"{olds[0][0]} ran {', '.join(ran[0]) or 'none'}: the best of them cannot be pooled")
    best = report.best_by_score({m: report.average(pooled_scores(olds, m, budget)) for m in ran[0]})
    if best is None:
        raise ValueError(f"{olds[0][0]}: no best baseline at budget {budget}")
    return best


def pair_line(a_name: str, a: dict, b_name: str, base: dict, full: dict) -> str:
    """A's average, B's, A minus B [paired interval], and A's score gap recovery over B (each a {task: scores})."""
    return (f"{a_name} {report.average(a):.1f} minus {b_name} {report.average(base):.1f}: "
            f"{report.interval(report.bootstrap_difference(a, base), 1)}, score gap recovery "
            f"{report.pct_interval(report.bootstrap_gap_recovery(a, base, full))}")


def compare(new: Path, old: Path, pairs: list[str], budget: int, pool: list[tuple[Path, Path]] = ()) -> list[str]:
    """One line per pair: A's average, B's, A minus B [interval], and A's score gap recovery over B.
    pool: further (NEW, OLD) folder pairs on other samples (another seed); each task's samples of all
    pairs are joined, in the same order on both sides, before averaging and resampling."""
    sets = [(n, load_metrics(n), o, load_metrics(o)) for n, o in [(new, old), *pool]]
    check_pairable(sets)
    news, olds = [(n, a) for n, a, _, _ in sets], [(o, b) for _, _, o, b in sets]
    b = str(budget)
    full = pooled_scores(olds, "fullkv", b)
    lines = []
    for pair in pairs:
        a_name, _, b_name = pair.partition(":")
        b_name = b_name or a_name
        if b_name == "best":
            b_name = best_baseline(olds, b)
        lines.append(pair_line(a_name, pooled_scores(news, a_name, b), b_name, pooled_scores(olds, b_name, b), full))
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Paired comparison of methods across two longbench_eval.py folders.")
    p.add_argument("new", type=Path, help="folder of the A side")
    p.add_argument("old", type=Path, help="folder of the B side (and of FullKV)")
    p.add_argument("--pairs", nargs="+", required=True, help="A:B (A of NEW minus B of OLD), m (= m:m); B may be 'best'")
    p.add_argument("--budget", type=int, default=K.DEFAULT_BUDGET)
    p.add_argument("--pool", nargs=2, type=Path, action="append", default=[], metavar=("NEW", "OLD"),
                   help="a further pair of folders on other samples (e.g. another --ruler-seed), pooled with the first")
    args = p.parse_args(argv)
    lines = compare(args.new, args.old, args.pairs, args.budget, args.pool)
    pooled = "".join(f" + {n} minus {o}" for n, o in args.pool)
    print(f"{args.new} minus {args.old}{pooled}, budget {args.budget}, paired by sample:", *lines, sep="\n")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
