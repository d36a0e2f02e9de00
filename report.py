"""
Reports: what the calibration and the evaluation measured, as tables and figures.

- calibration: `calibration_table` (the plans under plans/<model>, read back from their JSON) and
  `plot_plan` (one plan's budgets and policies per layer);
- evaluation: metrics from a run's records (task scores, fidelity to FullKV, gap recovery,
  bootstrap intervals), results.md and scores.png.
Nothing here runs a model: every figure is recomputed from what the runs wrote.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import policies as P
import polykv as K
from run_folder import atomic_write, plan_fingerprint, read_records, run_key

BOOTSTRAP_RESAMPLES = 2000

# ----------------------------------------------------------------------------- calibration


BASELINE_OF = {"polykv_routing": "uniform", "polykv_allocation": "uniform", "polykv": "polykv_allocation"}  # the targets


def paired_validation(plans: dict, name: str) -> str:
    """The plan's validation KL minus its comparison's (routing or allocation alone: the best uniform
    policy; PolyKV: allocation alone), paired over the validation samples, with a 95% interval."""
    cal, other = plans[name].info["calibration"], BASELINE_OF.get(name)
    mine = cal.get("validation_kls")
    theirs = cal.get("best_uniform_validation_kls") if other == "uniform" else \
        plans[other].info["calibration"].get("validation_kls") if other in plans else None
    if not mine or not theirs:
        return "–"
    return f"{other}: " + interval(bootstrap_difference({"all": mine}, {"all": theirs}), 4)


def calibration_table(plan_dir: Path) -> str:
    """A markdown table of every calibrated budget under plan_dir, read back from the plan JSONs."""
    rows = ["| budget | plan | routing (layers per policy) | budgets | in-sample KL | validation KL | "
            "validation KL minus (paired, 95%) |", "|---" * 7 + "|"]
    for budget in K.budget_dirs(plan_dir):
        plans = {n: K.load_plan(path) for n in K.PLAN_METHODS if (path := K.plan_path(plan_dir, budget, n)).is_file()}
        if not plans:
            continue
        first = next(iter(plans.values()))
        recorded = K.calibration_settings(first.info) or {}
        fitted = recorded.get("span", 1)
        span = (f", span {first.settings.span}" if first.settings.span > 1 else "") + (f" (fitted at {fitted})" if fitted > 1 else "")
        span += ", routes confirmed" if recorded.get("confirm_routing") else ""
        span += ", KL of each sample's worst token" if recorded.get("token_kl") == "max" else ""  # not a mean's scale
        among = recorded.get("candidates", list(K.CANDIDATES))
        span += f", among {' '.join(among)}" if among != list(K.CANDIDATES) else ""  # e.g. made before KeyDiff
        cal = first.info["calibration"]
        rows.append(f"| {budget}{span} | uniform {cal['best_uniform']} | all {cal['best_uniform']} | {budget} everywhere | "
                    f"{cal['best_uniform_in_sample_kl']:.4f} | {cal['best_uniform_validation_kl']:.4f} | |")
        for name, plan in plans.items():
            routing = ", ".join(f"{plan.policies.count(p)} {p}" for p in P.SCORERS if p in plan.policies)
            split = sum("/" in p for p in plan.policies)
            routing += f", {split} split by KV head" if split else ""
            c = plan.info["calibration"]
            rows.append(f"| | {name} | {routing} | {min(plan.budgets)} … {max(plan.budgets)} | "
                        f"{c['in_sample_kl']:.4f} | {c['validation_kl']:.4f} | {paired_validation(plans, name)} |")
    return "\n".join(rows)


def plot_plan(plan: K.Plan, sensitivity: list[float] | None, path: Path) -> None:
    """Per-layer budget bars coloured by policy (a head-routed layer: one thin bar per KV head),
    with the layer sensitivity (when the plan was allocated from it) on a second axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(P.SCORERS, plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(figsize=(10, 4))
    for layer, (policy, budget) in enumerate(zip(plan.policies, plan.budgets)):
        names = K.head_policies(policy)
        width = 0.8 / len(names)
        for head, name in enumerate(names):
            ax.bar(layer - 0.4 + width * (head + 0.5), budget, width=width, color=colours[name])
    ax.set(xlabel="layer", ylabel="budget (tokens per KV head)",
           title=f"{plan.name}: {plan.model}, average budget {plan.average_budget:.0f}")
    for p in sorted({name for policy in plan.policies for name in K.head_policies(policy)}):
        ax.bar(0, 0, color=colours[p], label=p)
    ax.legend(loc="upper left", fontsize=8)
    if sensitivity:
        ax2 = ax.twinx()
        ax2.plot(range(len(sensitivity)), sensitivity, "k.-", label="sensitivity (KL, only this layer compressed)")
        ax2.set(yscale="log", ylabel="layer sensitivity (KL)")
        ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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


def score_key(method: str, budget) -> str:
    """Where metrics.json keeps a method's scores: FullKV under "full" (it has no budget), others under the budget."""
    return "full" if method == "fullkv" else str(budget)


def compute_metrics(records: dict, samples: list, runs: list, header: dict, sample_scores) -> dict:
    """Task scores, fidelity, gap recovery and bootstrap intervals of every run on these samples.
    sample_scores(task, predictions, answers_list, all_classes) is the benchmark's scorer."""
    tasks = list(dict.fromkeys(s["dataset"] for s in samples))
    fingerprints = {(m, b): plan_fingerprint(p) for m, b, p in runs}
    rec = lambda s, m, b: records[run_key(s["_id"], m, b, fingerprints[(m, b)])]  # noqa: E731
    full_tokens = [rec(s, "fullkv", None)["tokens"] for s in samples]
    scores, fid, per_sample, tf_kl = {}, {}, {}, {}
    by_task = {t: [s for s in samples if s["dataset"] == t] for t in tasks}
    for method, budget, _ in runs:
        key = score_key(method, budget)
        per_sample[method, key] = {t: sample_scores(t, [rec(s, method, budget)["prediction"] for s in ss],
                                                    [s["answers"] for s in ss], ss[0]["all_classes"])
                                   for t, ss in by_task.items()}
        tf_kl[method, key] = [rec(s, method, budget).get("tf_kl") for s in samples]
        per_task = {t: sum(v) / len(v) for t, v in per_sample[method, key].items()}
        scores.setdefault(method, {})[key] = {"tasks": per_task, "average": sum(per_task.values()) / len(tasks)}
        fid.setdefault(method, {})[key] = fidelity([rec(s, method, budget) for s in samples], full_tokens)
    prefills = {s["_id"]: rec(s, "fullkv", None)["prefill_seconds"] for s in samples}
    return {**header, "tasks": tasks, "n_samples": len(samples), "scores": scores, "fidelity": fid,
            # per task, in sample_ids' order: two runs on the same samples can be paired (bootstrap_difference)
            "sample_ids": {t: [s["_id"] for s in ss] for t, ss in by_task.items()},
            "per_sample_scores": {m: {k: per_sample[m, k] for k in per} for m, per in scores.items()},
            "gap_recovery": gap_recovery(scores, fid, runs),
            "score_differences": score_differences(scores, fid, per_sample, tf_kl),
            "timing": {"prefill_seconds": sum(prefills.values()), "runs_per_prefill": len(runs),
                       "prefill_seconds_saved": sum(prefills.values()) * (len(runs) - 1),
                       "run_seconds": sum(rec(s, m, b)["seconds"] for s in samples for m, b, _ in runs)}}


def best_baselines(scores: dict, fid: dict, b: str) -> dict | None:
    """Which baseline is best at budget b on each measure: highest average score, prefix agreement
    and teacher-forced agreement; lowest teacher-forced KL. None when no baseline ran at b."""
    base = [m for m in K.BASELINES if b in scores.get(m, {})]
    if not base:
        return None
    measure = lambda key: {m: fid[m][b][key] for m in base if fid[m][b][key] is not None}  # noqa: E731
    agree, kl = measure("tf_agreement"), measure("tf_kl")
    return {"score": best_by_score({m: scores[m][b]["average"] for m in base}),
            "prefix": max(base, key=lambda m: fid[m][b]["prefix_agreement"]),
            "tf_agreement": max(agree, key=agree.get, default=None), "tf_kl": min(kl, key=kl.get, default=None)}


def best_by_score(averages: dict) -> str | None:
    """The baseline with the highest average score ({method: average}; ties go to the first in
    K.BASELINES); None when no baseline is among them."""
    base = [m for m in K.BASELINES if m in averages]
    return max(base, key=averages.get) if base else None


def recovery(method: float | None, best: float | None, full: float) -> float | None:
    """(method - best) / (full - best): the share of the best baseline's gap to FullKV that the method
    closes; only defined when FullKV beats the best baseline (with too few samples it may not)."""
    return None if method is None or best is None or full <= best else (method - best) / (full - best)


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
        for m in [m for m in scores if K.is_plan_method(m)]:
            if b in scores[m]:
                p, pf, pt, pk = (scores[m][b]["average"], fid[m][b]["prefix_agreement"], fid[m][b]["tf_agreement"],
                                 fid[m][b]["tf_kl"])
                out.setdefault(b, {})[m] = {
                    "score": recovery(p, base, full),
                    "best_baseline": best["score"], "best_baseline_average": base, "fullkv_average": full,
                    "baselines_compared": sorted(m for m in K.BASELINES if b in scores.get(m, {})),
                    "fidelity": recovery(pf, base_f, 1),
                    "best_baseline_fidelity": best["prefix"],
                    "tf_agreement": recovery(pt, base_t, 1),
                    "best_baseline_tf_agreement": best["tf_agreement"],
                    # FullKV's KL to itself is 0: the share of the best baseline's KL that is removed
                    "tf_kl": (base_k - pk) / base_k if base_k is not None and pk is not None and base_k > 0 else None,
                    "best_baseline_tf_kl": best["tf_kl"]}
    return out


def resampled_averages(groups: list[dict], n: int, seed: int) -> torch.Tensor:
    """(len(groups), n): each group's average over tasks of its per-task mean score, in n bootstrap
    draws that redraw the samples within each task, the same draws for every group (paired)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.zeros(len(groups), n, dtype=torch.float64)
    for task in groups[0]:
        scores = torch.tensor([group[task] for group in groups], dtype=torch.float64)  # (groups, S)
        draws = torch.randint(0, scores.shape[1], (n, scores.shape[1]), generator=g)  # (n, S)
        means += scores[:, draws].mean(-1) / len(groups[0])
    return means


def average(scores: dict) -> float:
    """The average over tasks of the per-task mean (LongBench's average)."""
    return sum(sum(x) / len(x) for x in scores.values()) / len(scores)


def bootstrap_difference(a: dict, b: dict, n: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[float]:
    """[difference, low, high]: the average of a minus that of b (per-sample scores by task) with a 95%
    paired bootstrap interval, so the interval shows how much of a difference the sample choice alone
    can make."""
    means = resampled_averages([a, b], n, seed)
    low, high = torch.quantile(means[0] - means[1], torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [average(a) - average(b), low, high]


def bootstrap_gap_recovery(method: dict, best: dict, full: dict, n: int = BOOTSTRAP_RESAMPLES,
                           seed: int = 0) -> list[float | None]:
    """[recovery, low, high]: (method - best) / (FullKV - best) of the averages (per-sample scores by
    task), with the 95% interval of the same paired bootstrap. Draws where FullKV does not beat the
    best baseline have no recovery: if over 2.5% do, both ends are open (None)."""
    means = resampled_averages([method, best, full], n, seed)
    gap = means[2] - means[1]
    share = torch.where(gap > 0, (means[0] - means[1]) / gap, torch.tensor(float("nan"), dtype=torch.float64))
    low, high = share.nan_to_num(float("-inf")).quantile(0.025).item(), share.nan_to_num(float("inf")).quantile(0.975).item()
    return [recovery(average(method), average(best), average(full)),
            low if low > float("-inf") else None, high if high < float("inf") else None]


def score_differences(scores: dict, fid: dict, per_sample: dict, tf_kl: dict) -> dict:
    """Per budget, per PolyKV variant: its score minus the best baseline's and minus FullKV's, and its
    teacher-forced KL minus the lowest baseline KL, with bootstrap intervals (noise or a real gap?).
    Also FullKV's score minus the best baseline's: the gap itself."""
    def paired_kl(a: list, b: list) -> tuple[list | None, list | None]:  # samples with a KL for both (FullKV said >= 2 tokens)
        pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
        if not pairs:
            return None, None
        mine, best = {"all": [x for x, _ in pairs]}, {"all": [y for _, y in pairs]}
        negated = lambda d: {"all": [-x for x in d["all"]]}  # noqa: E731 (gap recovery: higher is better; FullKV's KL is 0)
        return bootstrap_difference(mine, best), bootstrap_gap_recovery(negated(mine), negated(best), {"all": [0.0] * len(pairs)})
    out = {}
    for b in sorted({k for per in scores.values() for k in per if k != "full"}, key=int):
        found = best_baselines(scores, fid, b)
        if found is None:
            continue
        best, best_kl = found["score"], found["tf_kl"]
        out[b] = {"best_baseline": best, "best_baseline_tf_kl": best_kl,
                  "fullkv_minus_best": bootstrap_difference(per_sample["fullkv", "full"], per_sample[best, b])}
        for m in [m for m in scores if K.is_plan_method(m)]:
            if (m, b) in per_sample:
                kl_minus_best, kl_recovery = paired_kl(tf_kl[m, b], tf_kl[best_kl, b]) if best_kl else (None, None)
                out[b][m] = {"minus_best": bootstrap_difference(per_sample[m, b], per_sample[best, b]),
                             "gap_recovery": bootstrap_gap_recovery(per_sample[m, b], per_sample[best, b],
                                                                    per_sample["fullkv", "full"]),
                             "minus_fullkv": bootstrap_difference(per_sample[m, b], per_sample["fullkv", "full"]),
                             "tf_kl_minus_best": kl_minus_best, "tf_kl_gap_recovery": kl_recovery}
    return out


# ----------------------------------------------------------------------------- results.md and scores.png


def fmt(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def interval(d: list[float], digits: int = 2) -> str:
    return f"{d[0]:+.{digits}f} [{d[1]:+.{digits}f}, {d[2]:+.{digits}f}]"


def pct_interval(g: list | None) -> str:
    """A gap recovery [share, low, high] as percentages; "–" where there is none (open ends: "–" too)."""
    return "–" if g is None or g[0] is None else f"{pct(g[0])} [{pct(g[1])}, {pct(g[2])}]"


def table(first: str, columns: list, rows: list[list[str]]) -> list[str]:
    """A markdown table: a header row, its rule, then the rows."""
    return ([f"| {first} | " + " | ".join(map(str, columns)) + " |", "|---" * (len(columns) + 1) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows])


def summary_tables(metrics: dict, budgets: list[int]) -> list[str]:
    """One column per budget: scores and agreement, gap recovery, bootstrap differences, KL."""
    scores, fid, gaps, diffs = metrics["scores"], metrics["fidelity"], metrics["gap_recovery"], metrics.get("score_differences", {})
    cell = lambda m, k: (f"{scores[m][k]['average']:.2f} / {fid[m][k]['prefix_agreement']:.2f} / "  # noqa: E731
                         f"{fmt(fid[m][k]['tf_agreement'])}" if k in scores[m] else "–")
    rows = [[m] + [cell(m, score_key(m, b)) for b in budgets] for m in scores]
    for name in [m for m in scores if K.is_plan_method(m)]:
        found = [gaps.get(str(b), {}).get(name) for b in budgets]
        if any(found):
            rows.append([f"{name} gap recovery: score / prefix / tf agree / tf KL"] + [
                " / ".join(pct(g.get(k)) if g else "–" for k in ("score", "fidelity", "tf_agreement", "tf_kl")) for g in found])
    lines = ["\n### Summary: average score / prefix agreement / teacher-forced agreement with FullKV\n"]
    lines += table("method", budgets, rows)
    at = lambda b: diffs.get(str(b), {})  # noqa: E731
    rows = [["best baseline"] + [at(b).get("best_baseline", "–") for b in budgets],
            ["fullkv"] + [interval(at(b)["fullkv_minus_best"]) if at(b) else "–" for b in budgets]]
    rows += [[n] + [interval(at(b)[n]["minus_best"]) if n in at(b) else "–" for b in budgets]
             for n in scores if K.is_plan_method(n) and any(n in at(b) for b in budgets)]
    lines += [f"\n### Summary: average score minus the best baseline's (points), 95% paired bootstrap interval "
              f"over samples ({BOOTSTRAP_RESAMPLES} resamples within tasks)\n"] + table("method", budgets, rows)
    rows = [[n] + [pct_interval(at(b).get(n, {}).get("gap_recovery")) for b in budgets]
            for n in scores if K.is_plan_method(n) and any(at(b).get(n, {}).get("gap_recovery") for b in budgets)]
    if rows:
        lines += ["\nScore gap recovery, (method - best baseline) / (FullKV - best baseline), same bootstrap "
                  "(– where FullKV does not beat the best baseline; open ends where it fails to in over 2.5% of draws):\n"]
        lines += table("method", budgets, rows)
    rows = [["lowest-KL baseline"] + [str(at(b).get("best_baseline_tf_kl", "–")) for b in budgets]]
    for n in [m for m in scores if K.is_plan_method(m)]:
        cells = [(at(b).get(n, {}).get("tf_kl_minus_best"), at(b).get(n, {}).get("tf_kl_gap_recovery")) for b in budgets]
        if any(d for d, _ in cells):
            rows.append([n] + ["–" if d is None else f"{interval(d, 4)}; {pct_interval(g)}" for d, g in cells])
    lines += ["\nTeacher-forced KL minus the lowest baseline KL; the share of that baseline's KL removed (KL gap "
              "recovery: FullKV's KL is 0), same bootstrap over samples:\n"]
    lines += table("method", budgets, rows)
    rows = [[m] + [fmt(per.get(str(b), {}).get("tf_kl"), 4) for b in budgets] for m, per in fid.items() if m != "fullkv"]
    return lines + ["\n### Summary: teacher-forced KL(FullKV || method), lower is better\n"] + table("method", budgets, rows)


def budget_table(metrics: dict, b: int) -> list[str]:
    """Every method at one budget: per-task scores, the average, and agreement with FullKV."""
    tasks, rows = metrics["tasks"], []
    for m, per in metrics["scores"].items():
        key = score_key(m, b)
        if key in per:
            s, f = per[key], metrics["fidelity"][m][key]
            rows.append([m] + [f"{s['tasks'][t]:.1f}" for t in tasks] + [
                f"**{s['average']:.2f}**", f"{f['exact_match']:.2f}", f"{f['prefix_agreement']:.2f}",
                fmt(f["tf_agreement"]), fmt(f["tf_kl"], 4)])
    lines = [f"\n### Average budget {b} tokens per KV head per layer ({metrics['n_samples']} samples)\n"]
    lines += table("method", tasks + ["avg", "exact", "prefix", "tf agree", "tf KL"], rows)
    for m, g in metrics["gap_recovery"].get(str(b), {}).items():
        score = "n/a (FullKV does not beat the best baseline here)" if g["score"] is None else pct(g["score"])
        vs = lambda key: f" (vs {g[key]})" if g.get(key) else ""  # noqa: E731  (no baseline: a measure the run lacks)
        lines.append(f"\n{m}: gap recovery {score} of the gap to FullKV over the best baseline "
                     f"({g['best_baseline']}); on prefix agreement {pct(g['fidelity'])}{vs('best_baseline_fidelity')}; "
                     f"on teacher-forced agreement {pct(g.get('tf_agreement'))}{vs('best_baseline_tf_agreement')}; "
                     f"on teacher-forced KL {pct(g.get('tf_kl'))}{vs('best_baseline_tf_kl')}")
    return lines


def markdown(metrics: dict) -> str:
    length = (f"query-{metrics.get('query', 'aware')}, {metrics['max_length']} tokens of prompt + generation"
              + (f" (haystacks: {', '.join(metrics['haystacks'])})" if metrics.get("haystacks") else "")
              if metrics.get("benchmark") == "ruler" else f"prompts truncated to {metrics['max_length']} tokens")
    lines = [f"{metrics['model']} on {metrics['data']}: {metrics['n_samples']} samples, {length}, "
             f"{metrics['excluded_calibration_samples']} calibration samples excluded. "
             "exact / prefix: agreement of the generated tokens with FullKV's (exact match; common prefix share); "
             f"tf agree / tf KL: fed FullKV's output (first {metrics['tf_tokens']} tokens), share of next tokens predicted as "
             "FullKV does / mean KL(FullKV || method)."]
    if metrics.get("settings", {}).get("span", 1) > 1:  # a plan chose it: every method of the run keeps spans
        lines[0] += (f" Every policy's scores are max-pooled over {metrics['settings']['span']} neighbouring tokens "
                     "before selection (span), baselines included.")
    budgets = sorted({int(b) for m in metrics["scores"].values() for b in m if b != "full"})
    if not budgets:  # FullKV alone (e.g. checking which tasks a model can do at all)
        full = metrics["scores"]["fullkv"]["full"]
        lines += ["\n### FullKV\n"] + table("method", metrics["tasks"] + ["avg"], [
            ["fullkv"] + [f"{full['tasks'][t]:.1f}" for t in metrics["tasks"]] + [f"**{full['average']:.2f}**"]])
    if len(budgets) > 1:
        lines += summary_tables(metrics, budgets)
    for b in budgets:
        lines += budget_table(metrics, b)
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


def write_report(out: Path, samples: list, runs: list, header: dict, sample_scores) -> dict:
    """Merge the ranks' predictions, then metrics.json, results.md and scores.png."""
    records = read_records(out)
    atomic_write(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records.values()))
    for p in out.glob("predictions.rank*.jsonl"):
        p.unlink()
    metrics = compute_metrics(records, samples, runs, header, sample_scores)
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=1))
    atomic_write(out / "results.md", markdown(metrics))
    plot(metrics, out / "scores.png")
    return metrics
