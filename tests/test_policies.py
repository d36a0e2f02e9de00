"""Tests for policies.py: every scorer against a slow, obviously-correct reference
(pure-Python loops over .tolist() values, float64), plus property tests on selection."""
import math
import os
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import policies as P  # noqa: E402

B, NH, NKV, HD = 2, 6, 2, 8  # GQA: 3 query heads per KV head
G = NH // NKV
NO_STATS = P.LayerStats(0, None)  # for the scorers that read only the keys


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------- slow references

def ref_attention_rows(q, keys):
    """q (B, nh, C, hd), keys (B, n_kv, L, hd) -> nested list [b][h][i][j] of causal
    attention probabilities; query i sits at position L-C+i; head h reads KV head h // g."""
    q, k = q.tolist(), keys.tolist()
    Bq, nh, C, hd = len(q), len(q[0]), len(q[0][0]), len(q[0][0][0])
    n_kv, L = len(k[0]), len(k[0][0])
    g = nh // n_kv
    out = []
    for b in range(Bq):
        heads = []
        for h in range(nh):
            rows = []
            for i in range(C):
                pos = L - C + i
                logits = [sum(q[b][h][i][d] * k[b][h // g][j][d] for d in range(hd)) / math.sqrt(hd)
                          for j in range(pos + 1)]
                m = max(logits)
                e = [math.exp(x - m) for x in logits]
                z = sum(e)
                rows.append([x / z for x in e] + [0.0] * (L - pos - 1))
            heads.append(rows)
        out.append(heads)
    return out


def ref_sum_queries(rows):
    """[b][h][i][j] -> [b][h][j], summed over queries i."""
    return [[[sum(r[j] for r in hrows) for j in range(len(hrows[0]))] for hrows in brows]
            for brows in rows]


def ref_aggregate(s, n_kv, how="mean"):
    """[b][h][t] -> [b][kv][t] over query heads kv*g .. kv*g+g-1."""
    g = len(s[0]) // n_kv
    out = []
    for b in range(len(s)):
        heads = []
        for kv in range(n_kv):
            group = [s[b][h] for h in range(kv * g, (kv + 1) * g)]
            if how == "mean":
                heads.append([sum(r[t] for r in group) / g for t in range(len(group[0]))])
            else:
                heads.append([max(r[t] for r in group) for t in range(len(group[0]))])
        out.append(heads)
    return out


def ref_pool(row, kernel, mode):
    """Same-length 1-D pooling, stride 1; avg divides by `kernel` (zero padding counted)."""
    r, n = kernel // 2, len(row)
    out = []
    for i in range(n):
        nb = [row[j] for j in range(i - r, i + r + 1) if 0 <= j < n]
        out.append(max(nb) if mode == "max" else sum(nb) / kernel)
    return out


def close(t, ref, tol=1e-5):
    torch.testing.assert_close(t.double(), torch.tensor(ref, dtype=torch.float64), atol=tol, rtol=tol)


# ----------------------------------------------------------------- attention stats

@pytest.mark.parametrize("how", ["mean", "max"])
def test_aggregate_heads(how):
    s = rand(B, NH, 11)
    close(P.aggregate_heads(s, NKV, how), ref_aggregate(s.tolist(), NKV, how))


def test_aggregate_heads_matches_repeat_interleave_grouping():
    # a score that is the KV head id, expanded the way LLaMA/Qwen expand K/V to query heads
    kv_ids = torch.arange(NKV, dtype=torch.float32).view(1, NKV, 1).expand(B, NKV, 5)
    per_q = kv_ids.repeat_interleave(G, dim=1)  # (B, nh, 5)
    assert torch.equal(P.aggregate_heads(per_q, NKV, "max"), kv_ids)
    with pytest.raises(ValueError):
        P.aggregate_heads(rand(B, 5, 4), 2)


def test_causal_attention_matches_reference():
    T, W = 13, 4
    q, k = rand(B, NH, W, HD, seed=1), rand(B, NKV, T, HD, seed=2)
    attn = P.causal_attention(q, k)
    assert attn.shape == (B, NH, W, T) and attn.dtype == torch.float32
    close(attn, ref_attention_rows(q, k))


def test_causal_attention_low_precision_input():
    q, k = rand(1, NH, 3, HD).bfloat16(), rand(1, NKV, 9, HD).bfloat16()
    attn = P.causal_attention(q, k)
    assert attn.dtype == torch.float32
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, NH, 3))


@pytest.mark.parametrize("chunks,inner", [([20], 512), ([20], 3), ([7, 7, 6], 512), ([7, 7, 6], 4), ([1] * 20, 1),
                                          ([3, 16, 1], 5)])
def test_column_sums_over_chunks_equal_full_causal(chunks, inner):
    T = sum(chunks)
    q_all, k_all = rand(B, NH, T, HD, seed=3), rand(B, NKV, T, HD, seed=4)
    running, L = None, 0
    for C in chunks:  # prefill chunks; `inner` = the query chunks of attention_column_sums
        L += C  # the chunk's queries are the last C of the L cached tokens
        part = P.attention_column_sums(q_all[:, :, L - C:L], k_all[:, :, :L], chunk=inner)
        assert part.shape == (B, NH, L)
        running = P.accumulate_column_sums(running, part)
    full = ref_sum_queries(ref_attention_rows(q_all, k_all))  # naive T x T causal
    close(running, full)
    torch.testing.assert_close(running.sum(-1), torch.full((B, NH), float(T)))  # each query sums to 1


def test_accumulate_rejects_shrinking():
    with pytest.raises(ValueError):
        P.accumulate_column_sums(torch.zeros(1, 2, 5), torch.zeros(1, 2, 4))


# ----------------------------------------------------------------------- scorers

@pytest.mark.parametrize("T,sinks", [(12, 4), (12, 0), (3, 4), (10, 10)])
def test_streamingllm_order(T, sinks):
    s = P.streamingllm_scores(rand(B, NKV, T, HD), NO_STATS, P.Settings(sinks=sinks))
    assert s.shape == (B, NKV, T)
    row = s[1, 1].tolist()
    for i in range(T):
        for j in range(i + 1, T):
            if i < sinks <= j:
                assert row[i] > row[j]  # a sink beats any non-sink
            elif j >= sinks:
                assert row[j] > row[i]  # among non-sinks, more recent wins
    assert torch.equal(s[0, 0], s[1, 1])  # same for every head


@pytest.mark.parametrize("agg", ["mean", "max"])
def test_h2o_scores(agg):
    attn_sum = rand(B, NH, 15).abs()
    keys = rand(B, NKV, 15, HD)
    close(P.h2o_scores(keys, P.LayerStats(0, None, attn_sum), P.Settings(agg=agg)),
          ref_aggregate(attn_sum.tolist(), NKV, agg))
    with pytest.raises(ValueError, match="layer 0: H2O needs the attention column sums"):
        P.h2o_scores(keys, NO_STATS, P.Settings())


def ref_snapkv(q, k, kernel, pooling, agg):
    W, T = q.shape[2], k.shape[2]
    summed = ref_sum_queries(ref_attention_rows(q, k))  # [b][h][t]
    pooled = [[ref_pool(row[: T - W], kernel, pooling) + row[T - W:] for row in hs] for hs in summed]
    return ref_aggregate(pooled, k.shape[1], agg)


@pytest.mark.parametrize("kernel,pooling,agg,T,W",
                         [(7, "max", "mean", 17, 4), (7, "avg", "mean", 17, 4), (3, "max", "max", 9, 3),
                          (1, "avg", "mean", 8, 2), (5, "avg", "max", 6, 6), (7, "max", "mean", 8, 5)])
def test_snapkv_scores(kernel, pooling, agg, T, W):
    q, k = rand(B, NH, W, HD, seed=5), rand(B, NKV, T, HD, seed=6)
    s = P.snapkv_scores(k, P.LayerStats(0, q), P.Settings(kernel=kernel, pooling=pooling, agg=agg))
    assert s.shape == (B, NKV, T)
    close(s, ref_snapkv(q, k, kernel, pooling, agg))


@pytest.mark.parametrize("field,value,message", [
    ("kernel", 4, "settings.kernel must be a positive odd number, got 4"),
    ("span", 2, "settings.span must be a positive odd number, got 2"), ("span", 0, "settings.span must be a positive odd"),
    ("pooling", "median", "settings.pooling must be one of max, avg, got 'median'"),
    ("window", 0, "settings.window must be at least 1"), ("window", -4, "settings.window must be at least 1"),
    ("agg", "all", "settings.agg must be one of mean, max, got 'all'"),
    ("tova_agg", "sum", "settings.tova_agg must be one of mean, max, all"),
    ("sinks", -1, "settings.sinks must be >= 0"), ("seed", 1.5, "settings.seed must be an integer"),
])
def test_settings_reject_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        P.Settings(**{field: value})


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 40), window=st.integers(1, 8), span=st.sampled_from([1, 3, 5, 7, 9]), seed=st.integers(0, 99))
def test_pool_span_equals_naive_neighbourhood_max(T, window, span, seed):
    scores = torch.randn(2, 3, T, generator=torch.Generator().manual_seed(seed))
    pooled, n, r = P.pool_span(scores, span, window), T - min(window, T), span // 2
    naive = scores.clone()
    for i in range(n):  # each prefix token: the best score within r of it, inside the prefix
        naive[..., i] = scores[..., max(0, i - r):min(n, i + r + 1)].amax(dim=-1)
    assert torch.equal(pooled, naive)


def test_pool_span_keeps_the_neighbours_of_a_peak_whole():
    """One high-scoring token and a flat rest: with span 7 the selection keeps the peak and its
    three neighbours on each side, the contiguous run a retrieval answer needs."""
    scores = torch.zeros(1, 1, 100)
    scores[..., 40] = 5.0
    kept = P.select_indices(P.pool_span(scores, 7, 4), budget=4 + 7, window=4)[0, 0].tolist()
    assert kept == list(range(37, 44)) + [96, 97, 98, 99]


@pytest.mark.parametrize("agg", ["mean", "max"])
def test_tova_scores(agg):
    q, k = rand(B, NH, 5, HD, seed=7), rand(B, NKV, 14, HD, seed=8)
    last = ref_attention_rows(q[:, :, -1:], k)  # only the last query, at position T-1
    ref = ref_aggregate([[rows[0] for rows in hs] for hs in last], NKV, agg)
    close(P.tova_scores(k, P.LayerStats(0, q), P.Settings(tova_agg=agg)), ref)


def test_tova_all_heads_as_published():
    q, k = rand(B, NH, 5, HD, seed=7), rand(B, NKV, 14, HD, seed=8)
    last = ref_attention_rows(q[:, :, -1:], k)
    mean_all = [[sum(hs[h][0][t] for h in range(NH)) / NH for t in range(14)] for hs in last]  # [b][t]
    s = P.tova_scores(k, P.LayerStats(0, q), P.Settings(tova_agg="all"))
    close(s, [[row] * NKV for row in mean_all])  # every KV head keeps the same tokens


def test_knorm_scores():
    k = rand(B, NKV, 10, HD)
    ref = [[[-math.sqrt(sum(x * x for x in vec)) for vec in head] for head in b] for b in k.tolist()]
    close(P.knorm_scores(k, NO_STATS, P.Settings()), ref)


def test_keydiff_scores():
    k = rand(B, NKV, 10, HD)
    unit = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]  # noqa: E731
    ref = []
    for b in k.tolist():
        rows = []
        for head in b:  # anchor: the mean of the head's unit keys; score: minus each key's cosine to it
            anchor = [sum(unit(vec)[d] for vec in head) / len(head) for d in range(HD)]
            rows.append([-sum(x * a for x, a in zip(unit(vec), unit(anchor))) for vec in head])
        ref.append(rows)
    close(P.keydiff_scores(k, NO_STATS, P.Settings()), ref)
    # an outlier among near-copies scores highest: it is the token KeyDiff keeps
    copies = rand(1, 1, 1, HD).expand(1, 1, 9, HD) + 0.01 * rand(1, 1, 9, HD, seed=1)
    keys = torch.cat([copies[:, :, :4], rand(1, 1, 1, HD, seed=2), copies[:, :, 4:]], dim=2)
    assert P.keydiff_scores(keys, NO_STATS, P.Settings())[0, 0].argmax() == 4


def test_random_scores_reproducible():
    k = rand(B, NKV, 30, HD)
    a, b = P.random_scores(k, NO_STATS, P.Settings(seed=3)), P.random_scores(k, NO_STATS, P.Settings(seed=3))
    c = P.random_scores(k, NO_STATS, P.Settings(seed=4))
    assert a.shape == (B, NKV, 30) and torch.equal(a, b) and not torch.equal(a, c)
    # layer l draws with seed + l: layer 1 at seed 3 is layer 0 at seed 4
    assert torch.equal(P.random_scores(k, P.LayerStats(1, None), P.Settings(seed=3)), c)
    assert a.min() >= 0 and a.max() < 1


def test_every_scorer_has_the_one_signature():
    T, W = 12, 4
    k, stats = rand(B, NKV, T, HD), P.LayerStats(3, rand(B, NH, W, HD), rand(B, NH, T).abs())
    for name, score in P.SCORERS.items():
        s = score(k, stats, P.Settings(window=W))
        assert s.shape == (B, NKV, T) and s.dtype == torch.float32, name


# --------------------------------------------------------------------- selection

sel_cases = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 60),
                      st.integers(0, 70), st.integers(0, 40), st.integers(0, 2**16))


@settings(max_examples=200, deadline=None, database=None)
@given(sel_cases)
def test_select_indices_properties(case):
    b, n_kv, T, budget, window, seed = case
    scores = rand(b, n_kv, T, seed=seed)
    w = min(window, T)
    if T > budget and budget < w:
        with pytest.raises(ValueError):
            P.select_indices(scores, budget, window)
        return
    idx = P.select_indices(scores, budget, window)
    k = min(budget, T)
    assert idx.shape == (b, n_kv, k) and idx.dtype == torch.int64
    for row, srow in zip(idx.reshape(b * n_kv, k).tolist(), scores.reshape(b * n_kv, T).tolist()):
        assert row == sorted(set(row))  # unique and ascending
        assert all(0 <= i < T for i in row)
        assert set(range(T - w, T)) <= set(row)  # window always kept
        kept = [srow[i] for i in row if i < T - w]
        dropped = [srow[i] for i in range(T - w) if i not in set(row)]
        if kept and dropped:
            assert min(kept) >= max(dropped)  # the rest is the top of the prefix


@settings(max_examples=100, deadline=None, database=None)
@given(st.integers(1, 80), st.integers(0, 8), st.integers(0, 16), st.integers(0, 40))
def test_streamingllm_selection_keeps_sinks_and_recent(T, sinks, window, extra):
    budget = min(window, T) + min(sinks, T) + extra
    idx = P.select_indices(P.streamingllm_scores(rand(1, NKV, T, HD), NO_STATS, P.Settings(sinks=sinks)), budget, window)
    k = min(budget, T)
    expected = sorted(set(range(min(sinks, T))) | set(range(T - (k - min(sinks, T)), T)))
    assert idx[0, 0].tolist() == expected and idx[0, 1].tolist() == expected


@settings(max_examples=50, deadline=None, database=None)
@given(st.integers(1, 40), st.integers(0, 30), st.integers(0, 50))
def test_budget_at_least_T_keeps_everything(T, extra, window):
    keys, values = rand(B, NKV, T, HD, seed=1), rand(B, NKV, T, HD, seed=2)
    idx = P.select_indices(P.knorm_scores(keys, NO_STATS, P.Settings()), T + extra, window)
    assert torch.equal(idx, torch.arange(T).expand(B, NKV, T))
    k2, v2 = P.gather_kv(keys, values, idx)
    assert torch.equal(k2, keys) and torch.equal(v2, values)


def test_gather_kv_per_head_positions():
    keys, values = rand(B, NKV, 10, HD, seed=1), rand(B, NKV, 10, HD, seed=2)
    idx = P.select_indices(P.random_scores(keys, NO_STATS, P.Settings()), budget=6, window=2)
    k2, v2 = P.gather_kv(keys, values, idx)
    assert k2.shape == v2.shape == (B, NKV, 6, HD)
    for b in range(B):
        for h in range(NKV):
            for n, t in enumerate(idx[b, h].tolist()):
                assert torch.equal(k2[b, h, n], keys[b, h, t]) and torch.equal(v2[b, h, n], values[b, h, t])


def test_budget_below_window_error_message():
    with pytest.raises(ValueError, match=r"budget \(16\) must be >= window \(32\)"):
        P.select_indices(torch.zeros(1, 2, 100), budget=16, window=32)
    # the window is clipped to T (message names the clipped window) ...
    with pytest.raises(ValueError, match=r"budget \(16\) must be >= window \(20\)"):
        P.select_indices(torch.zeros(1, 2, 20), budget=16, window=32)
    # ... and a prompt no longer than the budget is never compressed
    assert torch.equal(P.select_indices(torch.zeros(1, 2, 10), budget=16, window=32),
                       torch.arange(10).expand(1, 2, 10))
