"""KV-cache eviction policies: pure tensor functions, no project imports.

Every policy is a scorer with one signature,

    score(keys, stats, settings) -> (B, n_kv, T) scores, higher = keep,

where `keys` are one layer's cached post-RoPE keys, `stats` is what the prefill gathered
for that layer (`LayerStats`) and `settings` the policies' hyperparameters (`Settings`).
`SCORERS` is the one registry: every list of policy names in the project is derived from
it, so a new policy is one function and one dict entry. The token selection (observation
window always kept, then the top scores up to the budget) is written once, in
`select_indices`. Keys are post-RoPE, so kept tokens keep their true positions.

Shapes: B batch, nh query heads, n_kv KV heads (GQA: query head h reads KV head
h // (nh // n_kv)), T cached tokens, W window, hd head dim.
"""
import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F

AGGREGATIONS = ("mean", "max", "all")


@dataclass(frozen=True)
class Settings:
    """The policies' hyperparameters: the one place their defaults are written."""
    window: int = 32  # observation window: the last prompt tokens, always kept, counted in the budget
    kernel: int = 7  # SnapKV: pooling kernel over the sequence (odd)
    pooling: str = "max"  # SnapKV: "max" or "avg"
    sinks: int = 4  # StreamingLLM: attention sinks at the start
    agg: str = "mean"  # how a KV head aggregates its query heads' scores (H2O, SnapKV): "mean" or "max"
    tova_agg: str = "all"  # TOVA: over all query heads (as published), or "mean"/"max" within each KV head's group
    seed: int = 0  # Random: base seed (layer l uses seed + l)
    span: int = 1  # every policy: scores max-pooled over this many neighbours before selection (odd; 1 = off)

    def __post_init__(self):
        """Bad values are errors naming the field, before any work (plans carry settings)."""
        for f in fields(self):
            if f.type in (int, "int") and (not isinstance(getattr(self, f.name), int)
                                           or isinstance(getattr(self, f.name), bool)):
                raise ValueError(f"settings.{f.name} must be an integer, got {getattr(self, f.name)!r}")
        if self.window < 1:
            raise ValueError(f"settings.window must be at least 1 (the last prompt query), got {self.window}")
        for name in ("kernel", "span"):
            if getattr(self, name) < 1 or getattr(self, name) % 2 == 0:
                raise ValueError(f"settings.{name} must be a positive odd number, got {getattr(self, name)}")
        if self.sinks < 0:
            raise ValueError(f"settings.sinks must be >= 0, got {self.sinks}")
        for name, allowed in (("pooling", ("max", "avg")), ("agg", ("mean", "max")), ("tova_agg", AGGREGATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"settings.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")


def recorded_settings(record: dict) -> Settings:
    """Settings as a plan or a run recorded them. A record made before TOVA's aggregation was a
    field used within-group TOVA ("mean"), then the only kind; other missing fields take their defaults."""
    return Settings(**{"tova_agg": "mean", **record})


@dataclass
class LayerStats:
    """What one layer's prefill leaves for the scorers."""
    layer: int
    window_queries: torch.Tensor  # (B, nh, W, hd): the last W post-RoPE prompt queries (SnapKV, TOVA)
    attn_sum: Optional[torch.Tensor] = None  # (B, nh, T): attention each key got from all prompt queries (H2O)


# ---------------------------------------------------------------------- attention statistics

def aggregate_heads(scores: torch.Tensor, n_kv: int, how: str = "mean") -> torch.Tensor:
    """Per-query-head scores (B, nh, T) -> per-KV-head scores (B, n_kv, T).
    "mean"/"max" over the query heads [j*g, (j+1)*g) that share KV head j (g = nh // n_kv);
    "all": the mean over every query head, the same row for every KV head."""
    B, nh, T = scores.shape
    if nh % n_kv != 0:
        raise ValueError(f"n_heads ({nh}) must be a multiple of n_kv_heads ({n_kv})")
    if how == "all":
        return scores.mean(dim=1, keepdim=True).expand(B, n_kv, T).clone()
    grouped = scores.reshape(B, n_kv, nh // n_kv, T)  # (B, n_kv, g, T)
    if how == "mean":
        return grouped.mean(dim=2)
    if how == "max":
        return grouped.amax(dim=2)
    raise ValueError(f"unknown head aggregation {how!r} (expected one of {', '.join(AGGREGATIONS)})")


def causal_attention(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) for the LAST C queries of a length-L sequence, causal.
    q (B, nh, C, hd), keys (B, n_kv, L, hd) -> probabilities (B, nh, C, L), float32.
    Query i sits at cache index L-C+i and sees keys 0..L-C+i. Computed in float32
    because these are statistics summed over thousands of queries."""
    B, nh, C, hd = q.shape
    n_kv, L = keys.shape[1], keys.shape[2]
    g = nh // n_kv
    # group query heads under their KV head instead of copying keys g times
    # (scale q, not the logits: C*hd multiplies instead of C*L, one less (C, L) copy)
    qg = (q.float() / math.sqrt(hd)).reshape(B, n_kv, g, C, hd)  # (B, n_kv, g, C, hd)
    logits = qg @ keys.float().unsqueeze(2).transpose(-1, -2)  # (B, n_kv, g, C, L)
    logits = logits.reshape(B, nh, C, L)  # (B, nh, C, L)
    q_pos = torch.arange(L - C, L, device=q.device).unsqueeze(1)  # (C, 1)
    k_pos = torch.arange(L, device=q.device).unsqueeze(0)  # (1, L)
    logits.masked_fill_(k_pos > q_pos, float("-inf"))  # causal, in place
    return torch.softmax(logits, dim=-1)  # (B, nh, C, L)


def attention_column_sums(q: torch.Tensor, keys: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Attention each key received from the queries q, summed over them: H2O's statistic
    (Zhang et al. 2023). q (B, nh, N, hd) = the last N of the L tokens in keys (B, n_kv, L, hd)
    -> (B, nh, L) float32. Runs `chunk` queries at a time, so it builds at most (B, nh, chunk, L)."""
    N, L = q.shape[2], keys.shape[2]
    total = q.new_zeros(q.shape[0], q.shape[1], L, dtype=torch.float32)
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        seen = L - N + end  # the keys these queries can see
        total[..., :seen] += causal_attention(q[:, :, start:end], keys[:, :, :seen]).sum(dim=2)
    return total  # (B, nh, L)


def accumulate_column_sums(running: Optional[torch.Tensor], chunk_sums: torch.Tensor) -> torch.Tensor:
    """running (B, nh, L0) | None + chunk_sums (B, nh, L), L >= L0 -> (B, nh, L).
    Keys L0..L-1 were not yet cached for earlier queries, so they received 0 from them."""
    if running is None:
        return chunk_sums
    L0, L = running.shape[-1], chunk_sums.shape[-1]
    if L < L0:
        raise ValueError(f"chunk covers {L} keys but the running sum already has {L0}")
    return F.pad(running, (0, L - L0)) + chunk_sums  # (B, nh, L)


# --------------------------------------------------------------------------------- scorers
# One signature: score(keys (B, n_kv, T, hd), stats: LayerStats, s: Settings) -> (B, n_kv, T).

def streamingllm_scores(keys: torch.Tensor, stats: LayerStats, s: Settings) -> torch.Tensor:
    """StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with
    Attention Sinks"): the first `s.sinks` tokens, then the most recent ones."""
    B, n_kv, T, _ = keys.shape
    scores = torch.arange(T, device=keys.device, dtype=torch.float32)  # (T,) recency
    n = min(s.sinks, T)  # sinks outrank every other token, the first sink highest
    scores[:n] = 2 * T - torch.arange(n, device=keys.device, dtype=torch.float32)
    return scores.expand(B, n_kv, T).clone()  # (B, n_kv, T)


def h2o_scores(keys: torch.Tensor, stats: LayerStats, s: Settings) -> torch.Tensor:
    """H2O heavy hitters (Zhang et al. 2023): total attention each token received from
    all prompt queries (stats.attn_sum, gathered during the prefill)."""
    if stats.attn_sum is None:
        raise ValueError(f"layer {stats.layer}: H2O needs the attention column sums; gather them in the prefill")
    return aggregate_heads(stats.attn_sum.float(), keys.shape[1], s.agg)  # (B, n_kv, T)


def snapkv_scores(keys: torch.Tensor, stats: LayerStats, s: Settings) -> torch.Tensor:
    """SnapKV (Li et al. 2024): attention from the W window queries, summed over them,
    pooled along the sequence (1-D, stride 1, same length) per QUERY head, then aggregated
    to KV heads. As in SnapKV only the prefix (tokens 0..T-W-1) is pooled, so the window's
    strong local attention does not spill into its neighbours (select_indices keeps the
    window anyway). "avg" pads with zeros counted in the mean (avg_pool1d's default)."""
    attn = causal_attention(stats.window_queries, keys).sum(dim=2)  # (B, nh, T)
    pooled = pool_span(attn, s.kernel, stats.window_queries.shape[2], s.pooling)  # (B, nh, T)
    return aggregate_heads(pooled, keys.shape[1], s.agg)  # (B, n_kv, T)


def tova_scores(keys: torch.Tensor, stats: LayerStats, s: Settings) -> torch.Tensor:
    """TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs"): attention from the last
    prompt query only, averaged over all query heads as published (s.tova_agg = "all": every KV
    head keeps the same tokens), or within each KV head's query group ("mean", "max"). "all" is the
    default because it measured better: uniform TOVA's validation KL on SmolLM2 (32 LongBench
    samples) 0.132 vs 0.236 at budget 512, 0.421 vs 0.450 at 128 (calibration_study.py)."""
    attn = causal_attention(stats.window_queries[:, :, -1:], keys)[:, :, 0]  # (B, nh, T)
    return aggregate_heads(attn, keys.shape[1], s.tova_agg)  # (B, n_kv, T)


def knorm_scores(keys: torch.Tensor, stats: LayerStats, s: Settings) -> torch.Tensor:
    """K-norm (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for
    KV Cache Compression"): keys with a small L2 norm draw attention, keep them."""
    return -keys.float().norm(dim=-1)  # (B, n_kv, T)


def keydiff_scores(keys: torch.Tensor, stats: LayerStats, s: Settings) -> torch.Tensor:
    """KeyDiff (Park et al. 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context
    LLM Inference in Resource-Constrained Environments"): keep the keys least like the head's
    average key direction (the mean of its unit keys), so distinctive tokens survive whatever the
    question will be. Needs no attention, like K-norm. Scored once over the whole prompt, as kvpress's
    KeyDiffPress does (the paper evicts block by block as the prompt streams in)."""
    keys = keys.float()
    anchor = F.normalize(keys, dim=-1).mean(dim=2, keepdim=True)  # (B, n_kv, 1, hd)
    return -F.cosine_similarity(keys, anchor, dim=-1)  # (B, n_kv, T)


def random_scores(keys: torch.Tensor, stats: LayerStats, s: Settings) -> torch.Tensor:
    """Seeded random scores, different per layer: the floor every policy must beat.
    Same seed, same scores on any device (drawn on CPU)."""
    B, n_kv, T, _ = keys.shape
    gen = torch.Generator(device="cpu").manual_seed(s.seed + stats.layer)
    return torch.rand(B, n_kv, T, generator=gen).to(keys.device)  # (B, n_kv, T)


SCORERS = {
    "streamingllm": streamingllm_scores, "h2o": h2o_scores, "snapkv": snapkv_scores,
    "tova": tova_scores, "knorm": knorm_scores, "keydiff": keydiff_scores, "random": random_scores,
}


# ------------------------------------------------------------------------------- selection

def pool_span(scores: torch.Tensor, span: int, window: int, pooling: str = "max") -> torch.Tensor:
    """scores (B, H, T) -> (B, H, T): each prefix token scores as high as its best neighbour within
    span // 2 on either side ("avg": their mean, zero-padded, an option of SnapKV's), so a token
    worth keeping brings its neighbours along. Retrieval answers are spans (a UUID is about 30-36
    tokens to the shipped tokenizers): keeping its head but not its tail loses the answer. SnapKV
    pools its own scores with this (kernel 7); Settings.span does it for any policy. The window is
    kept anyway and, as in SnapKV, not pooled. span 1 leaves the scores as they are. Positional
    policies change too: StreamingLLM's sinks bring their next span // 2 tokens along, and Random
    is no longer uniform."""
    T = scores.shape[-1]
    n = T - min(window, T)  # prefix tokens
    if span == 1 or n == 0:
        return scores
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    prefix = pool(scores[..., :n], span, stride=1, padding=span // 2)  # (B, H, n)
    return torch.cat([prefix, scores[..., n:]], dim=-1)


def select_indices(scores: torch.Tensor, budget: int, window: int) -> torch.Tensor:
    """Tokens to keep per KV head: scores (B, n_kv, T) -> int64 indices (B, n_kv, k),
    k = min(budget, T), sorted ascending. The last `window` tokens (clipped to T) are
    always kept; the rest of the budget goes to the top-scoring earlier tokens."""
    B, n_kv, T = scores.shape
    if T <= budget:  # nothing to evict
        return torch.arange(T, device=scores.device).expand(B, n_kv, T).clone()
    window = min(window, T)
    if budget < window or window < 0:
        raise ValueError(f"budget ({budget}) must be >= window ({window}): the observation "
                         f"window is always kept and counts towards the budget")
    # top-k over the prefix only, so ties with the window can never push it out
    top = scores[..., : T - window].topk(budget - window, dim=-1).indices  # (B, n_kv, budget-W)
    top = top.sort(dim=-1).values
    win = torch.arange(T - window, T, device=scores.device).expand(B, n_kv, window)  # (B, n_kv, W)
    return torch.cat([top, win], dim=-1)  # (B, n_kv, budget)


def gather_kv(keys: torch.Tensor, values: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keys, values (B, n_kv, T, hd), idx (B, n_kv, k) -> kept keys, values (B, n_kv, k, hd)."""
    k_idx = idx.unsqueeze(-1).expand(*idx.shape, keys.shape[-1])  # (B, n_kv, k, hd)
    v_idx = idx.unsqueeze(-1).expand(*idx.shape, values.shape[-1])  # (B, n_kv, k, hd_v)
    return keys.gather(2, k_idx), values.gather(2, v_idx)
