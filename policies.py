"""KV-cache eviction policies: pure tensor functions, no project imports.

Each policy is a scorer returning (B, n_kv, T) scores, higher = keep; the token
selection (observation window always kept, then top scores up to the budget)
is written once in `select_indices`. Keys are post-RoPE, so the kept tokens
keep their true positions. Shapes: B batch, nh query heads, n_kv KV heads
(GQA: query head h reads KV head h // (nh // n_kv)), T cached tokens, hd head dim.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F

POLICY_NAMES = ("streamingllm", "h2o", "snapkv", "tova", "knorm", "random")


def aggregate_heads(scores: torch.Tensor, n_kv: int, how: str = "mean") -> torch.Tensor:
    """Per-query-head scores (B, nh, T) -> per-KV-head scores (B, n_kv, T).
    Query heads [j*g, (j+1)*g) share KV head j, g = nh // n_kv (repeat_interleave grouping)."""
    B, nh, T = scores.shape
    if nh % n_kv != 0:
        raise ValueError(f"n_heads ({nh}) must be a multiple of n_kv_heads ({n_kv})")
    grouped = scores.reshape(B, n_kv, nh // n_kv, T)  # (B, n_kv, g, T)
    if how == "mean":
        return grouped.mean(dim=2)
    if how == "max":
        return grouped.amax(dim=2)
    raise ValueError(f"unknown head aggregation {how!r} (expected 'mean' or 'max')")


def _causal_attention(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
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


def attention_column_sums(q_chunk: torch.Tensor, k_all: torch.Tensor) -> torch.Tensor:
    """Attention each key received from one prefill chunk, summed over its queries.
    q_chunk (B, nh, C, hd) = the last C of the L tokens in k_all (B, n_kv, L, hd)
    -> (B, nh, L) float32. Builds at most (B, nh, C, L). Feeds H2O (Zhang et al. 2023)."""
    return _causal_attention(q_chunk, k_all).sum(dim=2)  # (B, nh, L)


def accumulate_column_sums(running: Optional[torch.Tensor], chunk_sums: torch.Tensor) -> torch.Tensor:
    """running (B, nh, L0) | None + chunk_sums (B, nh, L), L >= L0 -> (B, nh, L).
    Keys L0..L-1 were not yet cached for earlier chunks, so they received 0 from them."""
    if running is None:
        return chunk_sums
    L0, L = running.shape[-1], chunk_sums.shape[-1]
    if L < L0:
        raise ValueError(f"chunk covers {L} keys but the running sum already has {L0}")
    return F.pad(running, (0, L - L0)) + chunk_sums  # (B, nh, L)


def window_attention(q_window: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of the last W prompt queries (cache indices T-W..T-1).
    q_window (B, nh, W, hd), keys (B, n_kv, T, hd) -> (B, nh, W, T) float32, causal."""
    return _causal_attention(q_window, keys)


# ---------------------------------------------------------------------------- scorers
# All return (B, n_kv, T), higher = keep.

def streamingllm_scores(keys: torch.Tensor, sinks: int = 4) -> torch.Tensor:
    """StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with
    Attention Sinks"): the first `sinks` tokens, then the most recent ones."""
    B, n_kv, T, _ = keys.shape
    scores = torch.arange(T, device=keys.device, dtype=torch.float32)  # (T,) recency
    n = min(sinks, T)  # sinks outrank every other token, the first sink highest
    scores[:n] = 2 * T - torch.arange(n, device=keys.device, dtype=torch.float32)
    return scores.expand(B, n_kv, T).clone()  # (B, n_kv, T)


def h2o_scores(attn_sum: torch.Tensor, n_kv: int, agg: str = "mean") -> torch.Tensor:
    """H2O heavy hitters (Zhang et al. 2023): total attention each token received
    from all prompt queries. attn_sum (B, nh, T) from accumulate_column_sums."""
    return aggregate_heads(attn_sum.float(), n_kv, agg)  # (B, n_kv, T)


def snapkv_scores(q_window: torch.Tensor, keys: torch.Tensor, kernel: int = 7,
                  pooling: str = "max", agg: str = "mean") -> torch.Tensor:
    """SnapKV (Li et al. 2024): attention from the W window queries, summed over them,
    pooled along the sequence (1-D, stride 1, same length), then aggregated to KV heads.
    Pooling happens per QUERY head, before head aggregation. As in SnapKV, only the
    prefix (tokens 0..T-W-1) is pooled, so the window's strong local attention does not
    spill into its neighbours; the window columns keep their raw sums (select_indices
    keeps them anyway). "avg" pads with zeros counted in the mean (avg_pool1d default)."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"pooling kernel must be a positive odd number, got {kernel}")
    W, T = q_window.shape[2], keys.shape[2]
    attn = window_attention(q_window, keys).sum(dim=2)  # (B, nh, T)
    prefix = attn[..., : T - W]  # (B, nh, T-W)
    if prefix.shape[-1] > 0:
        if pooling == "max":
            prefix = F.max_pool1d(prefix, kernel, stride=1, padding=kernel // 2)
        elif pooling == "avg":
            prefix = F.avg_pool1d(prefix, kernel, stride=1, padding=kernel // 2)
        else:
            raise ValueError(f"unknown pooling {pooling!r} (expected 'max' or 'avg')")
    attn = torch.cat([prefix, attn[..., T - W:]], dim=-1)  # (B, nh, T)
    return aggregate_heads(attn, keys.shape[1], agg)  # (B, n_kv, T)


def tova_scores(q_window: torch.Tensor, keys: torch.Tensor, agg: str = "mean") -> torch.Tensor:
    """TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs"): attention from
    the last prompt query only. q_window (B, nh, W, hd); only its last query is used."""
    attn = window_attention(q_window[:, :, -1:], keys)[:, :, 0]  # (B, nh, T)
    return aggregate_heads(attn, keys.shape[1], agg)  # (B, n_kv, T)


def knorm_scores(keys: torch.Tensor) -> torch.Tensor:
    """K-norm (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for
    KV Cache Compression"): keys with a small L2 norm draw attention, keep them."""
    return -keys.float().norm(dim=-1)  # (B, n_kv, T)


def random_scores(keys: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Seeded random scores: the floor every policy must beat. Same seed, same scores
    on any device (drawn on CPU)."""
    B, n_kv, T, _ = keys.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(B, n_kv, T, generator=gen).to(keys.device)  # (B, n_kv, T)


SCORERS = {
    "streamingllm": streamingllm_scores, "h2o": h2o_scores, "snapkv": snapkv_scores,
    "tova": tova_scores, "knorm": knorm_scores, "random": random_scores,
}


def score_tokens(policy: str, keys: torch.Tensor, window_queries: Optional[torch.Tensor] = None,
                 attn_sum: Optional[torch.Tensor] = None, **hparams) -> torch.Tensor:
    """One entry point: route a layer's statistics to the named scorer -> (B, n_kv, T).
    keys (B, n_kv, T, hd); window_queries (B, nh, W, hd) for snapkv/tova; attn_sum
    (B, nh, T) for h2o. hparams are the scorer's named arguments (sinks, kernel, ...)."""
    if policy in ("streamingllm", "knorm", "random"):
        return SCORERS[policy](keys, **hparams)
    if policy == "h2o":
        return h2o_scores(attn_sum, keys.shape[1], **hparams)
    if policy in ("snapkv", "tova"):
        return SCORERS[policy](window_queries, keys, **hparams)
    raise ValueError(f"unknown policy {policy!r}; expected one of {POLICY_NAMES}")


# -------------------------------------------------------------------------- selection

def select_indices(scores: torch.Tensor, budget: int, window: int = 32) -> torch.Tensor:
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
