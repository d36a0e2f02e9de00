"""Calibration: the search on constructed objectives, the end-to-end objective on the real model, a tiny full run."""
import random

import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st

import calibrate as C
import longbench as LB
import model as M
import polykv as K

POLICIES = list(C.CANDIDATES)


def separable_objective(best_policy: list[str], weight: list[float]):
    """Layer l costs 1 unless it uses best_policy[l], plus weight[l] / budget[l] (more budget, less loss)."""
    def objective(policies, budgets):
        return [sum((p != b) + w / n for p, b, w, n in zip(policies, best_policy, weight, budgets))]
    return objective


def test_routing_finds_the_best_policy_of_each_layer():
    best = ["h2o", "snapkv", "tova", "h2o", "knorm", "snapkv", "streamingllm", "tova"]
    objective = separable_objective(best, [1.0] * 8)
    policies, budgets, kl, trace = C.search(objective, ["h2o"] * 8, [128] * 8, list(range(8)),
                                            route=True, allocate=False)
    assert policies == best and budgets == [128] * 8
    assert kl == pytest.approx(8 / 128)


def test_head_level_routing_finds_the_best_policy_of_each_head():
    best = [["h2o", "tova"], ["snapkv", "snapkv"], ["knorm", "h2o"], ["streamingllm", "snapkv"]]

    def objective(policies, budgets):  # one unit per KV head whose policy is not its best
        return [sum(p != b for pol, heads in zip(policies, best) for p, b in zip(K.head_policies(pol, 2), heads))]
    whole = C.search(objective, ["h2o"] * 4, [64] * 4, list(range(4)), route=True, allocate=False)
    assert whole[2] == 3  # a whole layer can match at most one of two disagreeing heads
    policies, budgets, cost, _ = C.search(objective, ["h2o"] * 4, [64] * 4, list(range(4)), route=True,
                                          allocate=False, heads=2)
    assert policies == ["h2o/tova", "snapkv", "knorm/h2o", "streamingllm/snapkv"] and cost == 0 and budgets == [64] * 4


def test_allocation_moves_budget_to_the_sensitive_layers():
    weight = [1, 1, 50, 1, 10, 1]
    objective = separable_objective(["h2o"] * 6, weight)
    order = sorted(range(6), key=lambda l: -weight[l])
    policies, budgets, kl, _ = C.search(objective, ["h2o"] * 6, [128] * 6, order, route=False, allocate=True,
                                        quantum=16, low=32, high=512, max_evals=1000, max_sweeps=50)
    assert sum(budgets) == 6 * 128 and min(budgets) >= 32 and max(budgets) <= 512
    assert budgets[2] > budgets[4] > budgets[0]
    assert kl < objective(["h2o"] * 6, [128] * 6)[0]


@hsettings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.booleans(), st.booleans())
def test_search_is_never_worse_than_its_start(seed, route, allocate):
    rng = random.Random(seed)
    n = 5
    cost = [{p: rng.random() for p in POLICIES} for _ in range(n)]
    scale = [rng.random() * 100 for _ in range(n)]
    objective = lambda pol, bud: [sum(cost[l][pol[l]] + scale[l] / bud[l] + rng.random() * 1e-3 for l in range(n))  # noqa: E731
                                  + rng.random() * 0.1 for _ in range(3)]  # three noisy "samples"
    start_p, start_b = [rng.choice(POLICIES) for _ in range(n)], [96] * n
    start = C.mean(objective(start_p, start_b))
    policies, budgets, kl, trace = C.search(objective, start_p, start_b, list(range(n)), route=route, allocate=allocate,
                                            quantum=32, low=32, high=256, max_evals=30)
    assert kl <= trace[0]["kl"] and sum(budgets) == sum(start_b)
    assert all(32 <= b <= 256 for b in budgets)
    assert trace[0]["kl"] == pytest.approx(start, abs=0.2)


def test_a_change_must_win_on_most_samples():
    """Layer 0 switching to tova helps one sample a lot and hurts three a little: the mean drops,
    the majority rule refuses it; switching layer 1 to snapkv helps three of four and is kept."""
    def objective(policies, budgets):
        kls = [1.0, 1.0, 1.0, 1.0]
        if policies[0] == "tova":
            kls = [0.1, 1.1, 1.1, 1.1]
        if policies[1] == "snapkv":
            kls = [k - 0.05 * (i < 3) for i, k in enumerate(kls)]
        return kls
    kw = dict(route=True, allocate=False, candidates=("h2o", "snapkv", "tova"))
    assert C.search(objective, ["h2o"] * 2, [64] * 2, [0, 1], min_win_share=0.0, **kw)[0] == ["tova", "snapkv"]
    policies, _, kl, trace = C.search(objective, ["h2o"] * 2, [64] * 2, [0, 1], min_win_share=0.5, **kw)
    assert policies == ["h2o", "snapkv"] and kl == pytest.approx(0.9625)
    assert [t["step"] for t in trace] == ["start", "layer 1 -> snapkv", "end"]


def test_objective_on_a_real_prompt(smollm2, smollm2_dir):
    """Zero when the budgets cover the prompt; grows as the budgets shrink."""
    model, tokenizer = smollm2
    sample = LB.synthetic_suite(1, seed=1, target_words=500)[0]["synthetic_passkey"][0]
    ids = tokenizer.encode(M.chat_prompt(tokenizer, sample["context"] + "\n" + sample["input"]), add_special_tokens=False).ids
    ref = C.build_reference(model, ids, "p", 16, M.stop_token_ids(smollm2_dir, tokenizer), window=32)
    n, T = model.cfg.n_layers, len(ids)
    kls = [C.plan_kl(model, [ref], ["snapkv"] * n, [b] * n, K.Settings()) for b in (T, 256, 64)]
    assert kls[0] < 1e-5 and kls[1] > 1e-4 and kls[2] > kls[1]


def test_end_to_end_on_a_tiny_model(tiny_checkpoint, tmp_path, monkeypatch):
    model, tokenizer = M.load_model(tiny_checkpoint), M.load_tokenizer(tiny_checkpoint)
    paths = C.run(model, tokenizer, tiny_checkpoint, [64], data_dir=None, out_dir=tmp_path, max_length=200,
                  n_per_task=2, n_continuation=6, max_evals=12)
    assert set(paths[64]) == {"polykv", "polykv_routing", "polykv_allocation"}
    for name, path in paths[64].items():
        plan = K.load_plan(path, n_layers=2)
        K.validate_plan(plan, 2, average=64)
        assert max(plan.budgets) <= 200  # never more than the calibration prompts hold (max_length 200)
        assert path.with_suffix(".png").stat().st_size > 1000
        cal = plan.info["calibration"]
        assert cal["in_sample_kl"] <= cal["best_uniform_in_sample_kl"] + 1e-9
        ids = plan.info["calibration_ids"] + plan.info["validation_ids"]
        assert ids and not set(plan.info["calibration_ids"]) & set(plan.info["validation_ids"])
        if name == "polykv_routing":
            assert plan.budgets == [64, 64]
        if name == "polykv_allocation":
            assert len(set(plan.policies)) == 1
    # the plan applies to a fresh prompt
    tokens = torch.tensor([tokenizer.encode("hello " * 150).ids])
    out = K.generate_with_plan(model, tokens, K.load_plan(paths[64]["polykv"]), 5)
    assert len(out) == 5
    table = C.summarize(tmp_path)  # read back from the JSONs
    kl = K.load_plan(paths[64]["polykv"]).info["calibration"]["validation_kl"]
    assert f"| 64 | uniform " in table and f"| {kl:.4f} |" in table and table.count("\n") == 5
    # a rerun with the same settings keeps the written plans (an interrupted run resumes) ...
    before = paths[64]["polykv"].read_text()
    with monkeypatch.context() as m:
        m.setattr(C, "build_reference", lambda *a, **k: pytest.fail("recalibrated a finished budget"))
        assert C.run(model, tokenizer, tiny_checkpoint, [64], None, tmp_path, 200, 2, 6, max_evals=12) == paths
    # ... and other settings recalibrate
    C.run(model, tokenizer, tiny_checkpoint, [64], None, tmp_path, 200, 2, 6, max_evals=13)
    assert K.load_plan(paths[64]["polykv"]).info["calibration_settings"]["max_evals"] == 13
    assert before != paths[64]["polykv"].read_text()
    # head-level routing refines the polykv plan on the same samples: same start, never worse in-sample
    parent = K.load_plan(paths[64]["polykv"])
    heads = C.refine_heads(model, tokenizer, tiny_checkpoint, tmp_path, [64], None, max_evals=12)
    refined = K.load_plan(heads[64], n_layers=2)
    K.validate_plan(refined, 2, average=64)
    cal = refined.info["calibration"]
    assert refined.name == "polykv_heads" and refined.budgets == parent.budgets
    assert cal["search_trace"][0]["kl"] == pytest.approx(parent.info["calibration"]["in_sample_kl"], rel=1e-5)
    assert cal["in_sample_kl"] <= parent.info["calibration"]["in_sample_kl"] + 1e-9
    assert cal["refined_from"]["validation_kl"] == parent.info["calibration"]["validation_kl"]
    assert "polykv_heads" in C.summarize(tmp_path)
    with monkeypatch.context() as m:  # done budgets are kept
        m.setattr(C, "build_reference", lambda *a, **k: pytest.fail("refined a finished budget again"))
        assert C.refine_heads(model, tokenizer, tiny_checkpoint, tmp_path, [64], None, max_evals=12) == heads
    # calibration ids are exactly the split's calibration side, never the evaluation side
    by_task, _, _ = LB.synthetic_suite(n_per_task=4, seed=0, target_words=1200)
    calib, evaluation = LB.dataset_split(by_task, 2, 0)
    assert set(ids) == set(calib) and not set(ids) & set(evaluation)


def test_reusing_unchanged_layers_gives_the_plain_objective(monkeypatch):
    """plan_sample_kl skips the layers below the first one a plan changes; the KL must equal the
    plain teacher-forced pass (K.continuation_kl) exactly, and only the changed layers must run."""
    cfg = M.Config.from_hf({"model_type": "llama", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48,
                            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2})
    torch.manual_seed(0)
    model = M.Transformer(cfg)
    for p in model.parameters():
        p.data.normal_(0, 0.4)
    ids = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = C.build_reference(model, ids, "r", 12, stop_ids=(), window=16)
    runs = []
    layer_forward = M.Block.forward
    def counting(self, *a, **k):  # noqa: E306
        runs.append(list(model.layers).index(self))
        return layer_forward(self, *a, **k)
    monkeypatch.setattr(M.Block, "forward", counting)
    plans = [(["snapkv"] * 4, [64] * 4), (["snapkv", "snapkv", "snapkv", "tova"], [64] * 4),
             (["snapkv"] * 4, [64, 64, 32, 96]), (["snapkv"] * 4, [64] * 4), (["h2o"] * 4, [64] * 4)]
    for i, (policies, budgets) in enumerate(plans):
        plan = K.Plan(policies, budgets)
        plain = K.continuation_kl(ref.full_logprobs, model, K.apply_plan(ref.cache, ref.stats, plan, 12), ref.continuation)
        runs.clear()
        fast = C.plan_sample_kl(model, ref, plan)
        assert fast == pytest.approx(plain, rel=1e-6, abs=1e-9) and plain > 0
        first_changed = [0, 3, 2, 3, 0][i]  # plan 3 repeats plan 0: only the top layer runs again
        assert runs == list(range(first_changed, 4))
