"""
PolyKV: every layer gets its own eviction policy and its own token budget.

The paper's two ideas, as they appear in this file:
- routing (the paper's per-layer *eviction preference*): `plan.policies[l]`, which scoring
  policy decides what layer l keeps; `route()` picks it;
- allocation (the paper's per-layer *cache sensitivity*): `plan.budgets[l]`, how many tokens
  layer l keeps per KV head, with sum(budgets) == n_layers * average budget; `allocate()` sets it.
Both are chosen offline (calibrate.py) and frozen into a JSON plan. This file joins model.py
(the cache) and policies.py (the scores): the list of methods, plans (uniform, PyramidKV,
JSON with validation, where committed plans live), the statistics gathered during one
prefill, `apply_plan` to a copy of the prefilled cache, the end-to-end KL objective, and the
calibration's building blocks (route, allocate, and the search's moves).

Reference: PolyKV (arXiv 2606.15157); PyramidKV (Cai et al. 2024) for the pyramid schedule.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import model as M
import policies as P

PLANS_DIR = Path(__file__).resolve().parent / "plans"  # committed plans: plans/<model>/budget<B>/<name>.json
DEFAULT_BUDGET = 512  # tokens kept per KV head per layer, on average, when no budget is asked for
CANDIDATES = tuple(p for p in P.SCORERS if p != "random")  # routing candidates: random is the floor, not a choice
FIRST_CANDIDATES = ("streamingllm", "h2o", "snapkv", "tova", "knorm")  # the candidates before KeyDiff was added
BASELINES = tuple(P.SCORERS) + ("pyramidkv",)  # every single policy, and PyramidKV's schedule with SnapKV
POLYKV = ("polykv", "polykv_routing", "polykv_allocation")  # PolyKV and its two ablations
POLYKV_HEADS = "polykv_heads"  # a lever: one policy per KV head (calibration_study.py --head-routing); run when asked
PLAN_METHODS = POLYKV + (POLYKV_HEADS,)  # methods whose plan is read from a file (any other "polykv*" name may be
METHODS = ("fullkv",) + BASELINES + PLAN_METHODS  # given to one, e.g. polykv_ruler for a plan calibrated on RULER)
DEFAULT_METHODS = ("fullkv",) + BASELINES + POLYKV

# -----------------------------------------------------------------------------
# Plans


@dataclass
class Plan:
    """A per-layer (policy, budget) list: the frozen output of calibration."""
    policies: list[str]
    budgets: list[int]
    name: str = ""
    model: str = ""
    settings: P.Settings = field(default_factory=P.Settings)
    info: dict = field(default_factory=dict)  # calibration ids, signals, validation ...

    @property
    def average_budget(self) -> float:
        return sum(self.budgets) / len(self.budgets)


def head_policies(policy: str, n_kv: int | None = None) -> list[str]:
    """A layer's policy per KV head. "snapkv" routes the whole layer (every head alike);
    "snapkv/tova/h2o" is head-level routing: one policy per KV head, in head order."""
    parts = policy.split("/")
    return parts * n_kv if n_kv is not None and len(parts) == 1 else parts


def layer_policy(per_head: list[str]) -> str:
    """The inverse of head_policies: one name when every head agrees."""
    return per_head[0] if len(set(per_head)) == 1 else "/".join(per_head)


def h2o_layers(plan: Plan) -> list[int]:
    """Layers whose plan needs H2O's attention column sums from the prefill (a head or the whole layer)."""
    return [l for l, p in enumerate(plan.policies) if "h2o" in head_policies(p)]


def uniform_plan(n_layers: int, policy: str, budget: int, settings: P.Settings | None = None) -> Plan:
    return Plan([policy] * n_layers, [budget] * n_layers, name=policy, settings=settings or P.Settings())


def pyramid_budgets(n_layers: int, budget: int, window: int, beta: int = 20) -> list[int]:
    """PyramidKV's linear schedule: most budget in the lowest layer, least in the top one.

    The part above the window goes from (budget-window)*(2 - 1/beta) down to
    (budget-window)/beta, so the mean stays `budget`; rounding is repaired so the
    total is exactly n_layers * budget."""
    if n_layers == 1:
        return [budget]
    free = budget - window
    low, high = free / beta, free * 2 - free / beta
    raw = [high - (high - low) * l / (n_layers - 1) + window for l in range(n_layers)]
    budgets = [int(b) for b in raw]
    for l in sorted(range(n_layers), key=lambda l: raw[l] - budgets[l], reverse=True)[: n_layers * budget - sum(budgets)]:
        budgets[l] += 1  # largest remainders first
    return budgets


def pyramid_plan(n_layers: int, budget: int, settings: P.Settings | None = None, beta: int = 20) -> Plan:
    settings = settings or P.Settings()
    return Plan(["snapkv"] * n_layers, pyramid_budgets(n_layers, budget, settings.window, beta),
                name="pyramidkv", settings=settings)


def baseline_plan(method: str, n_layers: int, budget: int, settings: P.Settings) -> Plan:
    """The plan of a baseline method at an average budget: one policy everywhere, or PyramidKV."""
    if method == "pyramidkv":
        return pyramid_plan(n_layers, budget, settings)
    return uniform_plan(n_layers, method, budget, settings)


def validate_plan(plan: Plan, n_layers: int, average: int | None = None, n_kv: int | None = None,
                  source: str = "plan") -> None:
    """Clear errors naming the layer: wrong layer count, unknown policy, a head-routed policy naming the
    wrong number of KV heads, budget below the window, wrong total."""
    if len(plan.policies) != n_layers or len(plan.budgets) != n_layers:
        raise ValueError(f"{source}: has {len(plan.policies)} policies and {len(plan.budgets)} budgets, the model has {n_layers} layers")
    for layer, (policy, budget) in enumerate(zip(plan.policies, plan.budgets)):
        if not isinstance(policy, str) or any(p not in P.SCORERS for p in head_policies(policy)):
            raise ValueError(f"{source}: layer {layer}: unknown policy {policy!r} (known: {', '.join(P.SCORERS)}; "
                             "one per KV head joined by '/' for head-level routing)")
        if n_kv is not None and "/" in policy and len(head_policies(policy)) != n_kv:
            raise ValueError(f"{source}: layer {layer}: policy {policy!r} names {len(head_policies(policy))} KV heads, "
                             f"the model has {n_kv}")
        if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
            raise ValueError(f"{source}: layer {layer}: budget must be a positive integer, got {budget!r}")
        if budget < plan.settings.window:
            raise ValueError(f"{source}: layer {layer}: budget {budget} is smaller than the observation window {plan.settings.window}")
    if average is not None and sum(plan.budgets) != n_layers * average:
        raise ValueError(f"{source}: budgets sum to {sum(plan.budgets)}, but an average of {average} over {n_layers} layers needs {n_layers * average}")


def budget_dir(plan_dir: str | Path, budget: int) -> Path:
    """The one plan folder layout: <plan_dir>/budget<B>/<name>.json, with plan_dir = plans/<model>
    for the committed plans (PLANS_DIR / model name)."""
    return Path(plan_dir) / f"budget{budget}"


def plan_path(plan_dir: str | Path, budget: int, name: str) -> Path:
    """<plan_dir>/budget<B>/<name>.json"""
    return budget_dir(plan_dir, budget) / f"{name}.json"


def budget_dirs(plan_dir: str | Path) -> dict[int, Path]:
    """{budget: folder} for every budget<B> folder in plan_dir, by budget (a folder such as
    budget512_old is not one: its plans would pass for budget 512's)."""
    named = ((re.fullmatch(r"budget([0-9]+)", d.name), d) for d in Path(plan_dir).glob("budget*") if d.is_dir())
    return dict(sorted((int(m[1]), d) for m, d in named if m))


def save_plan(plan: Plan, path: str | Path) -> None:
    """Write atomically: a crash never leaves half a plan."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    layers = [{"layer": l, "policy": p, "budget": b} for l, (p, b) in enumerate(zip(plan.policies, plan.budgets))]
    doc = {"name": plan.name, "model": plan.model, "average_budget": plan.average_budget,
           "settings": asdict(plan.settings), "layers": layers, **plan.info}
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def load_plan(path: str | Path, n_layers: int | None = None, n_kv: int | None = None) -> Plan:
    """Read a plan JSON. Layers are placed by their "layer" field, which must number them 0..n-1."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        layers = sorted(doc["layers"], key=lambda d: d["layer"])
        numbers = [d["layer"] for d in layers]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable plan ({type(e).__name__}: {e})") from None
    if numbers != list(range(len(layers))):
        raise ValueError(f"{path}: the layers' 'layer' fields must number them 0..{len(layers) - 1} once each, got {numbers}")
    try:
        settings = P.recorded_settings(doc["settings"]) if "settings" in doc else P.Settings()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    info = {k: v for k, v in doc.items() if k not in ("name", "model", "average_budget", "settings", "layers")}
    plan = Plan([d.get("policy") for d in layers], [d.get("budget") for d in layers], doc.get("name", path.stem),
                doc.get("model", ""), settings, info)
    validate_plan(plan, n_layers if n_layers is not None else len(layers), n_kv=n_kv, source=str(path))
    return plan


def calibration_settings(info: dict) -> dict | None:
    """The calibration settings a plan's (or a study's) record holds (None for a plan written by hand).
    Calibrations run before a setting existed ran with its first value, and are read so here:
    query-aware, each layer's budget at most 4x the average, fitted at span 1, no span step, routes
    not confirmed, routed among the policies its uniform step scored (the first five, for a study), a
    sample's KL the mean over its tokens."""
    recorded = info.get("calibration_settings")
    scored = list(info.get("calibration", {}).get("uniform_kl", FIRST_CANDIDATES))
    return None if recorded is None else {"query": "aware", "max_ratio": 4.0, "span": 1, "spans": [1],
                                          "confirm_routing": False, "candidates": scored, "token_kl": "mean",
                                          **recorded}


def is_plan_method(method: str) -> bool:
    """PolyKV and its variants: every method whose per-layer plan comes from a calibration."""
    return method.startswith("polykv")


def load_model_plan(path: Path, model_name: str, cfg: M.Config) -> Plan:
    """A PolyKV plan for THIS model: its name, model, layers and KV heads are checked."""
    plan = load_plan(path, cfg.n_layers, cfg.n_kv_heads)
    if not plan.model:
        raise ValueError(f"{path}: the plan does not say which model it was calibrated for (no 'model' key)")
    if plan.model != model_name:
        raise ValueError(f"{path}: plan is for model {plan.model!r}, not {model_name!r}; calibrate this model")
    if not is_plan_method(plan.name):
        raise ValueError(f"{path}: plan name {plan.name!r} does not start with 'polykv' (e.g. {', '.join(PLAN_METHODS)})")
    if plan.average_budget != int(plan.average_budget):
        raise ValueError(f"{path}: average budget {plan.average_budget} is not an integer")
    return plan


def committed_plans(model_name: str, cfg: M.Config) -> dict[tuple[str, int], Plan]:
    """Every committed plan of a model (plans/<model>/budget<B>/<name>.json), at any budget: {(name, budget): plan}."""
    paths = [path for b in budget_dirs(PLANS_DIR / model_name) for n in PLAN_METHODS
             if (path := plan_path(PLANS_DIR / model_name, b, n)).is_file()]
    plans = [load_model_plan(p, model_name, cfg) for p in paths]
    return {(p.name, int(p.average_budget)): p for p in plans}


# -----------------------------------------------------------------------------
# Statistics gathered during the one prefill, and applying a plan to its cache


def prefill_with_stats(model: M.Transformer, tokens: torch.Tensor, window: int, h2o_layers=None,
                       chunk_size: int | None = None) -> tuple[torch.Tensor, M.KVCache, list[P.LayerStats]]:
    """One full-attention prefill that also keeps what the scorers need, per layer: the last
    `window` queries, and H2O's attention column sums in `h2o_layers` (None = all). The sums are
    computed beside the forward from the layer's q and k, a chunk of queries at a time; they cost
    a second softmax over the prompt, so layers that do not need them skip it."""
    n = model.cfg.n_layers
    h2o_layers = set(range(n)) if h2o_layers is None else set(h2o_layers)
    stats = [P.LayerStats(layer, None) for layer in range(n)]

    def observe(layer: int, q: torch.Tensor, k_all: torch.Tensor) -> None:
        s, prev = stats[layer], stats[layer].window_queries
        # a copy, not a view: a view would keep the whole (B, nh, T, hd) queries alive
        s.window_queries = (q if prev is None else torch.cat([prev, q], dim=2))[:, :, -window:].clone()  # (B, nh, W, hd)
        if layer in h2o_layers:
            s.attn_sum = P.accumulate_column_sums(s.attn_sum, P.attention_column_sums(q, k_all))  # (B, nh, L)

    logits, cache = M.prefill(model, tokens, observe, chunk_size)
    return logits, cache, stats


def apply_plan(cache: M.KVCache, stats: list[P.LayerStats], plan: Plan, room: int = 64,
               score_memo: dict | None = None) -> M.KVCache:
    """A new compressed cache; the full cache is left untouched so other plans can reuse it.

    A layer keeps `budget` tokens per KV head; a prompt no longer than its budget is left
    whole. Scores do not depend on the budget, so a caller applying many plans to one
    prefill (calibration) can pass a dict to memoize them per (layer, policy, settings). Selection is
    per KV head, so a head-routed layer simply takes each head's row from its own policy."""
    out = M.KVCache(len(cache.lengths))
    memo = {} if score_memo is None else score_memo
    for layer, (policy, budget) in enumerate(zip(plan.policies, plan.budgets)):
        out.set_layer(layer, *compress_layer(cache, stats[layer], policy, budget, plan.settings, memo), room)
    out.next_pos = cache.next_pos  # generated tokens continue from the prompt length
    return out


def compress_layer(cache: M.KVCache, stats: P.LayerStats, policy: str, budget: int, settings: P.Settings,
                   memo: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's kept keys and values (B, n_kv, min(budget, T), hd) under a policy."""
    k, v = cache.keys(stats.layer), cache.values(stats.layer)  # (B, n_kv, T, hd)
    if k.shape[2] <= budget:
        return k, v
    scores = P.pool_span(layer_scores(k, stats, policy, settings, memo), settings.span, settings.window)  # (B, n_kv, T)
    return P.gather_kv(k, v, P.select_indices(scores, budget, settings.window))


def layer_scores(keys: torch.Tensor, stats: P.LayerStats, policy: str, settings: P.Settings, memo: dict) -> torch.Tensor:
    """One layer's scores (B, n_kv, T) under a policy, or one policy per KV head; memoized per (layer, policy, settings)."""
    names = head_policies(policy, keys.shape[1])  # one per KV head
    if len(names) != keys.shape[1]:
        raise ValueError(f"layer {stats.layer}: policy {policy!r} names {len(names)} heads, the model has {keys.shape[1]} KV heads")
    settings = replace(settings, span=1)  # the span pools the scores afterwards: one memo entry for every span
    for name in set(names):
        if (stats.layer, name, settings) not in memo:
            memo[stats.layer, name, settings] = P.SCORERS[name](keys, stats, settings)  # (B, n_kv, T)
    if len(set(names)) == 1:
        return memo[stats.layer, names[0], settings]
    return torch.stack([memo[stats.layer, name, settings][:, h] for h, name in enumerate(names)], dim=1)  # (B, n_kv, T)


def generate_with_plan(model: M.Transformer, tokens: torch.Tensor, plan: Plan | None, max_new_tokens: int,
                       stop_ids=()) -> list[int]:
    """Prefill, compress with `plan` (None = FullKV), then greedy decoding."""
    window = (plan.settings if plan else P.Settings()).window
    logits, cache, stats = prefill_with_stats(model, tokens, window, h2o_layers(plan) if plan else ())
    if plan is not None:
        cache = apply_plan(cache, stats, plan, room=max_new_tokens)
    return M.generate(model, cache, logits, max_new_tokens, stop_ids)


def plan_kv_bytes(plan: Plan, prompt_len: int, cfg: M.Config, bytes_per_value: int = 4) -> int:
    """What a plan's cache holds for a prompt of `prompt_len` tokens (before generation)."""
    kept = sum(min(b, prompt_len) for b in plan.budgets)
    return 2 * kept * cfg.n_kv_heads * cfg.head_dim * bytes_per_value


# -----------------------------------------------------------------------------
# The calibration objective: end-to-end KL to FullKV on FullKV's own continuation


def teacher_forced_logprobs(model: M.Transformer, cache: M.KVCache, continuation: torch.Tensor) -> torch.Tensor:
    """Log-probs (N-1, V) for continuation[1:] given the prompt (in `cache`) and continuation[:-1].

    The first continuation token was predicted by the prefill itself, which compression
    does not change, so it carries no signal and is not fed back."""
    logits = M.forward(model, continuation[None, :-1], cache)[0]  # (N-1, V)
    return F.log_softmax(logits.float(), dim=-1)


def token_kls(full_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(full || compressed) of next-token distributions, summed over the vocabulary, at each
    position: (..., N, V) log-probs -> (..., N)."""
    return F.kl_div(logprobs, full_logprobs.expand_as(logprobs), log_target=True, reduction="none").sum(-1)


def mean_kl(full_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """token_kls averaged over positions: (..., N, V) log-probs -> (...,). The evaluation's tf KL, and
    the calibration objective's sample KL (objective.scored_kl, unless it takes the worst token)."""
    return token_kls(full_logprobs, logprobs).mean(-1)


def continuation_kl(full_logprobs: torch.Tensor, model: M.Transformer, compressed: M.KVCache,
                    continuation: torch.Tensor) -> float:
    """Mean over the continuation of KL(full || compressed) of the next-token distributions.

    Appends to `compressed`: pass a cache you do not need afterwards (apply_plan makes a new one)."""
    if continuation.numel() < 2:
        return 0.0
    return mean_kl(full_logprobs, teacher_forced_logprobs(model, compressed, continuation)).item()


# -----------------------------------------------------------------------------
# Calibration: the paper's two ideas, and the moves of the optional search

LayerKL = Callable[[int, str, int], float]  # (layer, policy, budget) -> KL with only that layer compressed


def route(layer_kl: LayerKL, budgets: list[int], candidates=CANDIDATES, prefer: str | None = None) -> list[str]:
    """Routing, from each layer's *eviction preference*: layer l takes the candidate policy with
    the lowest end-to-end KL to FullKV when only layer l is compressed, at its own budget
    (every other layer keeps everything), averaged over the calibration samples.

    Equal KLs go to `prefer` (the calibration passes its best uniform policy). They happen where
    a layer's budget is at least the calibration prompts' length: nothing is evicted, so every
    candidate scores the same, yet on a longer prompt that layer does evict, and the candidate
    that merely comes first in the list (StreamingLLM) may be the worst choice there."""
    ranked = sorted(candidates, key=lambda p: p != prefer)  # `prefer` first: min keeps the first of equals
    return [min(ranked, key=lambda p: layer_kl(layer, p, budget)) for layer, budget in enumerate(budgets)]


def sensitivity(layer_kl: LayerKL, policies: list[str], budget: int) -> list[float]:
    """Each layer's *cache sensitivity*: the KL when only that layer is compressed to a small
    `budget` under its policy. A layer that barely changes the output can give budget away."""
    return [layer_kl(layer, policy, budget) for layer, policy in enumerate(policies)]


def allocate(sensitivity: list[float], average: int, low: int, high: int, quantum: int = 8) -> list[int]:
    """Allocation from cache sensitivity: budget in proportion to sqrt(sensitivity), within
    [low, high], rounded to quanta, summing to exactly n_layers * average. (The square root
    tempers sensitivities that span orders of magnitude: linear shares starve most layers.)"""
    n = len(sensitivity)
    weights = torch.tensor(sensitivity, dtype=torch.float64).clamp_min(1e-12).sqrt()
    total = n * average
    free = total - n * low
    raw = (low + free * weights / weights.sum()).clamp(low, high)
    for _ in range(50):  # clamping spills budget: hand it back to the unclamped layers
        spill = total - raw.sum().item()
        open_ = (raw < high) & (raw > low) if spill < 0 else raw < high
        if abs(spill) < 1e-6 or not open_.any():
            break
        raw[open_] += spill * weights[open_] / weights[open_].sum()
        raw = raw.clamp(low, high)
    budgets = [min(max(int(low + quantum * round((b - low) / quantum)), low), high) for b in raw.tolist()]
    order = sorted(range(n), key=lambda l: -weights[l].item())
    i = 0
    while sum(budgets) != total and i < 100 * n:  # repair the rounding, one token at a time
        l, step = order[i % n], 1 if sum(budgets) < total else -1
        if low <= budgets[l] + step <= high:
            budgets[l] += step
        i += 1
    return budgets


def move_budget(budgets: list[int], src: int, dst: int, quantum: int, low: int, high: int) -> list[int] | None:
    """A search move (allocation): `quantum` tokens from layer src to layer dst.

    The total never changes; returns None if either layer would leave [low, high]."""
    if src == dst or budgets[src] - quantum < low or budgets[dst] + quantum > high:
        return None
    moved = list(budgets)
    moved[src] -= quantum
    moved[dst] += quantum
    return moved


def reroute(policies: list[str], layer: int, policy: str, head: int | None = None, n_kv: int = 1) -> list[str]:
    """A search move (routing): layer `layer` (or only its KV head `head`, of n_kv) switches to `policy`."""
    routed = list(policies)
    if head is None:
        routed[layer] = policy
    else:
        per_head = head_policies(policies[layer], n_kv)
        per_head[head] = policy
        routed[layer] = layer_policy(per_head)
    return routed
