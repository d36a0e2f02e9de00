"""
Experiments on the calibration: does what it learns hold on samples it never saw?

    python calibration_study.py --budgets 128 512 --sizes 16 32 64 128 --data-dir DIR --out FOLDER
    python calibration_study.py --head-routing --budgets 128 --data-dir DIR   # the per-KV-head lever

- Learning curve: for n calibration samples (nested draws from longbench.calibration_pool), the
  paper's calibration in both orders (routing first, allocation first) and the search on top of
  it (search.search), each plan scored on one fixed validation set, next to the best uniform
  policy chosen on the same n samples.
- Leave one family out (--family): PolyKV calibrated with and without a task family's samples,
  both scored on held-out samples of that family: how much of the in-family gain survives.
- TOVA's head aggregation: uniform TOVA within each KV head's query group (this project's
  default) vs over all query heads (as published), on the validation set.
Every plan goes to plans.jsonl and every validation KL to validation.jsonl as it is made, so an
interrupted run resumes; `study_tables` turns them into RESULTS.md's tables and plot.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import calibrate as C
import objective as O
import search as S
import longbench as LB
import checkpoint as CK
import polykv as K
import policies as P
import report

# The study's policy settings, one for every row so its points stay comparable: TOVA within each
# KV head's group, the default when the study began (the study itself then measured "all" better).
SETTINGS = P.Settings(tova_agg="mean")
FAMILIES = {"code": ("lcc", "repobench-p"), "single-doc QA": ("narrativeqa", "qasper", "multifieldqa_en")}


def read_rows(path: Path) -> dict[str, dict]:
    rows = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
            rows[row["key"]] = row
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a torn last line: that row is redone
    return rows


def append_row(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def sample_sets(data_dir: Path, sizes: list[int], n_validation: int, family: str | None, n_family: int, seed: int):
    """(validation, calibration draws by name) where the draws are nested and never touch validation."""
    pool = LB.calibration_pool(LB.load_samples(data_dir))
    validation = LB.draw(pool, n_validation, seed)
    rest = LB.without(pool, validation)
    draws = {f"n{n}": LB.draw(rest, n, seed) for n in sizes}
    held_out = []
    if family:
        tasks = FAMILIES[family]
        draws["in-family"] = LB.draw(rest, n_family, seed)
        draws["out-of-family"] = LB.draw({t: s for t, s in rest.items() if t not in tasks}, n_family, seed)
        used = {s["_id"] for s in draws["in-family"]}
        held_out = [s for t in tasks for s in rest.get(t, []) if s["_id"] not in used]  # family samples no plan saw
        held_out += [s for s in validation if s["dataset"] in tasks]
    return validation, dict(sorted(draws.items(), key=lambda kv: len(kv[1]))), held_out  # the cheapest draws first


def arms(draw_name: str, extra_sizes: set[int]) -> list[str]:
    """The calibrations a draw gets: the paper's method (routing first) on every draw; the other order
    and the search on top of it only for `extra_sizes` (their cost grows with n)."""
    if draw_name.startswith("n") and int(draw_name[1:]) in extra_sizes:
        return ["route-allocate", "allocate-route", "refined"]
    return ["route-allocate"]


def expected_keys(draws: dict, budgets: list[int], extra_sizes: set[int]) -> list[str]:
    return [f"{b}/{d}/{a}" for d in draws for b in budgets for a in arms(d, extra_sizes)]


def make_plans(model, refs_by_id: dict, draws: dict, budgets: list[int], cs: C.CalibrationSettings,
               extra_sizes: set[int], rows: dict, out: Path) -> None:
    """Every plan of the study, written as it is made (plans.jsonl); rows already there are kept."""
    settings, n = SETTINGS, model.cfg.n_layers
    for draw_name, samples in draws.items():  # smallest draws first: a partial run covers every budget
        for budget in budgets:
            refs = [refs_by_id[s["_id"]] for s in samples]
            for arm in arms(draw_name, extra_sizes):
                key = f"{budget}/{draw_name}/{arm}"
                if key in rows:
                    continue
                t0 = time.perf_counter()
                # the search starts from the routing-first plan, as it did for the first rows
                arm_cs = replace(cs, refine=True, order="route-allocate") if arm == "refined" else replace(cs, order=arm)
                plans, _ = C.calibrate_budget(model, refs, [], budget, arm_cs, settings)  # no --spans here: span 1
                table = next(iter(plans.values()))["calibration"]
                plans["uniform"] = {"policies": [table["best_uniform"]] * n, "budgets": [budget] * n,
                                    "calibration": {"in_sample_kl": table["best_uniform_in_sample_kl"]}}
                row = {"key": key, "budget": budget, "draw": draw_name, "n": len(samples), "arm": arm, "tova_agg": settings.tova_agg,
                       "seconds": time.perf_counter() - t0, "calibration_ids": [s["_id"] for s in samples],
                       "plans": {name: {k: p[k] for k in ("policies", "budgets")} | {"in_sample_kl": p["calibration"]["in_sample_kl"]}
                                 for name, p in plans.items()}}
                append_row(out / "plans.jsonl", row)
                rows[key] = row
                print(f"[{key}] {time.perf_counter() - t0:.0f} s: " + ", ".join(
                    f"{name} {p['in_sample_kl']:.4f}" for name, p in row["plans"].items()), flush=True)


def add_tova_rows(n_layers: int, budgets: list[int], rows: dict, out: Path) -> None:
    """Uniform TOVA with each head aggregation (nothing to calibrate: scored on validation only)."""
    for budget, agg in [(b, a) for b in budgets for a in ("mean", "all")]:
        key = f"{budget}/tova_agg/{agg}"
        if key not in rows:
            rows[key] = {"key": key, "budget": budget, "draw": "tova_agg", "arm": agg, "tova_agg": agg,
                         "plans": {"tova": {"policies": ["tova"] * n_layers, "budgets": [budget] * n_layers}}}
            append_row(out / "plans.jsonl", rows[key])


def validate(model, val_refs: list, rows: dict, done: dict, out: Path) -> None:
    """Each plan's KL on each validation reference it was not calibrated on (validation.jsonl)."""
    for row in rows.values():
        settings = replace(SETTINGS, tova_agg=row.get("tova_agg", SETTINGS.tova_agg))
        done.update(read_rows(out / "validation.jsonl"))  # another process may have scored some meanwhile
        for name, p in row["plans"].items():
            key = f"{row['key']}/{name}"
            if key in done:
                continue
            plan = K.Plan(p["policies"], p["budgets"], settings=settings)
            kls = {r.sample_id: O.plan_sample_kl(model, r, plan) for r in val_refs
                   if r.sample_id not in set(row.get("calibration_ids", []))}
            done[key] = {"key": key, "kls": kls}
            append_row(out / "validation.jsonl", done[key])


def refine_heads(model, tokenizer, model_dir: Path, plan_dir: Path, budgets: list[int], data_dir: Path | None,
                 max_evals: int = C.CalibrationSettings().max_evals) -> dict[int, Path]:
    """A lever experiment, head-level routing: starting from each budget's PolyKV plan, the search may
    give each KV head its own policy (budgets kept), on the plan's own calibration samples with the
    same majority rule, scored on its validation samples. Writes budget<B>/polykv_heads.json."""
    paths = {b: path for b in budgets if (path := K.plan_path(plan_dir, b, K.POLYKV_HEADS)).is_file()}
    parents = {b: K.load_plan(K.plan_path(plan_dir, b, "polykv"), model.cfg.n_layers) for b in budgets if b not in paths}
    if not parents:
        return paths
    first = next(iter(parents.values()))
    if (recorded := K.calibration_settings(first.info)) is None:
        raise ValueError(f"{plan_dir}: the budget-{first.info.get('target_budget')} PolyKV plan records no calibration "
                         "(written by hand?): head routing starts from a calibrated plan and its samples")
    cs = C.CalibrationSettings(**recorded)
    calibration, validation, _ = C.calibration_sets(tokenizer, cs, data_dir, tuple(first.info.get("tasks", ())))
    if [s["_id"] for s in calibration] != first.info["calibration_ids"]:
        raise ValueError(f"{plan_dir}: this data gives other calibration samples than the plans record (--data-dir?)")
    bench = LB if data_dir is not None else C.R
    refs = C.build_references(model, tokenizer, model_dir, calibration, cs, first.settings, "calibration references", bench)
    val_refs = C.build_references(model, tokenizer, model_dir, validation, cs, first.settings, "validation references", bench)
    objective, validation_objective = (C.joint_objective(model, r, first.settings) for r in (refs, val_refs))
    for b, parent in parents.items():
        cal = parent.info["calibration"]
        sens = cal["signals"]["sensitivity"] or [0.0] * len(parent.budgets)
        order = sorted(range(len(parent.policies)), key=lambda l: -sens[l])
        pol, bud, kl, trace = S.search(objective, parent.policies, parent.budgets, order,
                                     S.routing_moves(cs.candidates, model.cfg.n_kv_heads), max_evals, min_win_share=cs.min_win_share)
        val_kl = C.mean(validation_objective(pol, bud))
        info = {**parent.info, "calibration": {**cal, "search_trace": trace, "in_sample_kl": kl, "validation_kl": val_kl,
                                               "refined_from": {k: cal[k] for k in ("in_sample_kl", "validation_kl")}}}
        paths[b] = K.plan_path(plan_dir, b, K.POLYKV_HEADS)
        K.save_plan(K.Plan(pol, bud, K.POLYKV_HEADS, parent.model, parent.settings, info), paths[b])
        report.plot_plan(K.load_plan(paths[b]), sens, paths[b].with_suffix(".png"))
        print(f"[{b}] head-level routing: {sum('/' in p for p in pol)} layers split by head; in-sample KL "
              f"{cal['in_sample_kl']:.4f} -> {kl:.4f}, validation KL {cal['validation_kl']:.4f} -> {val_kl:.4f}")
    return paths


# ----------------------------------------------------------------------------- the study's tables and plot

STUDY_ARMS = (  # (column, arm, plan): what calibration_study.py makes for each draw of n samples
    ("best uniform", "route-allocate", "uniform"), ("routing", "route-allocate", "polykv_routing"),
    ("allocation", "route-allocate", "polykv_allocation"), ("PolyKV (route, allocate)", "route-allocate", "polykv"),
    ("PolyKV (allocate, route)", "allocate-route", "polykv"), ("search: routing", "refined", "polykv_routing"),
    ("search: allocation", "refined", "polykv_allocation"), ("search: PolyKV", "refined", "polykv"))


def mean_or_none(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def fmt(x, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def study_tables(rows: dict, validation: dict, validation_ids: list[str], held_out_ids: list[str], out: Path) -> str:
    """The learning curve, TOVA's head aggregation and leave-one-family-out, as markdown (study.md)
    and a plot (curve.png), from calibration_study.py's plans.jsonl and validation.jsonl."""
    def kl(key: str, ids: list[str]) -> float | None:
        kls = validation.get(key, {}).get("kls", {})
        return mean_or_none([kls[i] for i in ids if i in kls])
    budgets = sorted({r["budget"] for r in rows.values()})
    curves, lines = {}, []
    for b in budgets:
        sizes = sorted({r["n"] for r in rows.values() if r["budget"] == b and r["draw"].startswith("n")})
        lines += [f"\n### Budget {b}: validation KL against the number of calibration samples "
                  f"({len(validation_ids)} fixed validation samples)\n"]
        if sizes:
            lines += ["| n | " + " | ".join(c for c, _, _ in STUDY_ARMS) + " |", "|---" * (len(STUDY_ARMS) + 1) + "|"]
        for n in sizes:
            cells = [kl(f"{b}/n{n}/{arm}/{plan}", validation_ids) for _, arm, plan in STUDY_ARMS]
            lines.append(f"| {n} | " + " | ".join(fmt(c) for c in cells) + " |")
            for (column, _, _), c in zip(STUDY_ARMS, cells):
                curves.setdefault((b, column), []).append((n, c))
        lines += paired_lines(b, sizes, validation, validation_ids)
        agg = {a: kl(f"{b}/tova_agg/{a}/tova", validation_ids) for a in ("mean", "all")}
        lines.append(f"\nUniform TOVA at {b}, validation KL: within each KV head's group {fmt(agg['mean'])}, "
                     f"over all query heads (as published) {fmt(agg['all'])}; all minus within, paired: "
                     f"{paired_difference(validation, validation_ids, f'{b}/tova_agg/all/tova', f'{b}/tova_agg/mean/tova')}.")
        lines += lofo_lines(b, kl, held_out_ids)
    text = "\n".join(lines) + "\n"
    (Path(out) / "study.md").write_text(text)
    plot_curves(curves, Path(out) / "curve.png")
    return text


PAIRED_RESAMPLES = 4000  # the study's few validation samples: twice the evaluation's draws, for steadier ends


LEVER_PAIRS = (  # (column, arm/plan, arm/plan): PolyKV made two ways from the same samples
    ("allocate-route minus route-allocate", "allocate-route/polykv", "route-allocate/polykv"),
    ("search minus its start (route-allocate)", "refined/polykv", "route-allocate/polykv"),
    ("search minus allocate-route", "refined/polykv", "allocate-route/polykv"))


def paired_difference(validation: dict, ids: list[str], a: str, b: str) -> str:
    """a's validation KL minus b's over the samples both have, with a 95% bootstrap interval
    (PAIRED_RESAMPLES draws); "–" when they share none."""
    x, y = validation.get(a, {}).get("kls", {}), validation.get(b, {}).get("kls", {})
    common = [i for i in ids if i in x and i in y]
    if not common:
        return "–"
    return report.interval(report.bootstrap_difference({"v": [x[i] for i in common]}, {"v": [y[i] for i in common]},
                                                       n=PAIRED_RESAMPLES), 4)


def paired_lines(budget: int, sizes: list[int], validation: dict, ids: list[str]) -> list[str]:
    """Each plan's validation KL minus its comparison's (report.BASELINE_OF: routing or allocation alone
    against the best uniform policy, PolyKV against allocation alone), then PolyKV's two orders and
    the search (LEVER_PAIRS), paired over the validation samples."""
    if not sizes:
        return []
    paired = lambda a, b: paired_difference(validation, ids, a, b)  # noqa: E731
    arms = [(column, arm, plan) for column, arm, plan in STUDY_ARMS if plan in report.BASELINE_OF]
    rows = [[str(n)] + [paired(f"{budget}/n{n}/{arm}/{plan}", f"{budget}/n{n}/{arm}/{report.BASELINE_OF[plan]}")
                        for _, arm, plan in arms] for n in sizes]
    levers = [[str(n)] + [paired(f"{budget}/n{n}/{a}", f"{budget}/n{n}/{b}") for _, a, b in LEVER_PAIRS] for n in sizes]
    return ([f"\nPaired over the validation samples (95% bootstrap, {PAIRED_RESAMPLES} resamples), each plan minus its comparison:\n"]
            + report.table("n", [f"{column} minus {report.BASELINE_OF[plan].replace('polykv_', '')}" for column, _, plan in arms], rows)
            + ["\nPolyKV made two ways, paired the same way:\n"] + report.table("n", [c for c, _, _ in LEVER_PAIRS], levers))


def lofo_lines(budget: int, kl, held_out_ids: list[str]) -> list[str]:
    """Leave one family out: the share of the in-family gain over uniform that survives without it."""
    cells = {d: (kl(f"{budget}/{d}/route-allocate/uniform", held_out_ids), kl(f"{budget}/{d}/route-allocate/polykv", held_out_ids))
             for d in ("in-family", "out-of-family")}
    if None in cells["in-family"] + cells["out-of-family"]:
        return []
    gain = {d: u - p for d, (u, p) in cells.items()}
    survives = gain["out-of-family"] / gain["in-family"] if gain["in-family"] > 0 else None
    return [f"\nLeave one family out at {budget} ({len(held_out_ids)} held-out samples of the family): "
            f"calibrated with it, best uniform {fmt(cells['in-family'][0])} -> PolyKV {fmt(cells['in-family'][1])}; "
            f"without it, best uniform {fmt(cells['out-of-family'][0])} -> PolyKV {fmt(cells['out-of-family'][1])}; "
            f"share of the in-family gain that survives: {'–' if survives is None else f'{100 * survives:.0f}%'}."]


def plot_curves(curves: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    budgets = sorted({b for b, _ in curves})
    if not budgets:  # no learning-curve draws (e.g. only leave-one-family-out): nothing to plot
        return
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4.5), squeeze=False)
    for ax, b in zip(axes[0], budgets):
        for (bb, column), points in curves.items():
            points = [(n, v) for n, v in points if v is not None]
            if bb == b and points:
                ax.plot(*zip(*points), marker="o", ls="--" if column.startswith("search") else "-", label=column)
        ax.set(xscale="log", yscale="log", xlabel="calibration samples", ylabel="validation KL to FullKV",
               title=f"average budget {b}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_same_study(path: Path, study: dict) -> None:
    """A study folder resumes one study: its rows are keyed by budget, draw and arm only, so a rerun
    with another model, data or calibration setting would mix two studies' rows in one table."""
    if not path.exists():
        return
    old = json.loads(path.read_text())
    old = {"model": old.get("model"), "data": old.get("data"), **(K.calibration_settings(old) or {})}
    new = {"model": study["model"], "data": study["data"], **study["calibration_settings"]}
    shown = lambda k, v: f"--candidates {' '.join(v)}" if k == "candidates" else v  # noqa: E731  (the flag that resumes it)
    if changed := [f"{k} {shown(k, old[k])} (now {shown(k, v)})" for k, v in new.items() if k in old and old[k] != v]:
        raise ValueError(f"{path}: this study ran with {', '.join(changed)}; resume it with the same settings "
                         "or give another --out")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--data-dir", required=True, help="LongBench folder")
    p.add_argument("--out", type=Path, default=None, help="study folder (with --head-routing: the plan folder)")
    p.add_argument("--budgets", type=int, nargs="+", default=[128, 512])
    p.add_argument("--sizes", type=int, nargs="*", default=[16, 32, 64, 128],
                   help="learning-curve draws (none: only the --family draws)")
    p.add_argument("--extra-sizes", type=int, nargs="*", default=[16, 32],
                   help="sizes that also get the other order and the search (their cost grows with n)")
    p.add_argument("--n-validation", type=int, default=C.CalibrationSettings().n_validation)
    p.add_argument("--family", choices=sorted(FAMILIES), default=None, help="leave this task family out")
    p.add_argument("--n-family", type=int, default=32, help="calibration samples with / without the family")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=C.CalibrationSettings().max_length)
    p.add_argument("--n-continuation", type=int, default=C.CalibrationSettings().n_continuation)
    p.add_argument("--max-ratio", type=float, default=C.CalibrationSettings().max_ratio,
                   help="a layer's budget is at most this many times the average budget (--head-routing: the plans' own)")
    p.add_argument("--candidates", nargs="+", choices=K.CANDIDATES, default=None, metavar="POLICY",
                   help=f"the policies routing chooses from (default: all; the committed studies: {' '.join(K.FIRST_CANDIDATES)}; "
                   "--head-routing: the plans' own)")
    p.add_argument("--head-routing", action="store_true", help="the per-KV-head lever on the committed PolyKV plans")
    p.add_argument("--validate-only", action="store_true",
                   help="only score the plans made so far (e.g. beside a run still making them), then the tables")
    args = p.parse_args(argv)
    if args.out is None and not args.head_routing:
        p.error("--out is required: the study folder (plans.jsonl, validation.jsonl, study.md)")
    cs = None if args.head_routing else C.CalibrationSettings(  # checks them, first (head routing: the plans' own)
        n_validation=args.n_validation, seed=args.seed, max_length=args.max_length,
        n_continuation=args.n_continuation, max_ratio=args.max_ratio, candidates=args.candidates)
    model_dir = CK.resolve_model_dir(args.model)
    data_dir = LB.find_data_dir(args.data_dir, C.ROOT)
    if args.head_routing:
        model, tokenizer = CK.load_model(model_dir), CK.load_tokenizer(model_dir)
        refine_heads(model, tokenizer, model_dir, args.out or K.PLANS_DIR / CK.model_name(model_dir), args.budgets, data_dir)
        return
    study = {"model": CK.model_name(model_dir), "data": LB.data_id(data_dir), "calibration_settings": cs.__dict__}
    check_same_study(args.out / "study.json", study)  # before the model loads
    model, tokenizer = CK.load_model(model_dir), CK.load_tokenizer(model_dir)
    validation, draws, held_out = sample_sets(data_dir, sorted(args.sizes), args.n_validation, args.family,
                                              args.n_family, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study.json").write_text(json.dumps({**study, "argv": sys.argv[1:]}, indent=1))
    rows = read_rows(args.out / "plans.jsonl")
    needed = {s["_id"]: s for samples in draws.values() for s in samples}
    extra_sizes = set(args.extra_sizes)
    if not args.validate_only and any(key not in rows for key in expected_keys(draws, args.budgets, extra_sizes)):
        refs = C.build_references(model, tokenizer, model_dir, list(needed.values()), cs, SETTINGS, "calibration references")
        make_plans(model, {r.sample_id: r for r in refs}, draws, args.budgets, cs, extra_sizes, rows, args.out)
        del refs
    add_tova_rows(model.cfg.n_layers, args.budgets, rows, args.out)
    done = read_rows(args.out / "validation.jsonl")
    val_samples = list({s["_id"]: s for s in validation + held_out}.values())
    if any(f"{row['key']}/{name}" not in done for row in rows.values() for name in row["plans"]):
        val_refs = C.build_references(model, tokenizer, model_dir, val_samples, cs, SETTINGS, "validation references")
        validate(model, val_refs, rows, done, args.out)
    tables = study_tables(rows, done, [s["_id"] for s in validation], [s["_id"] for s in held_out], args.out)
    print(tables)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
