"""Plans, applying a plan to one shared prefill, memory accounting, and the calibration building blocks."""
import json
import math

import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st

import model as M
import policies as P
import polykv as K

WINDOW = P.Settings().window


def tiny_model(n_layers=4, seed=0, qwen3=False) -> M.Transformer:
    """A random tiny model built directly (no checkpoint needed)."""
    torch.manual_seed(seed)
    cfg = M.Config(model_type="qwen3" if qwen3 else "llama", vocab_size=61, dim=48, n_layers=n_layers, n_heads=6,
                   n_kv_heads=2, head_dim=8, hidden_dim=64, qk_norm=qwen3, tie_embeddings=True)
    model = M.Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


# --- plans -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_layers,budget", [(30, 128), (30, 512), (24, 256), (7, 33), (1, 64)])
def test_plans_sum_to_n_layers_times_average(n_layers, budget):
    for plan in (K.uniform_plan(n_layers, "h2o", budget), K.pyramid_plan(n_layers, budget)):
        assert sum(plan.budgets) == n_layers * budget
        K.validate_plan(plan, n_layers, budget)
    pyr = K.pyramid_budgets(n_layers, budget, WINDOW)
    assert pyr == sorted(pyr, reverse=True) and min(pyr) >= 32  # more budget in lower layers


def test_pyramid_schedule_exact_values():
    # (512-32)=480 above the window: from 480*2-24=936 down to 24, plus the window
    assert K.pyramid_budgets(3, 512, 32) == [968, 512, 56]


def test_plan_json_round_trip(tmp_path):
    plan = K.Plan(["h2o", "snapkv", "tova"], [100, 64, 220], name="x", model="m",
                  settings=P.Settings(window=16, kernel=5), info={"calibration_ids": ["a", "b"]})
    K.save_plan(plan, tmp_path / "p.json")
    back = K.load_plan(tmp_path / "p.json", n_layers=3)
    assert (back.policies, back.budgets, back.settings, back.info, back.model) == (
        plan.policies, plan.budgets, plan.settings, plan.info, plan.model)


def test_plans_made_before_tova_agg_keep_within_group_tova(tmp_path):
    """A plan records the settings it was calibrated with; one that predates tova_agg used "mean"."""
    assert P.Settings().tova_agg == "all"
    K.save_plan(K.Plan(["tova"] * 3, [64] * 3, name="x", model="m"), tmp_path / "new.json")
    doc = json.loads((tmp_path / "new.json").read_text())
    assert K.load_plan(tmp_path / "new.json").settings.tova_agg == "all"
    del doc["settings"]["tova_agg"]
    (tmp_path / "old.json").write_text(json.dumps(doc))
    assert K.load_plan(tmp_path / "old.json").settings == P.Settings(tova_agg="mean")
    del doc["settings"]
    (tmp_path / "bare.json").write_text(json.dumps(doc))
    assert K.load_plan(tmp_path / "bare.json").settings == P.Settings()
    committed = K.load_plan(K.plan_path(K.PLANS_DIR / "SmolLM2-135M-Instruct", 512, "polykv"))
    assert committed.settings.tova_agg == "mean"


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["layers"].pop(), "has 2 policies and 2 budgets, the model has 3 layers"),
    (lambda d: d["layers"][1].update(policy="lru"), "layer 1: unknown policy 'lru'"),
    (lambda d: d["layers"][1].update(policy="h2o/lru"), "layer 1: unknown policy 'h2o/lru'"),
    (lambda d: d["layers"][2].update(budget=0), "layer 2: budget must be a positive integer"),
    (lambda d: d["layers"][0].update(budget=20), "layer 0: budget 20 is smaller than the observation window 32"),
])
def test_invalid_plans_are_rejected(tmp_path, edit, message):
    K.save_plan(K.uniform_plan(3, "h2o", 64), tmp_path / "p.json")
    doc = json.loads((tmp_path / "p.json").read_text())
    edit(doc)
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        K.load_plan(tmp_path / "p.json", n_layers=3)


def test_wrong_total_is_rejected():
    with pytest.raises(ValueError, match="budgets sum to 200, but an average of 64 over 3 layers needs 192"):
        K.validate_plan(K.Plan(["h2o"] * 3, [64, 64, 72]), 3, average=64)


def test_unreadable_plan(tmp_path):
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(ValueError, match="p.json: not a readable plan"):
        K.load_plan(tmp_path / "p.json")


# --- statistics and applying plans ------------------------------------------------------------


def test_prefill_stats_equal_naive_full_attention():
    model = tiny_model()
    ids = torch.randint(0, 61, (1, 70))
    _, cache, stats = K.prefill_with_stats(model, ids, window=8, chunk_size=16)
    _, _, one_pass = K.prefill_with_stats(model, ids, window=8)
    full_q = []
    M.prefill(model, ids, chunk_size=1000, observe=lambda l, q, k: full_q.append((q, k)))
    for layer, (q, k) in enumerate(full_q):
        k_rep = k.repeat_interleave(3, dim=1)  # (1, nh, T, hd)
        att = (q @ k_rep.transpose(-1, -2)) / math.sqrt(8)
        att = att.masked_fill(torch.ones(70, 70).triu(1).bool(), float("-inf")).softmax(-1)  # (1, nh, T, T)
        assert torch.allclose(stats[layer].attn_sum, att.sum(2), atol=1e-4)
        assert torch.allclose(stats[layer].window_queries, q[:, :, -8:], atol=1e-5)
        assert torch.allclose(one_pass[layer].attn_sum, att.sum(2), atol=1e-4)  # the default: one causal pass
        assert torch.allclose(one_pass[layer].window_queries, q[:, :, -8:], atol=1e-5)
        assert torch.allclose(cache.keys(layer), k, atol=1e-5)


def test_budget_covering_prompt_changes_nothing():
    model = tiny_model()
    ids = torch.randint(0, 61, (1, 40))
    plan = K.uniform_plan(4, "snapkv", 64)
    logits, cache, stats = K.prefill_with_stats(model, ids, WINDOW)
    out = K.apply_plan(cache, stats, plan)
    for layer in range(4):
        assert torch.equal(out.keys(layer), cache.keys(layer)) and torch.equal(out.values(layer), cache.values(layer))
    assert K.generate_with_plan(model, ids, plan, 12) == K.generate_with_plan(model, ids, None, 12)


def test_apply_plan_keeps_budget_per_layer_and_leaves_full_cache_untouched():
    model = tiny_model()
    ids = torch.randint(0, 61, (1, 120))
    _, cache, stats = K.prefill_with_stats(model, ids, WINDOW)
    before = [cache.keys(l).clone() for l in range(4)]
    plan = K.Plan(["h2o", "snapkv", "streamingllm", "knorm"], [40, 100, 33, 300])
    out = K.apply_plan(cache, stats, plan)
    assert out.lengths == [40, 100, 33, 120] and out.next_pos == 120
    assert all(torch.equal(cache.keys(l), before[l]) for l in range(4))
    # layer 2 (StreamingLLM, 33 tokens, window 32): the first sink plus the last 32 tokens
    assert torch.equal(out.keys(2), cache.keys(2)[:, :, [0, *range(88, 120)]])


def test_head_routed_layer_keeps_what_each_heads_policy_keeps_alone():
    model = tiny_model()  # 2 KV heads
    ids = torch.randint(0, 61, (1, 150))
    _, cache, stats = K.prefill_with_stats(model, ids, WINDOW)
    plan = K.Plan(["snapkv/h2o", "tova", "knorm/streamingllm", "h2o/h2o"], [48, 48, 40, 64])
    out = K.apply_plan(cache, stats, plan)
    for layer, policy in enumerate(plan.policies):
        for head, name in enumerate(K.head_policies(policy, 2)):
            alone = K.apply_plan(cache, stats, K.uniform_plan(4, name, plan.budgets[layer]))
            assert torch.equal(out.keys(layer)[:, head], alone.keys(layer)[:, head]), (layer, head)
            assert torch.equal(out.values(layer)[:, head], alone.values(layer)[:, head]), (layer, head)
    assert K.h2o_layers(plan) == [0, 3]
    with pytest.raises(ValueError, match="layer 1: policy 'h2o/tova/knorm' names 3 heads, the model has 2 KV heads"):
        K.apply_plan(cache, stats, K.Plan(["h2o", "h2o/tova/knorm", "h2o", "h2o"], [48] * 4))


def test_reroute_one_head_exact():
    assert K.reroute(["h2o", "snapkv"], 1, "tova", head=2, n_kv=3) == ["h2o", "snapkv/snapkv/tova"]
    assert K.reroute(["h2o", "snapkv/snapkv/tova"], 1, "snapkv", head=2, n_kv=3) == ["h2o", "snapkv"]
    assert K.reroute(["h2o", "snapkv/tova/h2o"], 0, "knorm") == ["knorm", "snapkv/tova/h2o"]


def test_one_prefill_serves_many_plans_exactly():
    """Compressing copies of one shared prefill == running each plan from its own prefill."""
    model = tiny_model()
    ids = torch.randint(0, 61, (1, 150))
    plans = [K.uniform_plan(4, p, 48) for p in P.SCORERS] + [K.pyramid_plan(4, 64)]
    plans.append(K.Plan(["tova/h2o", "snapkv", "knorm/tova", "h2o"], [48, 64, 40, 48]))  # head-routed layers
    logits, cache, stats = K.prefill_with_stats(model, ids, WINDOW)
    for plan in plans:
        shared = M.generate(model, K.apply_plan(cache, stats, plan), logits, 10)
        assert shared == K.generate_with_plan(model, ids, plan, 10), plan.name


def test_kv_bytes_ratio_equals_token_ratio():
    model = tiny_model()
    ids = torch.randint(0, 61, (1, 200))
    _, cache, stats = K.prefill_with_stats(model, ids, WINDOW)
    plan = K.Plan(["snapkv"] * 4, [40, 60, 80, 100])
    small = K.apply_plan(cache, stats, plan)
    assert cache.nbytes() == 2 * 4 * 200 * 2 * 8 * 4  # K+V, layers, tokens, kv heads, head dim, fp32
    assert small.nbytes() * 200 * 4 == cache.nbytes() * sum(plan.budgets)
    assert small.nbytes() == K.plan_kv_bytes(plan, 200, model.cfg)


# --- calibration building blocks -----------------------------------------------------------------


def test_kl_is_zero_when_nothing_is_evicted_and_grows_as_budgets_shrink():
    model = tiny_model(qwen3=True)
    ids = torch.randint(0, 61, (1, 300))
    logits, cache, stats = K.prefill_with_stats(model, ids, WINDOW)
    cont = torch.tensor(M.generate(model, cache.clone(), logits, 24))
    full = K.teacher_forced_logprobs(model, cache.clone(), cont)
    kls = [K.continuation_kl(full, model, K.apply_plan(cache, stats, K.uniform_plan(4, "snapkv", b)), cont)
           for b in (300, 160, 40)]
    assert kls[0] < 1e-6 and kls[1] > 1e-5 and kls[2] > kls[1]


def test_mean_kl_is_the_textbook_kl_averaged_over_positions():
    g = torch.Generator().manual_seed(0)
    full = torch.log_softmax(torch.randn(5, 11, generator=g), -1)  # (N, V)
    comp = torch.log_softmax(torch.randn(3, 5, 11, generator=g), -1)  # (B, N, V)
    naive = [sum(sum(full[t, v].exp() * (full[t, v] - comp[b, t, v]) for v in range(11)) for t in range(5)) / 5
             for b in range(3)]
    assert torch.allclose(K.mean_kl(full, comp), torch.stack(naive), atol=1e-6)
    assert K.mean_kl(full, full).abs().max() < 1e-6


@hsettings(max_examples=200, deadline=None)
@given(st.lists(st.integers(32, 600), min_size=2, max_size=12), st.data())
def test_move_budget_keeps_total_and_bounds(budgets, data):
    n = len(budgets)
    src, dst = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, n - 1))
    quantum = data.draw(st.integers(1, 64))
    moved = K.move_budget(budgets, src, dst, quantum, low=32, high=600)
    if moved is None:
        assert src == dst or budgets[src] - quantum < 32 or budgets[dst] + quantum > 600
    else:
        assert sum(moved) == sum(budgets) and all(32 <= b <= 600 for b in moved)
        assert moved[src] == budgets[src] - quantum and moved[dst] == budgets[dst] + quantum


@hsettings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 100), min_size=2, max_size=30), st.sampled_from([64, 128, 512]))
def test_allocate_total_and_bounds(sens, average):
    budgets = K.allocate(sens, average, low=32, high=4 * average)
    assert sum(budgets) == len(sens) * average and all(32 <= b <= 4 * average for b in budgets)


def test_allocate_follow_sensitivity():
    budgets = K.allocate([1, 100, 1, 25], 128, low=32, high=512, quantum=1)
    assert budgets[1] > budgets[3] > budgets[0] == budgets[2]


def test_route_picks_each_layers_lowest_single_layer_kl():
    table = {(0, "h2o"): 0.3, (0, "snapkv"): 0.1, (0, "tova"): 0.2,  # at budget 64
             (1, "h2o"): 0.1, (1, "snapkv"): 0.4, (1, "tova"): 0.5,
             (2, "h2o"): 0.2, (2, "snapkv"): 0.2, (2, "tova"): 0.05}
    asked = []

    def layer_kl(layer, policy, budget):
        asked.append(budget)
        return table[layer, policy] if budget == 64 else 1 - table[layer, policy]  # another budget, another order

    assert K.route(layer_kl, [64, 64, 64], ("h2o", "snapkv", "tova")) == ["snapkv", "h2o", "tova"]
    # each layer is judged at its own budget
    assert K.route(layer_kl, [64, 128, 64], ("h2o", "snapkv", "tova")) == ["snapkv", "tova", "tova"]
    assert sorted(set(asked)) == [64, 128]


def test_route_gives_equal_kls_to_the_preferred_policy():
    """A budget that keeps every calibration token: every candidate's KL is the same (0); the layer
    takes the preferred policy, not whichever candidate is listed first."""
    layer_kl = lambda layer, policy, budget: 0.0 if budget >= 2048 else {"streamingllm": 0.3, "snapkv": 0.1, "tova": 0.2}[policy]  # noqa: E731
    candidates = ("streamingllm", "snapkv", "tova")
    assert K.route(layer_kl, [2078, 512, 2048], candidates) == ["streamingllm", "snapkv", "streamingllm"]
    assert K.route(layer_kl, [2078, 512, 2048], candidates, prefer="tova") == ["tova", "snapkv", "tova"]


def test_sensitivity_is_the_single_layer_kl_at_the_layers_policy():
    kl = lambda layer, policy, budget: {"h2o": 1.0, "tova": 2.0}[policy] * (layer + 1) / budget  # noqa: E731
    assert K.sensitivity(kl, ["h2o", "tova", "h2o"], 32) == [1 / 32, 4 / 32, 3 / 32]


def test_allocate_gives_more_to_more_sensitive_layers_within_bounds():
    sens = [0.001, 0.5, 0.02, 2.0, 0.0]
    # sqrt weights 0.032, 0.707, 0.141, 1.414, 0: shares of the 480 above `low` give layer 3 328 tokens, over
    # `high` = 256; its spill goes to the others by weight, then everything is rounded to quanta of 8
    assert K.allocate(sens, 128, low=32, high=256, quantum=8) == [40, 240, 72, 256, 32]
    assert K.allocate(sens, 128, low=32, high=512, quantum=1) == [39, 180, 62, 327, 32]


def test_layers_are_placed_by_their_layer_field(tmp_path):
    K.save_plan(K.Plan(["h2o", "snapkv", "tova"], [40, 64, 88]), tmp_path / "p.json")
    doc = json.loads((tmp_path / "p.json").read_text())
    doc["layers"].reverse()
    (tmp_path / "p.json").write_text(json.dumps(doc))
    plan = K.load_plan(tmp_path / "p.json", n_layers=3)
    assert plan.policies == ["h2o", "snapkv", "tova"] and plan.budgets == [40, 64, 88]
    doc["layers"][0]["layer"] = 1  # two layers numbered 1, none 2
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"'layer' fields must number them 0..2 once each, got \[0, 1, 1\]"):
        K.load_plan(tmp_path / "p.json", n_layers=3)


@pytest.mark.parametrize("settings,message", [({"window": -4}, "settings.window must be at least 1"),
                                              ({"pooling": "bogus"}, "settings.pooling must be one of max, avg"),
                                              ({"colour": 1}, "unexpected keyword argument 'colour'")])
def test_bad_plan_settings_name_the_file_and_field(tmp_path, settings, message):
    K.save_plan(K.uniform_plan(3, "h2o", 64), tmp_path / "p.json")
    doc = json.loads((tmp_path / "p.json").read_text())
    doc["settings"].update(settings)
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="p.json: .*" + message):
        K.load_plan(tmp_path / "p.json", n_layers=3)


def test_head_routed_policy_with_the_wrong_head_count_is_refused_at_load(tmp_path):
    K.save_plan(K.Plan(["h2o", "h2o/tova/knorm", "h2o"], [48] * 3), tmp_path / "p.json")
    with pytest.raises(ValueError, match="layer 1: policy 'h2o/tova/knorm' names 3 KV heads, the model has 2"):
        K.load_plan(tmp_path / "p.json", n_layers=3, n_kv=2)
