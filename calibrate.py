"""
PolyKV offline calibration, as the paper describes it: estimate each layer's eviction
preference (routing) and cache sensitivity (allocation) on calibration samples, and freeze
both into a static plan per budget.

    python calibrate.py --budgets 128 256 512 1024 --data-dir DIR [--model DIR] [--n-samples 32] [--refine]

1. References (objective.py). Each calibration prompt is prefilled once; FullKV's greedy continuation and its
   next-token distributions over it are the target. --query agnostic prefills only the context
   (compressed before the question is seen) and scores the answer read through it.
2. The signal (objective.py). The end-to-end KL(FullKV || compressed) over that continuation, teacher-forced:
   the mean over its tokens, or with --token-kl max its worst token (not the paper's; for exact-match answers).
   A *single-layer* KL compresses one layer only (every other layer keeps everything); its pass
   starts at that layer, from FullKV's hidden state there.
3. Allocation (polykv.allocate): each layer's cache sensitivity is its single-layer KL at a
   quarter of the target budget; budgets follow sqrt(sensitivity) under the exact total.
4. Routing (polykv.route): each layer takes the policy with the lowest single-layer KL.
   PolyKV = both, in the order set by `CalibrationSettings.order`; each ablation = one of them.
5. Confirmation (--confirm-routing, optional; search.py): a layer the single-layer preference routes
   away from the best uniform policy keeps its route only if the switch also lowers the *joint* KL
   (every layer compressed). On a folder of plans made with the same settings without it (and not
   refined), only this step, the span step and the validation run.
   Refinement (--refine, optional; search.py): a coordinate-descent search on the joint
   objective (every layer compressed) moves single layers' policies and budget quanta, starting from
   the paper's plans (confirmed, with --confirm-routing).
6. Span (--span, --spans, optional): every policy's scores max-pooled over a few neighbours before
   selection (policies.pool_span). --span S fits steps 3-5 at span S (the uniform policies too);
   --spans (which must include S) tries each candidate on the fitted plans and keeps the span with
   PolyKV's lowest in-sample KL (routes and budgets are not refitted). Run on a folder of plans
   fitted with the same settings (the same --span), only this step and the validation run.
7. Validation. Held-out samples score every plan next to the best uniform policy.
Calibration samples are never evaluation samples: they come from longbench.calibration_pool
(or RULER seeds of their own), and every id used is written into the plan, which the
evaluation excludes.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm import tqdm

import longbench as LB
import checkpoint as CK
import objective as O
import polykv as K
import policies as P
import report
import ruler as R
import run_folder as RF
from run_settings import MAX_LENGTH, QUERY_MODES
from search import confirm_plans, mean, refine_plans

ROOT = Path(__file__).resolve().parent


LATER_STEPS = ("spans", "confirm_routing")  # steps that can run on plans made without them (see finished_plans)


@dataclass(frozen=True)
class CalibrationSettings:
    """The calibration's knobs: the one place their defaults are written."""
    n_samples: int = 32  # calibration samples, drawn round-robin over the tasks
    n_validation: int = 32  # held-out samples that score the plans (a fixed set: drawn first)
    max_length: int = MAX_LENGTH["longbench"]  # tokens: LongBench prompts middle-truncated, RULER prompt + generation
    n_continuation: int = 32  # FullKV's greedy tokens whose next-token distributions are the target
    order: str = "allocate-route"  # PolyKV: allocate, then route at the allocated budgets (see paper_plans)
    refine: bool = False  # then the search on the joint objective
    max_evals: int = 100  # objective evaluations per search
    quantum: int = 32  # tokens a search move shifts between layers
    max_ratio: float = 4.0  # a layer's budget is at most this many times the average (and at most the prompt)
    min_win_share: float = 0.5  # a search move must lower the KL on more than this share of samples
    seed: int = 0  # which samples are drawn
    query: str = "aware"  # "agnostic": compress the context before the question is seen, as evaluation's --query agnostic
    span: int = 1  # policies.Settings.span the routes and budgets are fitted at (1: scores as the policies give them)
    spans: list[int] | None = None  # candidate spans of the last step (see choose_span); None: [span], no choice
    confirm_routing: bool = False  # keep a layer's route only where it lowers the joint KL (search.confirm_routing)
    candidates: list[str] | None = None  # the policies routing and the best uniform policy choose from (None: all)
    token_kl: str = "mean"  # a sample's KL: the mean over its answer tokens (the paper's), or "max": its worst token

    def __post_init__(self):
        for name in ("n_samples", "n_validation", "max_length", "n_continuation", "max_evals", "quantum"):
            if getattr(self, name) < (0 if name == "n_validation" else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.n_continuation < 2:
            raise ValueError("--n-continuation must be at least 2 (the first token carries no signal)")
        if self.token_kl not in O.TOKEN_KLS:
            raise ValueError(f"token_kl must be one of {', '.join(O.TOKEN_KLS)}, got {self.token_kl!r}")
        if self.query not in QUERY_MODES:
            raise ValueError(f"query must be one of {', '.join(QUERY_MODES)}, got {self.query!r}")
        if self.order not in ("route-allocate", "allocate-route"):
            raise ValueError(f"order must be 'route-allocate' or 'allocate-route', got {self.order!r}")
        if not 1 <= self.max_ratio < float("inf"):  # also refuses nan
            raise ValueError(f"--max-ratio must be a number >= 1 (times the average budget), got {self.max_ratio}")
        if not 0 <= self.min_win_share < 1:
            raise ValueError(f"--min-win-share must be in [0, 1), got {self.min_win_share}")
        if self.spans is not None and not self.spans:
            raise ValueError("--spans needs at least one span")
        for flag, span in [("--span", self.span)] + [("--spans", s) for s in self.spans or []]:
            try:
                P.Settings(span=span)  # the one rule for a span
            except ValueError as e:
                raise ValueError(f"{flag} {span}: {e}") from None
        if self.spans is not None and self.span not in self.spans:  # else the span step could drop the fitted span
            raise ValueError(f"--spans {' '.join(map(str, self.spans))} must include --span {self.span}, the span the plans are fitted at")
        if unknown := [p for p in self.candidates or [] if p not in K.CANDIDATES]:
            raise ValueError(f"--candidates: {unknown[0]!r} is not a routing candidate (they are: {', '.join(K.CANDIDATES)})")
        if self.candidates is not None and not self.candidates:
            raise ValueError("--candidates needs at least one policy")
        # as JSON reads them back (lists): resuming compares the two
        object.__setattr__(self, "spans", [self.span] if self.spans is None else list(self.spans))
        # in the registry's order, once each: the same set is the same setting
        object.__setattr__(self, "candidates", [p for p in K.CANDIDATES if self.candidates is None or p in self.candidates])


# -----------------------------------------------------------------------------
# The paper's calibration: routing and allocation from single-layer signals


def paper_plans(layer_kl: K.LayerKL, best: str, n: int, average: int, low: int, high: int, order: str,
                candidates: list[str]) -> dict:
    """PolyKV and its two ablations: {name: (policies, budgets, signals)}.

    routing only: every layer at the average budget, each with its preferred policy;
    allocation only: the best uniform policy everywhere, budgets from its sensitivities;
    PolyKV: "route-allocate" routes at the average budget, then allocates from the routed
    policies' sensitivities; "allocate-route" allocates first, then routes each layer at its
    own budget. Allocating first is the default: a layer's preferred policy depends on its budget,
    so routing at the budget the layer will actually have fits better. Measured on SmolLM2
    (calibration_study.py, validation KL on 32 held-out samples, paired bootstrap of the
    difference): allocate-route minus route-allocate = -0.040 [-0.081, -0.007] at budget 128 and
    -0.008 [-0.017, +0.001] at 512 with 16 calibration samples, +0.007 [-0.034, +0.060] at 128
    with 32: better or level, never worse."""
    sens_budget = max(low, average // 4)
    even = [average] * n
    preference = lambda budgets: [{p: layer_kl(l, p, b) for p in candidates} for l, b in enumerate(budgets)]  # noqa: E731
    sensitivity = lambda policies: K.sensitivity(layer_kl, policies, sens_budget)  # noqa: E731
    allocate = lambda sens: K.allocate(sens, average, low, high)  # noqa: E731
    routed, best_sens = K.route(layer_kl, even, candidates, prefer=best), sensitivity([best] * n)
    allocated = allocate(best_sens)
    signal = lambda pref, sens: {"preference": pref, "sensitivity": sens, "sensitivity_budget": sens_budget}  # noqa: E731
    if order == "route-allocate":
        routed_sens = sensitivity(routed)
        both = (routed, allocate(routed_sens), signal(preference(even), routed_sens))
    else:
        both = (K.route(layer_kl, allocated, candidates, prefer=best), allocated, signal(preference(allocated), best_sens))
    return {"polykv": both, "polykv_routing": (routed, even, signal(preference(even), None)),
            "polykv_allocation": ([best] * n, allocated, signal(None, best_sens))}


# -----------------------------------------------------------------------------
# One budget: the paper's plans, optionally confirmed and refined, and their validation


def joint_objective(model, refs: list[O.Reference], settings: P.Settings):
    """objective(policies, budgets) -> the joint KL per calibration sample, every layer compressed."""
    return lambda policies, budgets: O.sample_kls(model, refs, K.Plan(policies, budgets, settings=settings))


def calibrate_budget(model, refs: list[O.Reference], val_refs: list[O.Reference], average: int,
                     cs: CalibrationSettings, settings: P.Settings) -> tuple[dict[str, dict], P.Settings]:
    """({plan name: {policies, budgets, calibration record}}, their settings) for one target average budget."""
    n, settings = model.cfg.n_layers, replace(settings, span=cs.span)  # every signal below is measured at the span
    objective = joint_objective(model, refs, settings)
    layer_kl = lambda l, p, b: mean(O.single_layer_kl(model, r, l, p, b, settings) for r in refs)  # noqa: E731
    # a layer never needs more than the calibration prompts hold: budget above that would be unused
    low, longest = settings.window, max(r.cache.lengths[0] for r in refs)
    high = max(average, int(min(cs.max_ratio * average, longest)), low)  # min first: a huge ratio is not int()ed
    uniform = {p: mean(objective([p] * n, [average] * n)) for p in cs.candidates}
    best = min(uniform, key=uniform.get)
    table = {"uniform_kl": uniform, "best_uniform": best, "best_uniform_in_sample_kl": uniform[best], "order": cs.order}
    print(f"[{average}] uniform KL: " + ", ".join(f"{p}={kl:.4f}" for p, kl in uniform.items()))
    out = {name: {"policies": policies, "budgets": budgets, "calibration": {
               **table, "signals": signals, "paper_in_sample_kl": mean(objective(policies, budgets))}}  # before steps 5-6
           for name, (policies, budgets, signals) in paper_plans(layer_kl, best, n, average, low, high, cs.order,
                                                                 cs.candidates).items()}
    if cs.confirm_routing:
        confirm_plans(objective, out, average, cs.min_win_share)
    if cs.refine:
        refine_plans(objective, layer_kl, out, low, high, cs.quantum, cs.max_evals, cs.min_win_share, cs.candidates)
    return choose_span(model, refs, val_refs, out, average, settings, cs.spans)


def choose_span(model, refs: list[O.Reference], val_refs: list[O.Reference], plans: dict[str, dict], average: int,
                settings: P.Settings, spans: list[int]) -> tuple[dict[str, dict], P.Settings]:
    """The last step: every plan of the budget scored at each span (and the best uniform policy, kept
    as the calibration chose it, for the record); all take the span with PolyKV's lowest in-sample KL
    (one run shares one set of policy settings). Chosen on the calibration samples, so the validation
    KLs, written at that span, stay held out. The routes and budgets are not refitted at the span.
    Returns the plans with their records at the chosen span, and the settings to save them with."""
    n, best = model.cfg.n_layers, plans["polykv"]["calibration"]["best_uniform"]
    arms = {"uniform": ([best] * n, [average] * n), **{k: (p["policies"], p["budgets"]) for k, p in plans.items()}}
    kls = lambda on, arm, span: joint_objective(model, on, replace(settings, span=span))(*arms[arm])  # noqa: E731
    in_sample = {s: {a: mean(kls(refs, a, s)) for a in arms} for s in spans}
    chosen = min(spans, key=lambda s: in_sample[s]["polykv"])  # ties: the first listed
    val = {a: [round(kl, 6) for kl in kls(val_refs, a, chosen)] for a in arms}
    if len(spans) > 1:
        print(f"[{average}] span: PolyKV in-sample KL " + ", ".join(f"{s}={in_sample[s]['polykv']:.4f}" for s in spans)
              + f" -> span {chosen}")
    for name, p in plans.items():
        record = p["calibration"]
        record.update(span=chosen, in_sample_kl=in_sample[chosen][name], validation_kls=val[name],
                      validation_kl=mean(val[name]), best_uniform_in_sample_kl=in_sample[chosen]["uniform"],
                      best_uniform_validation_kls=val["uniform"], best_uniform_validation_kl=mean(val["uniform"]),
                      span_in_sample_kl={str(s): in_sample[s][name] for s in spans},
                      span_uniform_in_sample_kl={str(s): in_sample[s]["uniform"] for s in spans})
        scored = (f", validation KL {record['validation_kl']:.4f} (best uniform {best}: "
                  f"{record['best_uniform_validation_kl']:.4f})" if val_refs else "")  # none: validated elsewhere
        print(f"[{average}] {name}: in-sample KL {record['in_sample_kl']:.4f}{scored}")
    return plans, replace(settings, span=chosen)


# -----------------------------------------------------------------------------
# Samples: a fixed validation set, then the calibration samples, round-robin over tasks


def build_references(model, tokenizer, model_dir, samples: list[dict], cs: CalibrationSettings,
                     settings: P.Settings, desc: str, bench=LB) -> list[O.Reference]:
    """One objective.Reference per sample; bench: the samples' benchmark module (longbench or ruler), whose
    prompt_ids builds their prompts."""
    stop_ids = CK.stop_token_ids(model_dir, tokenizer)
    refs = []
    for s in tqdm(samples, desc=desc):
        ids, n_context = bench.prompt_ids(tokenizer, s, cs.max_length)
        refs.append(O.build_reference(model, ids, s["_id"], cs.n_continuation, stop_ids, settings.window,
                                    n_context if cs.query == "agnostic" else None, cs.token_kl))
    return refs


def calibration_sets(tokenizer, cs: CalibrationSettings, data_dir: Path | None,
                     tasks: tuple[str, ...] = ()) -> tuple[list, list, str]:
    """(calibration samples, validation samples, data id): from the LongBench folder's calibration
    pool, or, without one, from RULER samples generated with seeds that evaluation never uses.
    tasks: draw from these tasks only (default: every task of the folder; RULER's default tasks)."""
    if data_dir is not None:
        pool, data = LB.calibration_pool(LB.load_samples(data_dir, list(tasks) or None)), LB.data_id(data_dir)
    else:
        tasks = tasks or R.DEFAULT_TASKS
        k = -(-(cs.n_samples + cs.n_validation) // len(tasks))  # per task, rounded up
        pool = {t: R.generate(t, k, tokenizer, cs.max_length, seed=R.CALIBRATION_SEED + cs.seed) for t in tasks}
        data = f"ruler-{cs.max_length}"
    validation = LB.draw(pool, cs.n_validation, cs.seed)
    return LB.draw(LB.without(pool, validation), cs.n_samples, cs.seed), validation, data


def run(model, tokenizer, model_dir: Path, budgets: list[int], out_dir: Path, cs: CalibrationSettings,
        settings: P.Settings = P.Settings(), data_dir: Path | None = None,
        tasks: tuple[str, ...] = ()) -> dict[int, dict[str, Path]]:
    """Calibrate every budget from ONE set of references; write each budget's plans and PNGs
    (out_dir/budget<B>/<name>.json). A budget already written with the same settings is kept; one
    written with the same settings but other --spans, or without --confirm-routing asked now, gets
    only later_steps."""
    calibration, validation, data = calibration_sets(tokenizer, cs, data_dir, tasks)
    record = {"calibration_settings": asdict(cs), "data": data, **({"tasks": list(tasks)} if tasks else {}),
              "calibration_ids": [s["_id"] for s in calibration], "validation_ids": [s["_id"] for s in validation]}
    model_name = CK.model_name(model_dir)  # a Hugging Face cache snapshot is named by its repository, not its commit
    finished = {b: done for b in budgets if (done := finished_plans(out_dir, b, model_name, record, settings))}
    paths = {b: {n: K.plan_path(out_dir, b, n) for n in done} for b, done in finished.items()
             if all(p.info["calibration_settings"][k] == getattr(cs, k) for k in LATER_STEPS for p in done.values())}
    if paths:
        print(f"already calibrated with these settings (kept): budgets {sorted(paths)} in {out_dir}")
    if not [b for b in budgets if b not in paths]:
        return paths
    t0 = time.perf_counter()
    bench = LB if data_dir is not None else R  # calibration_sets drew RULER samples without a LongBench folder
    refs = build_references(model, tokenizer, model_dir, calibration, cs, settings, "calibration references", bench)
    val_refs = build_references(model, tokenizer, model_dir, validation, cs, settings, "validation references", bench)
    for average in [b for b in budgets if b not in paths]:
        if average in finished:  # the plans are made (confirmed or not, all alike): only the later steps
            confirm = cs.confirm_routing and not finished[average]["polykv"].info["calibration_settings"]["confirm_routing"]
            print(f"[{average}] plans made with these settings in {out_dir}: "
                  + ("the confirmation and " if confirm else "") + "the span step only")
            plans, chosen = later_steps(model, refs, val_refs, finished[average], average, cs, settings, confirm)
        else:
            plans, chosen = calibrate_budget(model, refs, val_refs, average, cs, settings)
        paths[average] = {}
        for name, p in plans.items():
            plan = K.Plan(p["policies"], p["budgets"], name, model_name, chosen,
                          {"target_budget": average, **record, "calibration": p["calibration"]})
            paths[average][name] = K.plan_path(out_dir, average, name)
            K.save_plan(plan, paths[average][name])
            report.plot_plan(plan, p["calibration"]["signals"]["sensitivity"], paths[average][name].with_suffix(".png"))
    prefill = sum(r.prefill_seconds for r in refs + val_refs)
    total = time.perf_counter() - t0
    print(f"calibration took {total:.0f} s = {total / prefill:.1f}x the {prefill:.0f} s of prefilling its "
          f"{len(refs) + len(val_refs)} samples")
    return paths


def later_steps(model, refs: list[O.Reference], val_refs: list[O.Reference], made: dict[str, K.Plan], average: int,
                cs: CalibrationSettings, settings: P.Settings, confirm: bool) -> tuple[dict[str, dict], P.Settings]:
    """On plans made with these settings (finished_plans), only the steps that can run on made plans:
    the confirmation if `confirm` (at the span the plans were fitted at, as in calibrate_budget, not
    the span a span step chose), then the span step. Returns what calibrate_budget returns."""
    plans = {n: {"policies": p.policies, "budgets": p.budgets, "calibration": p.info["calibration"]}
             for n, p in made.items()}
    if confirm:
        confirm_plans(joint_objective(model, refs, replace(settings, span=cs.span)), plans, average, cs.min_win_share)
    return choose_span(model, refs, val_refs, plans, average, settings, cs.spans)


def finished_plans(out_dir: Path, budget: int, model_name: str, record: dict,
                   settings: P.Settings) -> dict[str, K.Plan] | None:
    """The plans of an earlier run with the same model, samples and settings, else None: an
    interrupted multi-budget run resumes at the first budget it had not written. Their chosen span
    (settings.span) and --spans may differ (the caller redoes the span step), their fitted span
    (--span) may not; plans made without --confirm-routing serve a run with it (the caller confirms
    their routes) unless refined (the search started from the unconfirmed routes), never the
    reverse, nor a folder half confirmed (interrupted), nor plans chosen among other candidates (said: plans
    made before --candidates existed read as chosen among the policies their uniform step scored)."""
    paths = {n: K.plan_path(out_dir, budget, n) for n in K.POLYKV}
    if not all(p.is_file() for p in paths.values()):
        return None
    plans = {n: K.load_plan(p) for n, p in paths.items()}
    for p in plans.values():
        p.info["calibration_settings"] = K.calibration_settings(p.info)
    if any(p.info["calibration_settings"] is None for p in plans.values()):  # written by hand
        return None
    made_among, now_among = plans["polykv"].info["calibration_settings"]["candidates"], record["calibration_settings"]["candidates"]
    if made_among != now_among:  # e.g. made before KeyDiff existed: rerun with their --candidates to keep them
        print(f"{out_dir}: the budget-{budget} plans chose among {' '.join(made_among)}, this run among "
              f"{' '.join(now_among)} (--candidates): calibrating again")
        return None
    later_aside = lambda r: {**r, "calibration_settings": {**r["calibration_settings"],  # noqa: E731
                                                           **dict.fromkeys(LATER_STEPS)}}
    same = all(p.model == model_name and replace(p.settings, span=settings.span) == settings
               and all(later_aside(p.info).get(k) == v for k, v in later_aside(record).items()) for p in plans.values())
    was = {p.info["calibration_settings"]["confirm_routing"] for p in plans.values()}
    if len(was) > 1:  # a confirmation interrupted between two plans' writes
        return None
    now, refined = record["calibration_settings"]["confirm_routing"], record["calibration_settings"]["refine"]
    return plans if same and (was == {now} or now and not refined) else None


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv):
    d = CalibrationSettings()
    p = argparse.ArgumentParser(description="PolyKV offline calibration -> plan JSON (+ PNG) per budget.")
    p.add_argument("--budgets", type=int, nargs="+", default=[K.DEFAULT_BUDGET], help="target average budgets (tokens per KV head "
                   "per layer); --budget is the same")
    p.add_argument("--budget", type=int, nargs="+", dest="budgets", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help="checkpoint folder or cached Hugging Face id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--benchmark", choices=("longbench", "ruler"), default=None, help="the calibration samples' benchmark "
                   "(default: LongBench if a folder is given or found, else RULER, generated)")
    p.add_argument("--data-dir", default=None, help="LongBench folder (default: $LONGBENCH_DIR, data/LongBench; none: RULER samples)")
    p.add_argument("--out", type=Path, default=None, help="plan folder (default: plans/<model>, the committed plans)")
    p.add_argument("--tasks", nargs="+", default=[], help="calibrate on these tasks only (default: every LongBench "
                   "task; without LongBench, RULER's default tasks), e.g. the tasks the plans will serve")
    for name in ("n_samples", "n_validation", "n_continuation", "max_evals", "quantum", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--max-length", type=int, default=None, help="prompt tokens (default: as evaluation's, "
                   f"{MAX_LENGTH['longbench']} on LongBench, {MAX_LENGTH['ruler']} on RULER)")
    p.add_argument("--max-ratio", type=float, default=d.max_ratio, help="a layer's budget is at most this many "
                   "times the average budget")
    p.add_argument("--span", type=int, default=d.span, help="fit routing and allocation with every policy's scores "
                   "max-pooled over this many neighbours before selection (default: 1, no pooling)")
    p.add_argument("--spans", type=int, nargs="+", default=None, help="candidate spans tried on the fitted plans; "
                   "the calibration keeps the one with PolyKV's lowest in-sample KL (must include --span; default: "
                   "--span alone); on plans fitted at the same --span only this step runs")
    p.add_argument("--min-win-share", type=float, default=d.min_win_share, help="search: majority rule")
    p.add_argument("--order", choices=("route-allocate", "allocate-route"), default=d.order)
    p.add_argument("--confirm-routing", action="store_true", help="keep a layer's routed policy only where it lowers "
                   "the joint KL (every layer compressed); on plans made without it (not refined), only this step "
                   "and the span step run, rewriting them")
    p.add_argument("--refine", action="store_true", help="refine the paper's plans with the coordinate-descent search")
    p.add_argument("--candidates", nargs="+", choices=K.CANDIDATES, default=None, metavar="POLICY",
                   help=f"the policies routing (and the best uniform policy) choose from (default: all, "
                   f"{' '.join(K.CANDIDATES)}; the plans made before KeyDiff: {' '.join(K.FIRST_CANDIDATES)})")
    p.add_argument("--query", choices=QUERY_MODES, default=d.query, help="agnostic: plans for compressing the "
                   "context before the question is seen (evaluate them with longbench_eval.py --query agnostic)")
    p.add_argument("--token-kl", choices=list(O.TOKEN_KLS), default=d.token_kl, help="a sample's KL: its tokens' mean, or worst")
    p.add_argument("--summary", type=Path, default=None, metavar="PLAN_DIR",
                   help="print the calibration table of the plans under PLAN_DIR (e.g. plans/<model>) and exit")
    p.add_argument("--tova-agg", choices=P.AGGREGATIONS, default=P.Settings().tova_agg,
                   help="TOVA's head aggregation in the plans (e.g. 'mean' to match plans made with it)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.summary:
        print(report.calibration_table(args.summary))
        return
    if args.benchmark == "ruler" and args.data_dir:
        raise ValueError("--data-dir is a LongBench folder: not with --benchmark ruler")
    data_dir = None if args.benchmark == "ruler" else LB.find_data_dir(args.data_dir, ROOT)
    if args.benchmark == "longbench" and data_dir is None:
        raise ValueError("--benchmark longbench: no LongBench folder (--data-dir, $LONGBENCH_DIR or data/LongBench)")
    if args.max_length is None:  # the length evaluation runs the benchmark at: plans fit the prompts they serve
        args.max_length = MAX_LENGTH["longbench" if data_dir is not None else "ruler"]
    cs = CalibrationSettings(**{f: getattr(args, f) for f in CalibrationSettings.__dataclass_fields__})
    budgets = list(dict.fromkeys(args.budgets))  # in the order given (the first is calibrated first), once each
    settings = P.Settings(tova_agg=args.tova_agg)
    if min(budgets) < settings.window:
        raise ValueError(f"--budgets: {min(budgets)} is below the observation window ({settings.window}), "
                         "which every layer keeps")
    valid = LB.available_tasks(data_dir) if data_dir is not None else R.ALL_TASKS
    if unknown := [t for t in args.tasks if t not in valid]:
        where = f"in {data_dir}" if data_dir is not None else "for RULER (no LongBench folder)"
        raise ValueError(f"--tasks: unknown task(s) {', '.join(unknown)}; valid {where}: {', '.join(valid)}")
    tasks = tuple(t for t in valid if t in args.tasks)  # in one order: the same tasks draw the same samples
    model_dir = CK.resolve_model_dir(args.model)
    out = args.out or K.PLANS_DIR / CK.model_name(model_dir)
    RF.check_writable(out, "--out")
    for budget in budgets:  # two calibrations of one budget into one folder would overwrite each other's plans
        folder = K.budget_dir(out, budget)
        folder.mkdir(exist_ok=True)
        RF.take_lock(folder)
    if data_dir is None:
        print("no LongBench folder given or found: calibrating on RULER samples (seeds disjoint from evaluation's)")
    model, tokenizer = CK.load_model(model_dir, args.device), CK.load_tokenizer(model_dir)
    run(model, tokenizer, model_dir, budgets, out, cs, settings, data_dir, tasks)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
