"""
PolyKV: every layer gets its own eviction policy and its own token budget.

The paper's two ideas, as they appear in this file:
- routing: `plan.policies[l]` - which scoring policy decides what layer l keeps;
- allocation: `plan.budgets[l]` - how many tokens layer l keeps per KV head,
  with sum(budgets) == n_layers * average budget.
Both are chosen offline by calibrate.py and frozen into a JSON plan. This file
joins model.py (the cache) and policies.py (the scores): it builds plans
(uniform, PyramidKV), collects the statistics scorers need during one prefill,
applies a plan to a copy of the prefilled cache, and provides the calibration
objective (end-to-end KL to FullKV) and the budget moves the search makes.

Reference: PolyKV (arXiv 2606.15157); PyramidKV (Cai et al. 2024) for the
pyramid schedule.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import model as M
import policies as P

# -----------------------------------------------------------------------------
# Settings and plans


@dataclass
class Settings:
    """Hyperparameters shared by every policy (DESIGN.md defaults)."""
    window: int = 32  # observation window: the last prompt tokens, always kept, counted in the budget
    kernel: int = 7  # SnapKV score pooling kernel
    pooling: str = "max"  # SnapKV pooling kind: "max" or "avg"
    sinks: int = 4  # StreamingLLM attention sinks
    agg: str = "mean"  # how a KV head aggregates its query heads' scores: "mean" or "max"
    seed: int = 0  # Random policy


@dataclass
class Plan:
    """A per-layer (policy, budget) list: the frozen output of calibration."""
    policies: list[str]
    budgets: list[int]
    name: str = ""
    model: str = ""
    settings: Settings = field(default_factory=Settings)
    info: dict = field(default_factory=dict)  # calibration ids, tables, search trace ...

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


def uniform_plan(n_layers: int, policy: str, budget: int, settings: Settings | None = None) -> Plan:
    return Plan([policy] * n_layers, [budget] * n_layers, name=f"{policy}", settings=settings or Settings())


def pyramid_budgets(n_layers: int, budget: int, window: int = 32, beta: int = 20) -> list[int]:
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


def pyramid_plan(n_layers: int, budget: int, settings: Settings | None = None, beta: int = 20) -> Plan:
    settings = settings or Settings()
    return Plan(["snapkv"] * n_layers, pyramid_budgets(n_layers, budget, settings.window, beta),
                name="pyramidkv", settings=settings)


def validate_plan(plan: Plan, n_layers: int, average: int | None = None, source: str = "plan") -> None:
    """Clear errors naming the layer: wrong layer count, unknown policy, budget below the window, wrong total."""
    if len(plan.policies) != n_layers or len(plan.budgets) != n_layers:
        raise ValueError(f"{source}: has {len(plan.policies)} policies and {len(plan.budgets)} budgets, the model has {n_layers} layers")
    for layer, (policy, budget) in enumerate(zip(plan.policies, plan.budgets)):
        if not isinstance(policy, str) or any(p not in P.POLICY_NAMES for p in head_policies(policy)):
            raise ValueError(f"{source}: layer {layer}: unknown policy {policy!r} (known: {', '.join(P.POLICY_NAMES)}; "
                             "one per KV head joined by '/' for head-level routing)")
        if not isinstance(budget, int) or budget <= 0:
            raise ValueError(f"{source}: layer {layer}: budget must be a positive integer, got {budget!r}")
        if budget < plan.settings.window:
            raise ValueError(f"{source}: layer {layer}: budget {budget} is smaller than the observation window {plan.settings.window}")
    if average is not None and sum(plan.budgets) != n_layers * average:
        raise ValueError(f"{source}: budgets sum to {sum(plan.budgets)}, but an average of {average} over {n_layers} layers needs {n_layers * average}")


def save_plan(plan: Plan, path: str | Path) -> None:
    """Write atomically: a crash never leaves half a plan."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    layers = [{"layer": l, "policy": p, "budget": b} for l, (p, b) in enumerate(zip(plan.policies, plan.budgets))]
    doc = {"name": plan.name, "model": plan.model, "average_budget": plan.average_budget,
           "settings": asdict(plan.settings), "layers": layers, **plan.info}
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def load_plan(path: str | Path, n_layers: int | None = None) -> Plan:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        layers = doc["layers"]
        settings = Settings(**doc.get("settings", {}))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a readable plan ({type(e).__name__}: {e})") from None
    info = {k: v for k, v in doc.items() if k not in ("name", "model", "average_budget", "settings", "layers")}
    plan = Plan([d.get("policy") for d in layers], [d.get("budget") for d in layers], doc.get("name", path.stem),
                doc.get("model", ""), settings, info)
    validate_plan(plan, n_layers if n_layers is not None else len(layers), source=str(path))
    return plan


# -----------------------------------------------------------------------------
# Statistics gathered during the one prefill


@dataclass
class PrefillStats:
    window_queries: list  # per layer (B, nh, W, hd): the last W post-RoPE prompt queries (SnapKV, TOVA)
    attn_sum: list  # per layer (B, nh, T) or None: attention each key received from all prompt queries (H2O)


def prefill_with_stats(model: M.Transformer, tokens: torch.Tensor, window: int = 32, h2o_layers=None,
                       chunk_size: int = 512) -> tuple[torch.Tensor, M.KVCache, PrefillStats]:
    """One full-attention prefill that also keeps what the scorers need.

    h2o_layers: layers whose H2O column sums to accumulate (None = all). They cost a
    second (B, nh, C, L) softmax per chunk, so layers that do not need them skip it."""
    n = model.cfg.n_layers
    h2o_layers = set(range(n)) if h2o_layers is None else set(h2o_layers)
    stats = PrefillStats([None] * n, [None] * n)

    def observe(layer: int, q: torch.Tensor, k_all: torch.Tensor) -> None:
        prev = stats.window_queries[layer]
        recent = q if prev is None else torch.cat([prev, q], dim=2)
        stats.window_queries[layer] = recent[:, :, -window:]
        if layer in h2o_layers:
            stats.attn_sum[layer] = P.accumulate_column_sums(stats.attn_sum[layer], P.attention_column_sums(q, k_all))

    logits, cache = M.prefill(model, tokens, chunk_size=chunk_size, observe=observe)
    return logits, cache, stats


# -----------------------------------------------------------------------------
# Applying a plan to a prefilled cache


def layer_scores(policy: str, keys: torch.Tensor, stats: PrefillStats, layer: int, s: Settings) -> torch.Tensor:
    """The named policy's scores for one layer: (B, n_kv, T)."""
    hparams = {"streamingllm": {"sinks": s.sinks}, "h2o": {"agg": s.agg},
               "snapkv": {"kernel": s.kernel, "pooling": s.pooling, "agg": s.agg},
               "tova": {"agg": s.agg}, "knorm": {}, "random": {"seed": s.seed + layer}}[policy]
    return P.score_tokens(policy, keys, stats.window_queries[layer], stats.attn_sum[layer], **hparams)


def apply_plan(cache: M.KVCache, stats: PrefillStats, plan: Plan, room: int = 64,
               score_memo: dict | None = None) -> M.KVCache:
    """A new compressed cache; the full cache is left untouched so other plans can reuse it.

    A layer keeps `budget` tokens per KV head; a prompt no longer than its budget is left
    whole. Scores do not depend on the budget, so a caller applying many plans to one
    prefill (calibration) can pass a dict to memoize them per (layer, policy). Selection is
    per KV head, so a head-routed layer simply takes each head's row from its own policy."""
    out = M.KVCache(len(cache.lengths))
    memo = {} if score_memo is None else score_memo
    for layer, (policy, budget) in enumerate(zip(plan.policies, plan.budgets)):
        k, v = cache.keys(layer), cache.values(layer)  # (B, n_kv, T, hd)
        if k.shape[2] > budget:
            names = head_policies(policy, k.shape[1])  # one per KV head
            if len(names) != k.shape[1]:
                raise ValueError(f"layer {layer}: policy {policy!r} names {len(names)} heads, the model has {k.shape[1]} KV heads")
            for name in set(names):
                if (layer, name) not in memo:
                    memo[layer, name] = layer_scores(name, k, stats, layer, plan.settings)  # (B, n_kv, T)
            scores = memo[layer, names[0]] if len(set(names)) == 1 else torch.stack(
                [memo[layer, name][:, h] for h, name in enumerate(names)], dim=1)  # (B, n_kv, T)
            k, v = P.gather_kv(k, v, P.select_indices(scores, budget, plan.settings.window))
        out.set_layer(layer, k, v, room)
    out.next_pos = cache.next_pos  # generated tokens continue from the prompt length
    return out


def generate_with_plan(model: M.Transformer, tokens: torch.Tensor, plan: Plan | None, max_new_tokens: int,
                       stop_ids=()) -> list[int]:
    """Prefill, compress with `plan` (None = FullKV), then greedy decoding."""
    window = plan.settings.window if plan else 32
    logits, cache, stats = prefill_with_stats(model, tokens, window, h2o_layers(plan) if plan else ())
    if plan is not None:
        cache = apply_plan(cache, stats, plan, room=max_new_tokens)
    return M.generate(model, cache, logits, max_new_tokens, stop_ids)


def plan_kv_bytes(plan: Plan, prompt_len: int, cfg: M.Config, bytes_per_value: int = 4) -> int:
    """What a plan's cache holds for a prompt of `prompt_len` tokens (before generation)."""
    kept = sum(min(b, prompt_len) for b in plan.budgets)
    return 2 * kept * cfg.n_kv_heads * cfg.head_dim * bytes_per_value


# -----------------------------------------------------------------------------
# Calibration building blocks: the objective and the budget moves


def teacher_forced_logprobs(model: M.Transformer, cache: M.KVCache, continuation: torch.Tensor) -> torch.Tensor:
    """Log-probs (N-1, V) for continuation[1:] given the prompt (in `cache`) and continuation[:-1].

    The first continuation token was predicted by the prefill itself, which compression
    does not change, so it carries no signal and is not fed back."""
    logits = M.forward(model, continuation[None, :-1], cache)[0]  # (N-1, V)
    return F.log_softmax(logits.float(), dim=-1)


def mean_kl(full_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(full || compressed) of next-token distributions, summed over the vocabulary, averaged
    over positions (the last dim but one): (..., N, V) log-probs -> (...,). The calibration objective."""
    return F.kl_div(logprobs, full_logprobs.expand_as(logprobs), log_target=True, reduction="none").sum(-1).mean(-1)


def continuation_kl(full_logprobs: torch.Tensor, model: M.Transformer, compressed: M.KVCache,
                    continuation: torch.Tensor) -> float:
    """Mean over the continuation of KL(full || compressed) of the next-token distributions.

    Appends to `compressed`: pass a cache you do not need afterwards (apply_plan makes a new one)."""
    if continuation.numel() < 2:
        return 0.0
    comp = teacher_forced_logprobs(model, compressed, continuation)
    return mean_kl(full_logprobs, comp).item()


def move_budget(budgets: list[int], src: int, dst: int, quantum: int, low: int, high: int) -> list[int] | None:
    """Allocation step: move `quantum` tokens from layer src to layer dst.

    The total never changes; returns None if either layer would leave [low, high]."""
    if src == dst or budgets[src] - quantum < low or budgets[dst] + quantum > high:
        return None
    moved = list(budgets)
    moved[src] -= quantum
    moved[dst] += quantum
    return moved


def reroute(policies: list[str], layer: int, policy: str, head: int | None = None, n_kv: int = 1) -> list[str]:
    """Routing step: layer `layer` (or only its KV head `head`, of n_kv) switches to `policy`."""
    routed = list(policies)
    if head is None:
        routed[layer] = policy
    else:
        per_head = head_policies(policies[layer], n_kv)
        per_head[head] = policy
        routed[layer] = layer_policy(per_head)
    return routed


def sensitivity_budgets(sensitivity: list[float], average: int, low: int, high: int, quantum: int = 8) -> list[int]:
    """Allocation seeded by sensitivity: budget proportional to sensitivity**0.5, within [low, high],
    rounded to quanta, total exactly n_layers * average."""
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
    budgets = [int(low + quantum * round((b - low) / quantum)) for b in raw.tolist()]
    budgets = [min(max(b, low), high) for b in budgets]
    order = sorted(range(n), key=lambda l: -weights[l].item())
    i = 0
    while sum(budgets) != total and i < 100 * n:  # repair the rounding, one token at a time
        l = order[i % n]
        step = 1 if sum(budgets) < total else -1
        if low <= budgets[l] + step <= high:
            budgets[l] += step
        i += 1
    return budgets
