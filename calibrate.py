"""
PolyKV offline calibration: choose every layer's policy (routing) and budget
(allocation) under a fixed total, judged end to end, and freeze them into a plan.

    python calibrate.py --budget 512 [--budgets 128 256 512 1024] [--model DIR] [--data-dir DIR]

What it does, per DESIGN.md ("PolyKV calibration"):
1. Reference: prefill each calibration prompt once and generate its FullKV greedy
   continuation; FullKV's next-token distributions over it are the target.
2. Objective: mean KL(full || compressed) over the continuation, teacher-forced on
   a compressed copy of the one prefill, with EVERY layer compressed by the plan.
   (A per-layer proxy misranked the policies on this model; see DESIGN.md.)
3. Sensitivity: the objective with only layer l compressed, at a small budget.
4. Search: coordinate descent from the best uniform policy, most sensitive layers
   first, trying other policies (routing) and moving budget quanta between layers
   (allocation), keeping a change only if it lowers the mean KL and wins on most samples.
5. Validation: held-out calibration samples score the plan next to the best uniform.
Calibration samples are never evaluation samples: the split is longbench.dataset_split,
and every id used here is written into the plan, which longbench_eval.py excludes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

import longbench as LB
import model as M
import polykv as K

ROOT = Path(__file__).resolve().parent
CANDIDATES = ("h2o", "snapkv", "tova", "streamingllm", "knorm")  # random is the floor, not a candidate
PLAN_NAMES = ("polykv", "polykv_routing", "polykv_allocation")  # PolyKV and its two ablations

# -----------------------------------------------------------------------------
# Calibration samples and their FullKV reference


@dataclass
class Reference:
    """One calibration prompt, prefilled once: everything a plan's objective needs."""
    sample_id: str
    cache: M.KVCache  # the full prefill, never modified
    stats: K.PrefillStats
    score_memo: dict  # (layer, policy) -> scores: computed once, reused by every candidate plan
    continuation: torch.Tensor  # (N,) FullKV greedy continuation
    full_logprobs: torch.Tensor  # (N-1, V) FullKV teacher-forced log-probs
    prefill_seconds: float
    trunks: dict = field(default_factory=dict)  # recent plans' layer inputs, see plan_sample_kl


def build_reference(model, ids: list[int], sample_id: str, n_continuation: int, stop_ids, window: int) -> Reference:
    tokens = torch.tensor([ids], device=model.embed_tokens.weight.device)
    t0 = time.perf_counter()
    logits, cache, stats = K.prefill_with_stats(model, tokens, window)
    seconds = time.perf_counter() - t0
    continuation = torch.tensor(M.generate(model, cache.clone(), logits, n_continuation, stop_ids), device=tokens.device)
    full = K.teacher_forced_logprobs(model, cache.clone(), continuation)
    return Reference(sample_id, cache, stats, {}, continuation, full, seconds)


N_TRUNKS = 4  # plans whose layer inputs each reference remembers


@torch.no_grad()
def plan_sample_kl(model, ref: Reference, plan: K.Plan) -> float:
    """K.continuation_kl of `plan` on one reference, without re-running layers it shares with a recent plan.

    The search changes one or two layers at a time. The teacher-forced pass below the first
    changed layer sees the same inputs and the same caches as the plan it was derived from,
    so it starts from that plan's remembered input to the first changed layer. Same result
    as the plain pass (tested), at a fraction of the cost."""
    layers = list(zip(plan.policies, plan.budgets))
    shared = lambda key: next((l for l, (a, b) in enumerate(zip(key, layers)) if a != b), len(layers))  # noqa: E731
    base = max(ref.trunks, key=shared, default=None)
    start = shared(base) if base is not None else 0
    start = min(start, len(layers) - 1)  # an identical plan still runs its top layer
    cache = K.apply_plan(ref.cache, ref.stats, plan, len(ref.continuation), ref.score_memo)
    tokens = ref.continuation[None, :-1]  # (1, N-1), as in K.teacher_forced_logprobs
    positions = torch.arange(cache.next_pos, cache.next_pos + tokens.shape[1], device=tokens.device)
    cos, sin = M.rope_cos_sin(model.inv_freq, positions)
    if base is not None:
        ref.trunks[base] = ref.trunks.pop(base)  # now the most recently used
    trunk = ref.trunks.get(base, [])  # trunk[l]: the input (1, N-1, dim) to layer l
    inputs = trunk[:start]
    x = trunk[start] if start else model.embed_tokens(tokens)  # (1, N-1, dim)
    for layer in range(start, len(layers)):
        inputs.append(x)
        x = model.layers[layer](x, cos, sin, cache, layer)  # (1, N-1, dim)
    logprobs = F.log_softmax(model.lm_head(model.norm(x))[0].float(), dim=-1)
    ref.trunks[tuple(layers)] = inputs
    while len(ref.trunks) > N_TRUNKS:
        ref.trunks.pop(next(iter(ref.trunks)))  # the least recently used
    return K.mean_kl(ref.full_logprobs, logprobs).item()


def sample_kls(model, refs: list[Reference], policies: list[str], budgets: list[int], settings: K.Settings) -> list[float]:
    """The calibration objective, per sample: continuation KL with every layer compressed by the plan."""
    plan = K.Plan(policies, budgets, settings=settings)
    return [plan_sample_kl(model, r, plan) if len(r.continuation) > 1 else 0.0 for r in refs]


def plan_kl(model, refs: list[Reference], policies: list[str], budgets: list[int], settings: K.Settings) -> float:
    """The calibration objective: mean continuation KL over samples."""
    return mean(sample_kls(model, refs, policies, budgets, settings))


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# -----------------------------------------------------------------------------
# The search: generic over the objective, so it can be tested on a synthetic one

Objective = Callable[[list[str], list[int]], list[float]]  # (policies, budgets) -> KL per calibration sample


def is_better(new: list[float], old: list[float], min_win_share: float) -> bool:
    """Keep a change only if it lowers the mean KL AND lowers it on more than `min_win_share` of
    the samples: a change that wins on average through one or two samples is fitted to them
    (routing chosen by the mean alone did worse than uniform on held-out samples)."""
    wins = sum(n < o for n, o in zip(new, old))
    return mean(new) < mean(old) and wins > min_win_share * len(new)


def layer_sensitivity(objective: Objective, n_layers: int, policy: str, budget: int, full_budget: int) -> list[float]:
    """KL with only layer l compressed (to `budget` with `policy`); every other layer keeps everything."""
    sens = []
    for layer in tqdm(range(n_layers), desc="sensitivity", leave=False):
        budgets = [full_budget] * n_layers
        budgets[layer] = budget
        sens.append(mean(objective([policy] * n_layers, budgets)))
    return sens


def search(objective: Objective, policies: list[str], budgets: list[int], order: list[int], *, route: bool,
           allocate: bool, candidates=CANDIDATES, quantum: int = 32, low: int = 32, high: int = 4096,
           max_evals: int = 200, max_sweeps: int = 3, min_win_share: float = 0.5,
           heads: int = 1) -> tuple[list[str], list[int], float, list[dict]]:
    """Coordinate descent over layers in `order` (most sensitive first).

    Routing tries every candidate policy for the layer (per KV head if heads > 1); allocation moves one quantum
    into the layer from the least sensitive layer that can give (last in `order`),
    and out of it to the most sensitive one that can take. A change is kept only if
    it `is_better`, so the result is never worse than the start. Returns the mean KL."""
    best = objective(policies, budgets)
    trace = [{"step": "start", "kl": mean(best)}]
    evals = 1

    def consider(new_policies, new_budgets, what) -> bool:
        nonlocal best, policies, budgets, evals
        if evals >= max_evals:
            return False
        evals += 1
        kls = objective(new_policies, new_budgets)
        if is_better(kls, best, min_win_share):
            best, policies, budgets = kls, new_policies, new_budgets
            trace.append({"step": what, "kl": mean(kls)})
            return True
        return False

    for sweep in range(max_sweeps):
        changed = False
        for layer in order:
            if route:
                for head in [None] if heads == 1 else range(heads):  # the whole layer, or one KV head at a time
                    for policy in candidates:
                        routed = K.reroute(policies, layer, policy, head, heads)
                        if routed != policies:
                            where = f"layer {layer}" + ("" if head is None else f" head {head}")
                            changed |= consider(routed, budgets, f"{where} -> {policy}")
            if allocate:
                donor = next((l for l in reversed(order) if K.move_budget(budgets, l, layer, quantum, low, high)), None)
                if donor is not None and consider(policies, K.move_budget(budgets, donor, layer, quantum, low, high),
                                                  f"+{quantum} to layer {layer} from {donor}"):
                    changed = True
                    continue
                taker = next((l for l in order if K.move_budget(budgets, layer, l, quantum, low, high)), None)
                if taker is not None:
                    changed |= consider(policies, K.move_budget(budgets, layer, taker, quantum, low, high),
                                        f"-{quantum} from layer {layer} to {taker}")
        if not changed or evals >= max_evals:
            break
    trace.append({"step": "end", "kl": mean(best), "evaluations": evals})
    return policies, budgets, mean(best), trace


# -----------------------------------------------------------------------------
# One calibration run: all stages for one target budget


def calibrate_budget(model, refs, val_refs, average: int, settings: K.Settings, model_name: str, ids: dict,
                     max_evals: int, quantum: int, min_win_share: float = 0.5,
                     sens_budget: int | None = None) -> tuple[dict[str, K.Plan], dict]:
    n = model.cfg.n_layers
    full_budget = max(r.cache.lengths[0] for r in refs)
    objective = lambda p, b: sample_kls(model, refs, p, b, settings)  # noqa: E731
    # a layer never needs more than the calibration prompts hold: budget above that would be unused
    low, high = settings.window, max(average, min(4 * average, full_budget), settings.window)

    uniform = {p: mean(objective([p] * n, [average] * n)) for p in CANDIDATES}
    print(f"[{average}] uniform KL: " + ", ".join(f"{p}={kl:.4f}" for p, kl in uniform.items()))
    best_policy = min(uniform, key=uniform.get)
    sens_budget = sens_budget or max(settings.window, average // 4)
    sensitivity = layer_sensitivity(objective, n, best_policy, sens_budget, full_budget)
    order = sorted(range(n), key=lambda l: -sensitivity[l])
    print(f"[{average}] sensitivity ({best_policy}@{sens_budget}): top layers {order[:5]}, max/median "
          f"{max(sensitivity) / max(sorted(sensitivity)[n // 2], 1e-12):.0f}x")

    start_p, start_b = [best_policy] * n, [average] * n
    seeded = K.sensitivity_budgets(sensitivity, average, low, high, quantum)
    seeded_kl = mean(objective(start_p, seeded))
    alloc_start = seeded if seeded_kl < uniform[best_policy] else start_b
    print(f"[{average}] sensitivity-seeded budgets: KL {seeded_kl:.4f} vs uniform {uniform[best_policy]:.4f}")

    common = dict(quantum=quantum, low=low, high=high, max_evals=max_evals, min_win_share=min_win_share)
    r_p, r_b, r_kl, r_trace = search(objective, start_p, start_b, order, route=True, allocate=False, **common)
    print(f"[{average}] routing only: KL {r_kl:.4f}")
    a_p, a_b, a_kl, a_trace = search(objective, start_p, alloc_start, order, route=False, allocate=True, **common)
    print(f"[{average}] allocation only: KL {a_kl:.4f}")
    # both: start from the best of the ablations and of their combination, then search both moves
    starts = [(r_kl, r_p, r_b), (a_kl, a_p, a_b), (mean(objective(r_p, a_b)), r_p, a_b)]
    _, s_p, s_b = min(starts, key=lambda s: s[0])
    p_p, p_b, p_kl, p_trace = search(objective, s_p, s_b, order, route=True, allocate=True, **common)
    print(f"[{average}] PolyKV (routing + allocation): KL {p_kl:.4f}")

    val_objective = lambda p, b: plan_kl(model, val_refs, p, b, settings) if val_refs else float("nan")  # noqa: E731
    results = {"polykv": (p_p, p_b, p_trace), "polykv_routing": (r_p, r_b, r_trace), "polykv_allocation": (a_p, a_b, a_trace)}
    table = {"uniform_kl": uniform, "best_uniform": best_policy, "sensitivity_policy": best_policy,
             "sensitivity_budget": sens_budget, "sensitivity": sensitivity,
             "best_uniform_validation_kl": val_objective(start_p, start_b)}
    plans = {}
    for name, (pol, bud, trace) in results.items():
        info = {"target_budget": average, **ids, "calibration": {
            **table, "search_trace": trace, "in_sample_kl": trace[-1]["kl"], "validation_kl": val_objective(pol, bud),
            "best_uniform_in_sample_kl": uniform[best_policy]}}
        plans[name] = K.Plan(pol, bud, name=name, model=model_name, settings=settings, info=info)
        print(f"[{average}] {name}: validation KL {info['calibration']['validation_kl']:.4f} "
              f"(best uniform {best_policy}: {table['best_uniform_validation_kl']:.4f})")
    return plans, table


def plot_plan(plan: K.Plan, sensitivity: list[float], path: Path) -> None:
    """Per-layer budget bars coloured by policy (a head-routed layer: one thin bar per KV head),
    with the layer sensitivity on a second axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(CANDIDATES + ("random",), plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(figsize=(10, 4))
    layers = range(len(plan.budgets))
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
    ax2 = ax.twinx()
    ax2.plot(layers, sensitivity, "k.-", label="sensitivity (KL, only this layer compressed)")
    ax2.set_yscale("log")
    ax2.set_ylabel("layer sensitivity (KL)")
    ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Samples, the cache of plans, and the command line


def calibration_samples(data_dir: Path | None, n_per_task: int, seed: int):
    """(tasks -> samples, prompts, calibration ids, the search/validation split). Synthetic without data."""
    if data_dir is None:
        by_task, prompts, _ = LB.synthetic_suite(n_per_task=n_per_task + 2, seed=seed, target_words=1200)
    else:
        prompts, _ = LB.load_config(data_dir)
        by_task = {t: LB.load_task(data_dir, t) for t in LB.available_tasks(data_dir)}
    calib_ids, _ = LB.dataset_split(by_task, n_per_task, seed)
    calib = set(calib_ids)
    # per task, the calibration samples alternate: search, validation, search, ...
    search_ids, val_ids = [], []
    for samples in by_task.values():
        task_ids = {s["_id"] for s in samples}
        mine = [i for i in calib_ids if i in task_ids]
        search_ids += mine[0::2]
        val_ids += mine[1::2]
    lookup = {s["_id"]: (t, s) for t, ss in by_task.items() for s in ss if s["_id"] in calib}
    return lookup, prompts, search_ids, val_ids


CALIBRATION_DEFAULTS = dict(n_per_task=2, n_continuation=32, max_evals=100, quantum=32, min_win_share=0.5, seed=0)


def settings_key(model_dir: Path, args: dict) -> str:
    """Plans are cached by model and every setting that changes them."""
    return hashlib.sha256(json.dumps({"model": Path(model_dir).name, **args}, sort_keys=True).encode()).hexdigest()[:10]


def run(model, tokenizer, model_dir: Path, budgets: list[int], data_dir: Path | None, out_dir: Path,
        max_length: int = 2048, n_per_task: int = 2, n_continuation: int = 32, max_evals: int = 100,
        quantum: int = 32, min_win_share: float = 0.5, seed: int = 0, settings: K.Settings | None = None) -> dict[int, dict[str, Path]]:
    """Calibrate every budget from ONE set of prefills; write the plans and their PNGs; return their paths."""
    settings = settings or K.Settings()
    model_name = Path(model_dir).name
    calib_settings = {"max_length": max_length, "n_per_task": n_per_task, "n_continuation": n_continuation,
                      "max_evals": max_evals, "quantum": quantum, "min_win_share": min_win_share, "seed": seed,
                      "data": str(data_dir) if data_dir else "synthetic"}
    paths = {b: done for b in budgets if (done := finished_plans(out_dir, b, model_name, calib_settings, settings))}
    if paths:
        print(f"already calibrated with these settings (kept): budgets {sorted(paths)} in {out_dir}")
    budgets = [b for b in budgets if b not in paths]
    if not budgets:
        return paths
    lookup, prompts, search_ids, val_ids = calibration_samples(data_dir, n_per_task, seed)
    t0 = time.perf_counter()
    refs, val_refs = build_references(model, tokenizer, model_dir, lookup, prompts, (search_ids, val_ids), max_length,
                                      n_continuation, settings.window)
    prefill_seconds = sum(r.prefill_seconds for r in refs + val_refs)
    ids = {"calibration_ids": search_ids, "validation_ids": val_ids, "calibration_settings": calib_settings}
    for average in budgets:
        plans, table = calibrate_budget(model, refs, val_refs, average, settings, model_name, ids, max_evals, quantum,
                                        min_win_share)
        paths[average] = {}
        for name, plan in plans.items():
            path = out_dir / f"budget{average}" / f"{name}.json"
            K.save_plan(plan, path)
            plot_plan(plan, table["sensitivity"], path.with_suffix(".png"))
            paths[average][name] = path
        routing = {p: plans["polykv"].policies.count(p) for p in CANDIDATES if p in plans["polykv"].policies}
        print(f"[{average}] wrote {out_dir / f'budget{average}'}: routing {routing}, budgets "
              f"{min(plans['polykv'].budgets)}..{max(plans['polykv'].budgets)}")
    total = time.perf_counter() - t0
    print(f"calibration took {total:.0f} s = {total / prefill_seconds:.1f}x the {prefill_seconds:.0f} s of prefilling "
          f"its {len(refs) + len(val_refs)} samples")
    return paths


def build_references(model, tokenizer, model_dir, lookup, prompts, id_lists, max_length, n_continuation, window):
    """One list of References per list of sample ids (search, validation)."""
    stop_ids = M.stop_token_ids(model_dir, tokenizer)
    bar = tqdm(total=sum(map(len, id_lists)), desc="prefill + FullKV reference")
    out = []
    for ids in id_lists:
        out.append([])
        for sid in ids:
            task, sample = lookup[sid]
            prompt = LB.prompt_ids(tokenizer, sample, prompts[task], max_length)
            out[-1].append(build_reference(model, prompt, sid, n_continuation, stop_ids, window))
            bar.update()
    bar.close()
    return out


def refine_heads(model, tokenizer, model_dir: Path, plan_dir: Path, budgets: list[int], data_dir: Path | None,
                 max_evals: int = 100) -> dict[int, Path]:
    """A lever experiment, head-level routing: start from each budget's calibrated PolyKV plan and let
    routing choose a policy per KV head (budgets kept), on the same search samples with the same
    majority rule; scored on the same validation samples. Writes budget<B>/polykv_heads.json."""
    done = {b: path for b in budgets if (path := Path(plan_dir) / f"budget{b}" / "polykv_heads.json").is_file()}
    if done:
        print(f"head-level routing already done (kept): budgets {sorted(done)}")
    parents = {b: K.load_plan(Path(plan_dir) / f"budget{b}" / "polykv.json", model.cfg.n_layers)
               for b in budgets if b not in done}
    if not parents:
        return done
    first = next(iter(parents.values()))
    cs = first.info["calibration_settings"]
    if any(p.info["calibration_settings"] != cs or p.settings != first.settings for p in parents.values()):
        raise ValueError(f"{plan_dir}: the plans of budgets {budgets} were calibrated with different settings")
    lookup, prompts, search_ids, val_ids = calibration_samples(data_dir, cs["n_per_task"], cs["seed"])
    if (search_ids, val_ids) != (first.info["calibration_ids"], first.info["validation_ids"]):
        raise ValueError(f"{plan_dir}: this data gives other calibration samples than the plans record (--data-dir?)")
    refs, val_refs = build_references(model, tokenizer, model_dir, lookup, prompts, (search_ids, val_ids),
                                      cs["max_length"], cs["n_continuation"], first.settings.window)
    objective = lambda p, b: sample_kls(model, refs, p, b, first.settings)  # noqa: E731
    heads, paths = model.cfg.n_kv_heads, dict(done)
    for b, parent in parents.items():
        cal = parent.info["calibration"]
        order = sorted(range(len(parent.policies)), key=lambda l: -cal["sensitivity"][l])
        pol, bud, kl, trace = search(objective, parent.policies, parent.budgets, order, route=True, allocate=False,
                                     max_evals=max_evals, min_win_share=cs["min_win_share"], heads=heads)
        val_kl = plan_kl(model, val_refs, pol, bud, first.settings)
        info = {**parent.info, "calibration": {**cal, "search_trace": trace, "in_sample_kl": kl, "validation_kl": val_kl,
                                               "refined_from": {"in_sample_kl": cal["in_sample_kl"],
                                                                "validation_kl": cal["validation_kl"]}}}
        plan = K.Plan(pol, bud, "polykv_heads", parent.model, parent.settings, info)
        paths[b] = Path(plan_dir) / f"budget{b}" / "polykv_heads.json"
        K.save_plan(plan, paths[b])
        plot_plan(plan, cal["sensitivity"], paths[b].with_suffix(".png"))
        print(f"[{b}] head-level routing: {sum('/' in p for p in pol)} layers split by head; in-sample KL "
              f"{cal['in_sample_kl']:.4f} -> {kl:.4f}, validation KL {cal['validation_kl']:.4f} -> {val_kl:.4f}")
    return paths


def finished_plans(out_dir: Path, budget: int, model_name: str, calib_settings: dict, settings: K.Settings):
    """The three plan paths of an earlier run with the same model and settings, else None:
    an interrupted multi-budget run resumes at the first budget it had not written."""
    paths = {n: Path(out_dir) / f"budget{budget}" / f"{n}.json" for n in PLAN_NAMES}
    if not all(p.is_file() for p in paths.values()):
        return None
    plans = [K.load_plan(p) for p in paths.values()]
    same = all(p.model == model_name and p.settings == settings and p.info.get("calibration_settings") == calib_settings
               for p in plans)
    return paths if same else None


def ensure_plans(model, tokenizer, model_dir, budgets, data_dir, max_length=2048, settings=None,
                 root: Path = ROOT / "plans", **kw) -> dict[int, dict[str, Path]]:
    """Plans for these budgets, calibrated on first use and cached by model and settings."""
    settings = settings or K.Settings()
    # the key holds no path, so committed plans are found on any machine; evaluation excludes
    # whatever ids a plan records, whichever LongBench folder it was calibrated on
    key = settings_key(model_dir, {"max_length": max_length, "settings": asdict(settings),
                                   "data": "longbench" if data_dir else "synthetic", **CALIBRATION_DEFAULTS, **kw})
    out_dir = Path(root) / Path(model_dir).name / key
    missing = [b for b in budgets if not all((out_dir / f"budget{b}" / f"{n}.json").exists() for n in PLAN_NAMES)]
    if missing:
        print(f"calibrating PolyKV for budgets {missing} (cached in {out_dir})")
        run(model, tokenizer, model_dir, missing, data_dir, out_dir, max_length, settings=settings, **kw)
    return {b: {n: out_dir / f"budget{b}" / f"{n}.json" for n in PLAN_NAMES} for b in budgets}


def summarize(plan_dir: Path) -> str:
    """A markdown table of every calibrated budget under plan_dir, read back from the plan JSONs."""
    rows = ["| budget | plan | routing (layers per policy) | budgets | in-sample KL | validation KL |", "|---" * 6 + "|"]
    for budget_dir in sorted(Path(plan_dir).glob("budget*"), key=lambda p: int(p.name[6:])):
        names = PLAN_NAMES + ("polykv_heads",)  # the last only after a --head-routing run
        plans = {n: K.load_plan(budget_dir / f"{n}.json") for n in names if (budget_dir / f"{n}.json").is_file()}
        if not plans:
            continue
        cal = next(iter(plans.values())).info["calibration"]
        rows.append(f"| {budget_dir.name[6:]} | uniform {cal['best_uniform']} | all {cal['best_uniform']} | "
                    f"{budget_dir.name[6:]} everywhere | {cal['best_uniform_in_sample_kl']:.4f} | "
                    f"{cal['best_uniform_validation_kl']:.4f} |")
        for name, plan in plans.items():
            routing = ", ".join(f"{plan.policies.count(p)} {p}" for p in CANDIDATES if p in plan.policies)
            split = sum("/" in p for p in plan.policies)
            routing += f", {split} split by KV head" if split else ""
            c = plan.info["calibration"]
            rows.append(f"| | {name} | {routing} | {min(plan.budgets)} … {max(plan.budgets)} | "
                        f"{c['in_sample_kl']:.4f} | {c['validation_kl']:.4f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="PolyKV offline calibration -> plan JSON (+ PNG) per budget.")
    p.add_argument("--budget", type=int, default=None, help="target average budget (tokens per KV head per layer)")
    p.add_argument("--budgets", type=int, nargs="+", default=None)
    p.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data-dir", default=None, help="LongBench folder (default: $LONGBENCH_DIR, data/LongBench, else synthetic)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: plans/<model>/<settings hash>)")
    p.add_argument("--max-length", type=int, default=2048, help="prompts are middle-truncated to this many tokens")
    p.add_argument("--n-per-task", type=int, default=2, help="calibration samples per task (half search, half validation)")
    p.add_argument("--n-continuation", type=int, default=32)
    p.add_argument("--max-evals", type=int, default=100, help="objective evaluations per search")
    p.add_argument("--quantum", type=int, default=32, help="tokens moved per allocation step")
    p.add_argument("--min-win-share", type=float, default=0.5,
                   help="keep a change only if it lowers the KL on more than this share of samples (0 = mean only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--head-routing", action="store_true",
                   help="lever experiment: refine the PolyKV plans in --out to one policy per KV head (polykv_heads.json)")
    p.add_argument("--summary", type=Path, default=None, metavar="PLAN_DIR",
                   help="print the calibration table of the plans under PLAN_DIR (e.g. plans/<model>) and exit")
    args = p.parse_args(argv)
    if args.summary:
        print(summarize(args.summary))
        return
    budgets = args.budgets or [args.budget or 512]
    model_dir = args.model or M.default_model_dir()
    model = M.load_model(model_dir, args.device)
    tokenizer = M.load_tokenizer(model_dir)
    data_dir = LB.find_data_dir(args.data_dir, ROOT)
    if data_dir is None:
        print("NOTE: no LongBench folder found: calibrating on the built-in SYNTHETIC suite")
    if args.head_routing:
        if not args.out:
            raise ValueError("--head-routing refines the plans in --out PLAN_DIR: give --out")
        refine_heads(model, tokenizer, model_dir, args.out, budgets, data_dir, args.max_evals)
        return
    kw = dict(n_per_task=args.n_per_task, n_continuation=args.n_continuation, max_evals=args.max_evals,
              quantum=args.quantum, min_win_share=args.min_win_share, seed=args.seed)
    if args.out:
        run(model, tokenizer, model_dir, budgets, data_dir, args.out, args.max_length, **kw)
    else:
        ensure_plans(model, tokenizer, model_dir, budgets, data_dir, args.max_length, **kw)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
