"""
The calibration's objective, as the paper defines it: the end-to-end KL(FullKV || compressed)
over FullKV's own continuation, teacher-forced, averaged over the scored tokens of each sample (or,
not the paper's, each sample's worst token: TOKEN_KLS).

A `Reference` is FullKV's side on one calibration prompt, prefilled once: the full cache and
statistics, FullKV's greedy continuation and its log-probs, and FullKV's input to every layer.
Against it, `single_layer_kl` scores one layer compressed alone (the per-layer signal routing and
allocation read) and `plan_sample_kl` a whole plan (the joint objective the search and validation
read). Both reuse what they can: single-layer passes start at their layer, plan passes at the first
layer where the plan differs from one recently scored.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import model as M
import polykv as K
import policies as P

TOKEN_KLS = {"mean": torch.mean, "max": torch.amax}  # a sample's KL from its tokens' KLs: the paper's mean, or the worst


@dataclass
class Reference:
    sample_id: str
    cache: M.KVCache  # the full prefill, never modified (its spare room takes teacher-forced tokens)
    stats: list[P.LayerStats]
    continuation: torch.Tensor  # (N,) teacher-forced on top of the cache: [the question,] FullKV's greedy answer
    full_logprobs: torch.Tensor  # (S, V) FullKV's log-probs at the scored positions of continuation[:-1]
    trunk: list[torch.Tensor]  # FullKV's input (1, N-1, dim) to each layer on the continuation
    prefill_seconds: float
    scored_from: int  # the first scored position: where the answer's tokens are predicted
    token_kl: str  # a key of TOKEN_KLS
    memo: dict = field(default_factory=dict)  # scores per (layer, policy), single-layer KLs
    recent: dict = field(default_factory=dict)  # recent plans' layer inputs, see plan_sample_kl


def build_reference(model, ids: list[int], sample_id: str, n_continuation: int, stop_ids, window: int,
                    n_context: int | None = None, token_kl: str = "mean") -> Reference:
    """FullKV's side of the objective on one prompt. Query-aware (n_context None) the whole prompt is
    prefilled, to be compressed; FullKV's greedy answer is teacher-forced on top and scored from its
    second token (the first comes from the prefill, which compression does not change).
    Query-agnostic (n_context: how many ids are context) only the context is prefilled, to be
    compressed before the question is seen, as in evaluation; the question and the answer are
    teacher-forced on top, and every answer token is scored. token_kl: see scored_kl."""
    cut = n_context if n_context is not None and n_context < len(ids) else len(ids)
    tokens = torch.tensor([ids[:cut]], device=model.embed_tokens.weight.device)
    t0 = time.perf_counter()
    logits, cache, stats = K.prefill_with_stats(model, tokens, window)
    seconds = time.perf_counter() - t0
    cache, question = cache.clone(), tokens.new_tensor(ids[cut:])  # compact, with room for what follows
    full = cache.share()
    if len(question):
        logits = M.forward(model, question[None], full, last_only=True)
    answer = tokens.new_tensor(M.generate(model, full, logits, n_continuation, stop_ids))
    continuation, trunk, scored_from = torch.cat([question, answer]), [], max(len(question) - 1, 0)
    logits = M.forward(model, continuation[None, :-1], cache.share(), layer_inputs=trunk)[0]  # (N-1, V)
    return Reference(sample_id, cache, stats, continuation, F.log_softmax(logits[scored_from:], -1), trunk, seconds,
                     scored_from, token_kl)


def scored_kl(ref: Reference, logits: torch.Tensor) -> float:
    """The objective on one reference: KL(FullKV || compressed) over its scored positions, from the
    compressed pass's logits (N-1, V) over continuation[:-1]; their mean, or with token_kl "max" the
    worst one (an exact-match answer is lost by its worst token, which a mean over many dilutes)."""
    kls = K.token_kls(ref.full_logprobs, F.log_softmax(logits[ref.scored_from:], -1))  # (S,)
    return TOKEN_KLS[ref.token_kl](kls).item()


def single_layer_kl(model, ref: Reference, layer: int, policy: str, budget: int, settings: P.Settings) -> float:
    """KL when only `layer` is compressed (to `budget` with `policy`): the per-layer signal. The
    pass starts at that layer from FullKV's input there; every other layer reads the full prefill."""
    key = ("kl", layer, policy, budget, settings)
    if key not in ref.memo:
        if ref.cache.lengths[layer] <= budget or len(ref.full_logprobs) == 0:
            ref.memo[key] = 0.0  # nothing to evict, or nothing to compare
        else:
            cache = ref.cache.share()  # no copy: appended tokens go past the prefill's
            cache.set_layer(layer, *K.compress_layer(ref.cache, ref.stats[layer], policy, budget, settings, ref.memo),
                            room=len(ref.continuation))
            logits = M.forward(model, ref.continuation[None, :-1], cache, start=layer, x=ref.trunk[layer])[0]
            ref.memo[key] = scored_kl(ref, logits)
    return ref.memo[key]


N_RECENT = 4  # plans whose layer inputs each reference remembers


def plan_sample_kl(model, ref: Reference, plan: K.Plan) -> float:
    """The joint objective on one reference: KL with every layer compressed by the plan.

    A search changes one or two layers at a time; below the first changed layer the pass sees
    the same inputs and caches as a plan it came from, so it starts from that plan's remembered
    input there. Same result as the plain pass (tested), at a fraction of the cost."""
    if len(ref.full_logprobs) == 0:
        return 0.0
    layers = list(zip(plan.policies, plan.budgets))
    shared = lambda key: next((l for l, (a, b) in enumerate(zip(key[1:], layers)) if a != b), len(layers))  # noqa: E731
    base = max((key for key in ref.recent if key[0] == plan.settings), key=shared, default=None)
    start, x, inputs = 0, None, []
    if base is not None:
        start = min(shared(base), len(layers) - 1)  # an identical plan still runs its top layer
        ref.recent[base] = ref.recent.pop(base)  # now the most recently used
        x, inputs = ref.recent[base][start], ref.recent[base][:start]  # x: the input to layer `start`
    cache = K.apply_plan(ref.cache, ref.stats, plan, len(ref.continuation), ref.memo)
    logits = M.forward(model, ref.continuation[None, :-1], cache, start=start, x=x, layer_inputs=inputs)[0]
    ref.recent[(plan.settings, *layers)] = inputs  # inputs[l]: the input (1, N-1, dim) to layer l under this plan
    while len(ref.recent) > N_RECENT:
        ref.recent.pop(next(iter(ref.recent)))  # the least recently used
    return scored_kl(ref, logits)


def sample_kls(model, refs: list[Reference], plan: K.Plan) -> list[float]:
    """The joint objective of a plan on each reference (the search's input; averaged, a validation KL)."""
    return [plan_sample_kl(model, r, plan) for r in refs]
