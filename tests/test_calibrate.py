"""Calibration: the paper's plans and the search on constructed objectives, the single-layer and joint
objectives against the plain teacher-forced pass, and a whole run on a tiny model."""
import json
import math
import random
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st

import calibrate as C
import objective as O
import search as S
import longbench as LB
import checkpoint as CK
import model as M
import policies as P
import polykv as K
import report

POLICIES = list(K.CANDIDATES)


def separable_objective(best_policy: list[str], weight: list[float]):
    """Layer l costs 1 unless it uses best_policy[l], plus weight[l] / budget[l] (more budget, less loss)."""
    def objective(policies, budgets):
        return [sum((p != b) + w / n for p, b, w, n in zip(policies, best_policy, weight, budgets))]
    return objective


# --- the search ----------------------------------------------------------------------------------


def test_routing_moves_find_the_best_policy_of_each_layer():
    best = ["h2o", "snapkv", "tova", "h2o", "knorm", "snapkv", "streamingllm", "tova"]
    objective = separable_objective(best, [1.0] * 8)
    policies, budgets, kl, trace = S.search(objective, ["h2o"] * 8, [128] * 8, list(range(8)), S.routing_moves())
    assert policies == best and budgets == [128] * 8
    assert kl == pytest.approx(8 / 128)


def test_head_level_routing_finds_the_best_policy_of_each_head():
    best = [["h2o", "tova"], ["snapkv", "snapkv"], ["knorm", "h2o"], ["streamingllm", "snapkv"]]

    def objective(policies, budgets):  # one unit per KV head whose policy is not its best
        return [sum(p != b for pol, heads in zip(policies, best) for p, b in zip(K.head_policies(pol, 2), heads))]
    whole = S.search(objective, ["h2o"] * 4, [64] * 4, list(range(4)), S.routing_moves())
    assert whole[2] == 3  # a whole layer can match at most one of two disagreeing heads
    policies, budgets, cost, _ = S.search(objective, ["h2o"] * 4, [64] * 4, list(range(4)), S.routing_moves(heads=2))
    assert policies == ["h2o/tova", "snapkv", "knorm/h2o", "streamingllm/snapkv"] and cost == 0 and budgets == [64] * 4


def test_allocation_moves_budget_to_the_sensitive_layers():
    weight = [1, 1, 50, 1, 10, 1]
    objective = separable_objective(["h2o"] * 6, weight)
    order = sorted(range(6), key=lambda l: -weight[l])
    policies, budgets, kl, _ = S.search(objective, ["h2o"] * 6, [128] * 6, order, S.allocation_moves(order, 16, 32, 512),
                                        max_evals=1000, max_sweeps=50)
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
    moves = (S.routing_moves() if route else []) + (S.allocation_moves(list(range(n)), 32, 32, 256) if allocate else [])
    policies, budgets, kl, trace = S.search(objective, start_p, start_b, list(range(n)), moves, max_evals=30)
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
    moves = S.routing_moves(("h2o", "snapkv", "tova"))
    assert S.search(objective, ["h2o"] * 2, [64] * 2, [0, 1], moves, min_win_share=0.0)[0] == ["tova", "snapkv"]
    policies, _, kl, trace = S.search(objective, ["h2o"] * 2, [64] * 2, [0, 1], moves, min_win_share=0.5)
    assert policies == ["h2o", "snapkv"] and kl == pytest.approx(0.9625)
    assert [t["step"] for t in trace] == ["start", "layer 1 -> snapkv", "end"]


# --- the paper's plans on a constructed single-layer objective --------------------------------


def test_paper_plans_route_and_allocate_from_single_layer_signals():
    """Layer l prefers policy PREF[l]; sensitivity grows with the layer; KL falls with the budget."""
    pref, weight = ["tova", "h2o", "snapkv", "h2o"], [1.0, 4.0, 16.0, 64.0]
    kl = lambda l, p, b: weight[l] * (1.0 if p == pref[l] else 2.0) / b  # noqa: E731
    plans = C.paper_plans(kl, "h2o", 4, 128, 32, 512, "route-allocate", K.CANDIDATES)
    routed, even, signals = plans["polykv_routing"]
    assert routed == pref and even == [128] * 4 and signals["preference"][2]["snapkv"] == 16 / 128
    policies, budgets, signals = plans["polykv_allocation"]
    assert policies == ["h2o"] * 4 and budgets == K.allocate([kl(l, "h2o", 32) for l in range(4)], 128, 32, 512)
    assert budgets[3] > budgets[2] > budgets[1] > budgets[0] and signals["sensitivity_budget"] == 32
    policies, budgets, signals = plans["polykv"]  # route at 128, then allocate by the routed policies' sensitivity
    assert policies == pref and budgets == K.allocate([kl(l, pref[l], 32) for l in range(4)], 128, 32, 512)
    policies, budgets, _ = C.paper_plans(kl, "h2o", 4, 128, 32, 512, "allocate-route", K.CANDIDATES)["polykv"]
    assert policies == pref and budgets == plans["polykv_allocation"][1]  # allocate first, then route at those budgets


# --- the objectives on a real model --------------------------------------------------------------


def tiny(n_layers=4, seed=0):
    cfg = CK.config_from_hf({"model_type": "llama", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48,
                            "num_hidden_layers": n_layers, "num_attention_heads": 4, "num_key_value_heads": 2})
    torch.manual_seed(seed)
    model = M.Transformer(cfg)
    for p in model.parameters():
        p.data.normal_(0, 0.4)
    return model.eval()


def test_single_layer_kl_is_the_plain_pass_with_one_layer_compressed():
    model = tiny()
    ids = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = O.build_reference(model, ids, "r", 12, stop_ids=(), window=16)
    s = P.Settings(window=16)
    for layer, policy, budget in [(0, "snapkv", 64), (2, "h2o", 40), (3, "tova", 100), (1, "knorm", 300)]:
        budgets = [10_000] * 4
        budgets[layer] = budget
        plan = K.Plan([policy] * 4, budgets, settings=s)
        plain = K.continuation_kl(ref.full_logprobs, model, K.apply_plan(ref.cache, ref.stats, plan, 12), ref.continuation)
        assert O.single_layer_kl(model, ref, layer, policy, budget, s) == pytest.approx(plain, rel=1e-5, abs=1e-9)
    assert ref.cache.lengths == [300] * 4  # the full prefill is untouched


def test_query_agnostic_reference_scores_the_answer_read_through_the_compressed_context():
    """Query-agnostic: only the context is prefilled (and compressed); the question and FullKV's answer
    are teacher-forced on top, and the objective scores the answer's tokens only - the same KL as the
    plain pass, and zero when nothing is evicted."""
    model = tiny()
    ids = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(2)).tolist()
    ref = O.build_reference(model, ids, "r", 12, stop_ids=(), window=16, n_context=260)
    assert ref.cache.lengths == [260] * 4 and ref.continuation[:40].tolist() == ids[260:]
    assert ref.scored_from == 39 and len(ref.full_logprobs) == len(ref.continuation) - 40 == 12
    full = ref.cache.clone()  # FullKV: the answer is the greedy continuation of context + question
    assert M.generate(model, full, M.forward(model, torch.tensor([ids[260:]]), full, last_only=True), 12) == \
        ref.continuation[40:].tolist()
    s = P.Settings(window=16)
    for layer, policy, budget in [(0, "snapkv", 64), (2, "h2o", 40), (3, "knorm", 100)]:
        budgets = [10_000] * 4
        budgets[layer] = budget
        plan = K.Plan([policy] * 4, budgets, settings=s)
        logprobs = K.teacher_forced_logprobs(model, K.apply_plan(ref.cache, ref.stats, plan, 60), ref.continuation)
        plain = K.mean_kl(ref.full_logprobs, logprobs[39:]).item()
        assert O.single_layer_kl(model, ref, layer, policy, budget, s) == pytest.approx(plain, rel=1e-5, abs=1e-9)
        assert plain > 0
    uniform = K.Plan(["snapkv"] * 4, [64] * 4, settings=s)
    logprobs = K.teacher_forced_logprobs(model, K.apply_plan(ref.cache, ref.stats, uniform, 60), ref.continuation)
    assert O.plan_sample_kl(model, ref, uniform) == pytest.approx(K.mean_kl(ref.full_logprobs, logprobs[39:]).item(), rel=1e-5)
    assert O.plan_sample_kl(model, ref, K.Plan(["snapkv"] * 4, [300] * 4, settings=s)) == pytest.approx(0, abs=1e-6)


def test_token_kl_max_scores_a_sample_by_its_worst_token():
    """token_kl "max": a reference's objective is the largest textbook KL over its scored positions
    (not their mean), for one layer compressed and for a whole plan; "mean" stays the paper's."""
    model = tiny()
    ids = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    worst = O.build_reference(model, ids, "r", 12, stop_ids=(), window=16, token_kl="max")
    mean = O.build_reference(model, ids, "r", 12, stop_ids=(), window=16)
    s = P.Settings(window=16)
    plan = K.Plan(["h2o", "snapkv", "tova", "knorm"], [40, 64, 100, 48], settings=s)
    logprobs = K.teacher_forced_logprobs(model, K.apply_plan(worst.cache, worst.stats, plan, 12), worst.continuation)
    naive = [sum(math.exp(f) * (f - c) for f, c in zip(full.tolist(), comp.tolist()))
             for full, comp in zip(worst.full_logprobs, logprobs[worst.scored_from:])]
    assert O.plan_sample_kl(model, worst, plan) == pytest.approx(max(naive), rel=1e-4)
    assert O.plan_sample_kl(model, mean, plan) == pytest.approx(sum(naive) / len(naive), rel=1e-4)
    assert max(naive) > 1.5 * sum(naive) / len(naive)  # the two differ on this sample
    one = K.Plan(["snapkv"] * 4, [10_000, 64, 10_000, 10_000], settings=s)
    logprobs = K.teacher_forced_logprobs(model, K.apply_plan(worst.cache, worst.stats, one, 12), worst.continuation)
    expected = K.token_kls(worst.full_logprobs, logprobs[worst.scored_from:]).max().item()
    assert O.single_layer_kl(model, worst, 1, "snapkv", 64, s) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="token_kl must be one of mean, max"):
        C.CalibrationSettings(token_kl="median")
    assert K.calibration_settings({"calibration_settings": {}})["token_kl"] == "mean"  # a record from before it


def test_reusing_unchanged_layers_gives_the_plain_objective(monkeypatch):
    """plan_sample_kl skips the layers below the first one a plan changes; the KL must equal the
    plain teacher-forced pass (K.continuation_kl) exactly, and only the changed layers must run."""
    model = tiny()
    ids = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = O.build_reference(model, ids, "r", 12, stop_ids=(), window=16)
    runs = []
    layer_forward = M.Block.forward

    def counting(self, *a, **k):
        runs.append(list(model.layers).index(self))
        return layer_forward(self, *a, **k)
    monkeypatch.setattr(M.Block, "forward", counting)
    plans = [(["snapkv"] * 4, [64] * 4), (["snapkv", "snapkv", "snapkv", "tova"], [64] * 4),
             (["snapkv"] * 4, [64, 64, 32, 96]), (["snapkv"] * 4, [64] * 4), (["h2o"] * 4, [64] * 4)]
    for i, (policies, budgets) in enumerate(plans):
        plan = K.Plan(policies, budgets, settings=P.Settings(window=16))
        plain = K.continuation_kl(ref.full_logprobs, model, K.apply_plan(ref.cache, ref.stats, plan, 12), ref.continuation)
        runs.clear()
        fast = O.plan_sample_kl(model, ref, plan)
        assert fast == pytest.approx(plain, rel=1e-6, abs=1e-9) and plain > 0
        first_changed = [0, 3, 2, 3, 0][i]  # plan 3 repeats plan 0: only the top layer runs again
        assert runs == list(range(first_changed, 4))
    other = K.Plan(["snapkv"] * 4, [64] * 4, settings=P.Settings(window=16, kernel=3))  # same layers, other settings
    runs.clear()
    O.plan_sample_kl(model, ref, other)
    assert runs == [0, 1, 2, 3]  # nothing reused: the scores differ


def test_objective_on_a_real_prompt(smollm2, smollm2_dir):
    """Zero when the budgets cover the prompt; grows as the budgets shrink."""
    model, tokenizer = smollm2
    ids = tokenizer.encode(CK.chat_prompt(tokenizer, "The pass key is 4242. " + "The grass is green. " * 120
                                         + "What is the pass key?"), add_special_tokens=False).ids
    ref = O.build_reference(model, ids, "p", 16, CK.stop_token_ids(smollm2_dir, tokenizer), window=32)
    n, T = model.cfg.n_layers, len(ids)
    kls = [O.plan_sample_kl(model, ref, K.Plan(["snapkv"] * n, [b] * n)) for b in (T, 256, 64)]
    assert kls[0] < 1e-5 and kls[1] > 1e-4 and kls[2] > kls[1]


# --- a whole run -------------------------------------------------------------------------------------


def test_end_to_end_on_a_tiny_model(tiny_checkpoint, longbench_dir, tmp_path, monkeypatch, capsys):
    model, tokenizer = CK.load_model(tiny_checkpoint), CK.load_tokenizer(tiny_checkpoint)
    cs = C.CalibrationSettings(n_samples=4, n_validation=2, max_length=200, n_continuation=6)
    paths = C.run(model, tokenizer, tiny_checkpoint, [48], tmp_path, cs, P.Settings(), longbench_dir)
    assert capsys.readouterr().out.count(", validation KL ") == len(K.POLYKV)
    C.run(model, tokenizer, tiny_checkpoint, [48], tmp_path / "unvalidated", replace(cs, n_validation=0), P.Settings(),
          longbench_dir)
    printed = capsys.readouterr().out
    assert printed.count("in-sample KL") == len(K.POLYKV) and "validation KL" not in printed and "nan" not in printed
    pool = LB.calibration_pool(LB.load_samples(longbench_dir))
    evaluated = {s["_id"] for s in LB.evaluation_samples(LB.load_samples(longbench_dir), LB.EVAL_PER_TASK, set())}
    assert set(paths[48]) == set(K.POLYKV)
    for name, path in paths[48].items():
        plan = K.load_plan(path, n_layers=2)
        K.validate_plan(plan, 2, average=48)
        assert max(plan.budgets) <= 200  # never more than the calibration prompts hold (max_length 200)
        assert path.with_suffix(".png").stat().st_size > 1000
        cal, ids = plan.info["calibration"], plan.info["calibration_ids"] + plan.info["validation_ids"]
        assert len(plan.info["calibration_ids"]) == 4 and len(plan.info["validation_ids"]) == 2 and len(set(ids)) == 6
        assert set(ids) <= {s["_id"] for ss in pool.values() for s in ss} and not set(ids) & evaluated
        assert cal["signals"]["sensitivity_budget"] == 32 and cal["best_uniform"] in K.CANDIDATES
        assert {"in_sample_kl", "validation_kl", "best_uniform_validation_kl"} <= set(cal)
        assert len(cal["validation_kls"]) == 2 and cal["validation_kl"] == pytest.approx(sum(cal["validation_kls"]) / 2)
    polykv = K.load_plan(paths[48]["polykv"])
    pref = polykv.info["calibration"]["signals"]["preference"]  # recorded signals reproduce the routing
    assert polykv.policies == [min(row, key=row.get) for row in pref]
    assert K.load_plan(paths[48]["polykv_routing"]).budgets == [48, 48]
    assert len(set(K.load_plan(paths[48]["polykv_allocation"]).policies)) == 1
    table = report.calibration_table(tmp_path)  # read back from the JSONs
    kl = polykv.info["calibration"]["validation_kl"]
    assert "| 48 | uniform " in table and f"| {kl:.4f} |" in table and table.count("\n") == 5
    alone = K.load_plan(paths[48]["polykv_allocation"]).info["calibration"]["validation_kls"]
    mine = polykv.info["calibration"]["validation_kls"]
    difference = sum(mine) / 2 - sum(alone) / 2  # paired: PolyKV minus allocation alone, per validation sample
    assert f"polykv_allocation: {difference:+.4f} [" in table
    with monkeypatch.context() as m:  # a rerun with the same settings keeps the written plans
        m.setattr(O, "build_reference", lambda *a, **k: pytest.fail("recalibrated a finished budget"))
        assert C.run(model, tokenizer, tiny_checkpoint, [48], tmp_path, cs, P.Settings(), longbench_dir) == paths
        for path in paths[48].values():  # plans written before the query, max_ratio, span, token_kl fields existed:
            info = json.loads(path.read_text())  # query-aware, at most 4x, span 1, unconfirmed, token mean: kept too
            del info["calibration_settings"]["query"], info["calibration_settings"]["max_ratio"]
            del info["calibration_settings"]["spans"], info["calibration_settings"]["span"], info["settings"]["span"]
            del info["calibration_settings"]["confirm_routing"], info["calibration_settings"]["token_kl"]
            path.write_text(json.dumps(info))
        assert C.run(model, tokenizer, tiny_checkpoint, [48], tmp_path, cs, P.Settings(), longbench_dir) == paths
    agnostic = C.run(model, tokenizer, tiny_checkpoint, [48], tmp_path / "agnostic", replace(cs, query="agnostic"),
                     P.Settings(), longbench_dir)
    assert K.load_plan(agnostic[48]["polykv"]).info["calibration_settings"]["query"] == "agnostic"
    capped = C.run(model, tokenizer, tiny_checkpoint, [48], tmp_path / "capped", replace(cs, max_ratio=1.1),
                   P.Settings(), longbench_dir)  # no layer above 52 = int(1.1 x 48), the total kept
    budgets = K.load_plan(capped[48]["polykv_allocation"]).budgets
    assert max(budgets) <= 52 and sum(budgets) == 96
    assert max(K.load_plan(paths[48]["polykv_allocation"]).budgets) > 52  # the default cap (4x) lets it go further
    huge = C.run(model, tokenizer, tiny_checkpoint, [48], tmp_path / "huge", replace(cs, max_ratio=1e308),
                 P.Settings(), longbench_dir)  # 1e308 x 48 overflows to inf: the prompts' length bounds it
    assert max(K.load_plan(huge[48]["polykv_allocation"]).budgets) <= 200
    refined = C.run(model, tokenizer, tiny_checkpoint, [48], tmp_path, C.CalibrationSettings(
        n_samples=4, n_validation=2, max_length=200, n_continuation=6, refine=True, max_evals=8), P.Settings(), longbench_dir)
    cal = K.load_plan(refined[48]["polykv"]).info["calibration"]
    assert cal["search_trace"][0]["kl"] == pytest.approx(cal["paper_in_sample_kl"], rel=1e-6)  # starts at the paper's plan
    assert cal["in_sample_kl"] <= cal["paper_in_sample_kl"] + 1e-9


def test_a_hugging_face_cache_snapshot_calibrates_under_its_repository_name(tiny_checkpoint, longbench_dir, tmp_path,
                                                                            monkeypatch):
    """A model given by id lives in <cache>/models--org--name/snapshots/<commit>: its plans are
    plans/<name>/..., for model <name>, where the evaluation looks for them (not plans/<commit>)."""
    snapshot = tmp_path / "hub" / "models--someone--tiny-llama" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for f in tiny_checkpoint.iterdir():
        (snapshot / f.name).symlink_to(f)
    monkeypatch.setattr(K, "PLANS_DIR", tmp_path / "plans")
    C.main(["--model", str(snapshot), "--data-dir", str(longbench_dir), "--budgets", "48", "--n-samples", "2",
            "--n-validation", "0", "--max-length", "200", "--n-continuation", "4", "--tasks", "trec", "hotpotqa"])
    plan = K.load_plan(K.plan_path(tmp_path / "plans" / "tiny-llama", 48, "polykv"), n_layers=2)
    assert plan.model == "tiny-llama" == CK.model_name(snapshot)
    assert plan.info["tasks"] == ["hotpotqa", "trec"]  # recorded, in one order (the folder's)
    cfg = CK.load_config(snapshot)
    assert set(K.committed_plans("tiny-llama", cfg)) == {(n, 48) for n in K.POLYKV}  # found where evaluation looks
    # a folder that only looks like a budget's is not one: its plans would pass for budget 48's
    stray = tmp_path / "plans" / "tiny-llama" / "budget48_old"
    stray.mkdir()
    (stray / "polykv.json").write_text("not a plan")
    assert set(K.committed_plans("tiny-llama", cfg)) == {(n, 48) for n in K.POLYKV}
    assert list(K.budget_dirs(tmp_path / "plans" / "tiny-llama")) == [48]
    assert report.calibration_table(tmp_path / "plans" / "tiny-llama").count("\n| 48 |") == 1


def test_calibration_runs_at_the_length_evaluation_uses(longbench_dir, tmp_path, monkeypatch):
    """Without --max-length: LongBench's 2048 with a LongBench folder, RULER's 4096 without one."""
    seen = []
    monkeypatch.setattr(CK, "load_model", lambda *a, **k: None)
    monkeypatch.setattr(C, "run", lambda model, tok, model_dir, budgets, out, cs, *a: seen.append(cs.max_length))
    C.main(["--data-dir", str(longbench_dir), "--out", str(tmp_path / "lb")])
    monkeypatch.setattr(LB, "find_data_dir", lambda *a: None)
    C.main(["--out", str(tmp_path / "ruler")])
    C.main(["--out", str(tmp_path / "ruler"), "--max-length", "1024"])
    assert seen == [2048, 4096, 1024]
    monkeypatch.undo()  # a LongBench folder is found, and --benchmark ruler still calibrates on RULER
    monkeypatch.setattr(CK, "load_model", lambda *a, **k: None)
    monkeypatch.setattr(C, "run", lambda model, tok, model_dir, budgets, out, cs, settings, data_dir, tasks:
                        seen.append((data_dir, cs.max_length)))
    monkeypatch.setattr(LB, "find_data_dir", lambda *a: longbench_dir)
    C.main(["--out", str(tmp_path / "forced"), "--benchmark", "ruler"])
    assert seen[-1] == (None, 4096)
    with pytest.raises(ValueError, match="not with --benchmark ruler"):
        C.main(["--out", str(tmp_path / "forced"), "--benchmark", "ruler", "--data-dir", str(longbench_dir)])
    monkeypatch.setattr(LB, "find_data_dir", lambda *a: None)
    with pytest.raises(ValueError, match="--benchmark longbench: no LongBench folder"):
        C.main(["--out", str(tmp_path / "forced"), "--benchmark", "longbench"])


def test_bad_command_lines_fail_before_any_work(tmp_path, capsys):
    for argv, message in ([["--budgets", "16"], "below the observation window"],
                          [["--n-samples", "0"], "--n-samples must be positive"],
                          [["--max-ratio", "0.5"], "--max-ratio must be a number >= 1"],
                          [["--max-ratio", "nan"], "--max-ratio must be a number >= 1"],
                          [["--max-ratio", "inf"], "--max-ratio must be a number >= 1"],
                          [["--out", "/proc/polykv-plans"], "not writable"]):
        with pytest.raises(ValueError, match=message):
            C.main(argv)


def test_tasks_restrict_the_calibration_samples_and_are_checked_before_the_model_loads(
        tiny_checkpoint, longbench_dir, tmp_path, monkeypatch):
    import ruler as R
    tokenizer = CK.load_tokenizer(tiny_checkpoint)
    cs = C.CalibrationSettings(n_samples=3, n_validation=2, max_length=1024)
    tasks = ("niah_single_3_noise", "vt")
    calibration, validation, data = C.calibration_sets(tokenizer, cs, None, tasks)
    ids = [s["_id"] for s in calibration + validation]
    assert data == "ruler-1024" and len(set(ids)) == 5
    assert sorted({s["dataset"] for s in calibration + validation}) == sorted(tasks)
    assert all(f"_s{R.CALIBRATION_SEED}_" in i for i in ids)
    default = C.calibration_sets(tokenizer, cs, None)  # no tasks: RULER's default tasks, as before
    assert {s["dataset"] for s in default[0] + default[1]} <= set(R.DEFAULT_TASKS)
    first = next(iter(LB.available_tasks(longbench_dir)))
    lb = C.calibration_sets(tokenizer, replace(cs, n_samples=1, n_validation=1), longbench_dir, (first,))
    assert {s["dataset"] for s in lb[0] + lb[1]} == {first}
    one, other = C.calibration_sets(tokenizer, cs, None, tasks), C.calibration_sets(tokenizer, cs, None, tasks[::-1])
    assert [s["_id"] for s in one[0]] != [s["_id"] for s in other[0]]  # so main puts them in one order:
    seen = []
    with monkeypatch.context() as m:
        m.setattr(CK, "load_model", lambda *a, **k: None)
        m.setattr(C, "run", lambda *a: seen.append(a[-1]))
        m.setattr(LB, "find_data_dir", lambda *a: None)
        for order in (tasks, tasks[::-1]):
            C.main(["--tasks", *order, "--out", str(tmp_path / "order")])
    assert seen == [tuple(t for t in R.ALL_TASKS if t in tasks)] * 2
    monkeypatch.setattr(CK, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match="unknown task.*nope"):
        C.main(["--tasks", "nope", "--data-dir", str(longbench_dir), "--out", str(tmp_path)])
    monkeypatch.setattr(LB, "find_data_dir", lambda *a: None)  # as on a machine without LongBench
    with pytest.raises(ValueError, match=r"unknown task.*nope; valid for RULER"):
        C.main(["--tasks", "vt", "nope", "--out", str(tmp_path)])


def test_without_longbench_the_calibration_runs_on_ruler_samples(tiny_checkpoint, tmp_path):
    """RULER samples build their own prompts (chat-wrapped task + answer prefix), from calibration seeds."""
    import ruler as R
    model, tokenizer = CK.load_model(tiny_checkpoint), CK.load_tokenizer(tiny_checkpoint)
    cs = C.CalibrationSettings(n_samples=3, n_validation=3, max_length=1024, n_continuation=4)
    assert C.parse_args(["--tova-agg", "mean"]).tova_agg == "mean" and C.parse_args([]).tova_agg == P.Settings().tova_agg
    paths = C.run(model, tokenizer, tiny_checkpoint, [64], tmp_path, cs, P.Settings(tova_agg="mean"), None)
    plan = K.load_plan(paths[64]["polykv"], n_layers=2)
    ids = plan.info["calibration_ids"] + plan.info["validation_ids"]
    assert plan.info["data"] == "ruler-1024" and plan.settings.tova_agg == "mean" and len(set(ids)) == 6
    assert all(i.startswith("ruler_") and f"_s{R.CALIBRATION_SEED}_" in i for i in ids)
    sample = next(s for t in R.DEFAULT_TASKS for s in R.generate(t, 1, tokenizer, 1024, seed=R.CALIBRATION_SEED)
                  if s["_id"] == ids[0])
    ref = C.build_references(model, tokenizer, tiny_checkpoint, [sample], cs, P.Settings(), "x", R)[0]
    assert ref.cache.lengths[0] == len(R.prompt_ids(tokenizer, sample)[0]) > 900  # RULER's prompt, filled to the length


def test_span_step_picks_polykvs_lowest_in_sample_kl_and_reruns_alone_on_finished_plans(
        tiny_checkpoint, longbench_dir, tmp_path, monkeypatch, capsys):
    """--spans scores the budget's plans at each span and keeps the span of PolyKV's lowest in-sample
    KL for all three; on a folder of finished plans only this step runs, and gives what a fresh run gives."""
    model, tokenizer = CK.load_model(tiny_checkpoint), CK.load_tokenizer(tiny_checkpoint)
    cs = C.CalibrationSettings(n_samples=4, n_validation=2, max_length=200, n_continuation=6)
    spanned = replace(cs, spans=[1, 3, 9])
    true_kls, seen = O.sample_kls, set()

    def kls(model, refs, plan):  # the objective, with span 1 and 9 made worse: span 3 must win
        seen.add(plan.settings.span)
        return [kl + (plan.settings.span != 3) for kl in true_kls(model, refs, plan)]
    monkeypatch.setattr(O, "sample_kls", kls)
    fresh = C.run(model, tokenizer, tiny_checkpoint, [48], tmp_path / "fresh", spanned, P.Settings(), longbench_dir)
    plans = {n: K.load_plan(p) for n, p in fresh[48].items()}
    assert seen == {1, 3, 9} and "-> span 3" in capsys.readouterr().out
    refs = C.build_references(model, tokenizer, tiny_checkpoint, C.calibration_sets(tokenizer, spanned, longbench_dir)[0],
                              spanned, P.Settings(), "check")
    for name, plan in plans.items():
        cal = plan.info["calibration"]
        assert plan.settings.span == cal["span"] == 3 and plan.info["calibration_settings"]["spans"] == [1, 3, 9]
        assert cal["in_sample_kl"] == cal["span_in_sample_kl"]["3"] < min(cal["span_in_sample_kl"][s] for s in "19")
        assert cal["best_uniform_in_sample_kl"] == cal["span_uniform_in_sample_kl"]["3"] and len(cal["validation_kls"]) == 2
        assert cal["in_sample_kl"] == pytest.approx(C.mean(true_kls(model, refs, plan)), rel=1e-5)  # the saved plan, rescored

    C.run(model, tokenizer, tiny_checkpoint, [48], tmp_path / "resumed", cs, P.Settings(), longbench_dir)
    with monkeypatch.context() as m:  # finished plans (made without --spans): the span step only
        m.setattr(C, "calibrate_budget", lambda *a, **k: pytest.fail("recalibrated finished plans"))
        resumed = C.run(model, tokenizer, tiny_checkpoint, [48], tmp_path / "resumed", spanned, P.Settings(), longbench_dir)
        assert "the span step only" in capsys.readouterr().out
        for name, path in resumed[48].items():
            again, plan = K.load_plan(path), plans[name]
            assert (again.policies, again.budgets, again.settings) == (plan.policies, plan.budgets, plan.settings)
            for key in ("span_in_sample_kl", "validation_kls", "best_uniform_validation_kls"):
                assert again.info["calibration"][key] == pytest.approx(plan.info["calibration"][key], rel=1e-5)
        m.setattr(O, "build_reference", lambda *a, **k: pytest.fail("redid a finished span step"))
        assert C.run(model, tokenizer, tiny_checkpoint, [48], tmp_path / "resumed", spanned, P.Settings(),
                     longbench_dir) == resumed


def test_candidates_limit_the_choice_and_a_folder_made_among_others_is_calibrated_again(
        tiny_checkpoint, longbench_dir, tmp_path, monkeypatch, capsys):
    """--candidates: the uniform step, routing, the search and the plans use those policies only; a folder
    made among other candidates (plans from before KeyDiff existed) is not kept, one made among the same is,
    also when its record predates the setting (read from the policies its uniform step scored)."""
    model, tokenizer = CK.load_model(tiny_checkpoint), CK.load_tokenizer(tiny_checkpoint)
    two = C.CalibrationSettings(n_samples=4, n_validation=2, max_length=200, n_continuation=6,
                                candidates=["knorm", "tova", "knorm"], refine=True, max_evals=6)
    assert two.candidates == ["tova", "knorm"]  # the registry's order, once each
    paths = C.run(model, tokenizer, tiny_checkpoint, [48], tmp_path, two, P.Settings(), longbench_dir)[48]
    for name, path in paths.items():
        plan = K.load_plan(path)
        assert set(plan.policies) <= {"tova", "knorm"} and list(plan.info["calibration"]["uniform_kl"]) == ["tova", "knorm"]
        assert all(set(pref) == {"tova", "knorm"} for pref in plan.info["calibration"]["signals"]["preference"] or [])
        assert all(s["step"].endswith(("tova", "knorm")) for s in plan.info["calibration"]["search_trace"]
                   if "->" in s["step"])  # the search's routing moves too
        record = json.loads(path.read_text())  # as a plan written before the setting existed
        del record["calibration_settings"]["candidates"]
        path.write_text(json.dumps(record))
    with monkeypatch.context() as m:
        m.setattr(C, "build_references", lambda *a, **k: pytest.fail("redid finished plans"))
        C.run(model, tokenizer, tiny_checkpoint, [48], tmp_path, two, P.Settings(), longbench_dir)  # the same: kept
        assert "already calibrated with these settings (kept): budgets [48]" in capsys.readouterr().out
        with pytest.raises(pytest.fail.Exception, match="redid finished plans"):  # every policy now: made again
            C.run(model, tokenizer, tiny_checkpoint, [48], tmp_path, replace(two, candidates=None), P.Settings(), longbench_dir)
        assert f"plans chose among tova knorm, this run among {' '.join(K.CANDIDATES)} (--candidates)" in capsys.readouterr().out
    scored = {"calibration_settings": {"n_samples": 4}, "calibration": {"uniform_kl": {"tova": 1.0, "keydiff": 1.0}}}
    assert K.calibration_settings(scored)["candidates"] == ["tova", "keydiff"]  # a record from before the field
    assert K.calibration_settings({"calibration_settings": {}})["candidates"] == list(K.FIRST_CANDIDATES)  # a study's
    assert C.CalibrationSettings().candidates == list(K.CANDIDATES) and "keydiff" in K.CANDIDATES
    with pytest.raises(ValueError, match="--candidates: 'random' is not a routing candidate \\(they are: streamingllm, "):
        C.CalibrationSettings(candidates=["knorm", "random"])


def test_span_fits_every_signal_at_that_span(tiny_checkpoint, longbench_dir, tmp_path, monkeypatch):
    """--span S: the uniform policies, single-layer signals and plans are all measured at span S (the
    recorded KLs are those of pooled scores, exactly), and plans fitted at another span are not resumed."""
    model, tokenizer = CK.load_model(tiny_checkpoint), CK.load_tokenizer(tiny_checkpoint)
    cs = C.CalibrationSettings(n_samples=4, n_validation=2, max_length=200, n_continuation=6, span=5)
    assert cs.spans == [5]  # no --spans: the fitted span, no choice
    true_single, true_kls, seen = O.single_layer_kl, O.sample_kls, set()
    monkeypatch.setattr(O, "single_layer_kl", lambda *a: seen.add(a[-1].span) or true_single(*a))
    monkeypatch.setattr(O, "sample_kls", lambda m, r, plan: seen.add(plan.settings.span) or true_kls(m, r, plan))
    paths = C.run(model, tokenizer, tiny_checkpoint, [48], tmp_path, cs, P.Settings(), longbench_dir)
    assert seen == {5}
    refs = C.build_references(model, tokenizer, tiny_checkpoint, C.calibration_sets(tokenizer, cs, longbench_dir)[0],
                              cs, P.Settings(), "check")
    polykv = K.load_plan(paths[48]["polykv"])
    cal = polykv.info["calibration"]
    assert polykv.settings.span == cal["span"] == polykv.info["calibration_settings"]["span"] == 5
    assert "| 48, span 5 (fitted at 5) | uniform " in report.calibration_table(tmp_path)
    for policy, kl in cal["uniform_kl"].items():  # the uniform step ran at span 5, not 1
        at = lambda span: C.mean(true_kls(model, refs, K.Plan([policy] * 2, [48] * 2,  # noqa: E731
                                                               settings=P.Settings(span=span))))
        assert kl == pytest.approx(at(5), rel=1e-5)
    assert any(kl != pytest.approx(C.mean(true_kls(model, refs, K.Plan([p] * 2, [48] * 2))), rel=1e-3)
               for p, kl in cal["uniform_kl"].items())  # and span 5 differs from span 1 somewhere
    seen.clear()  # plans fitted at span 5 are not resumed at span 1: every signal is measured again, at span 1
    unfitted = K.load_plan(C.run(model, tokenizer, tiny_checkpoint, [48], tmp_path, replace(cs, span=1, spans=None),
                                 P.Settings(), longbench_dir)[48]["polykv"])
    assert seen == {1} and unfitted.settings.span == unfitted.info["calibration_settings"]["span"] == 1
    for policy, kl in unfitted.info["calibration"]["uniform_kl"].items():
        assert kl == pytest.approx(C.mean(true_kls(model, refs, K.Plan([policy] * 2, [48] * 2))), rel=1e-5)
    args = C.parse_args(["--span", "5"])  # the command line: --span alone is not overridden by a --spans default
    assert C.CalibrationSettings(**{f: getattr(args, f) for f in C.CalibrationSettings.__dataclass_fields__}
                                 | {"max_length": 200}).spans == [5]


def test_bad_spans_fail_before_any_work():
    with pytest.raises(ValueError, match="--span 2: settings.span must be a positive odd number, got 2"):
        C.CalibrationSettings(span=2)
    with pytest.raises(ValueError, match="--spans 1 3 must include --span 15, the span the plans are fitted at"):
        C.CalibrationSettings(span=15, spans=[1, 3])  # the span step could otherwise drop the fitted span
    with pytest.raises(ValueError, match="--spans 4: settings.span must be a positive odd number, got 4"):
        C.CalibrationSettings(spans=[1, 4])
    with pytest.raises(ValueError, match="--spans 3.0: settings.span must be an integer"):
        C.CalibrationSettings(spans=[3.0])  # from Python: caught here, not after the calibration
    with pytest.raises(ValueError, match="--spans needs at least one span"):
        C.CalibrationSettings(spans=[])
    assert C.CalibrationSettings(spans=(1, 3)).spans == [1, 3]  # a list, as the plans' JSON reads back


def test_confirmation_keeps_only_the_routes_that_lower_the_joint_kl():
    """Layers 0, 2 and 3 are routed away from h2o. Jointly layer 0's route helps on both samples,
    layer 2's hurts, layer 3's lowers the mean through one sample only (the majority rule drops it):
    the confirmed plan keeps layer 0's route; routes are tried largest single-layer gain first."""
    routed, budgets = ["tova", "h2o", "snapkv", "tova"], [64, 32, 96, 64]
    preference = [{"h2o": 0.5, "tova": 0.1}, {"h2o": 0.2}, {"h2o": 0.9, "snapkv": 0.2}, {"h2o": 0.3, "tova": 0.2}]
    seen = []

    def objective(policies, b):
        assert b == budgets  # the plan's budgets are kept
        seen.append(list(policies))
        cost = 1.0 - 0.3 * (policies[0] == "tova") + 0.2 * (policies[2] == "snapkv")
        return [cost - (policies[3] == "tova"), cost + 0.1 + 0.5 * (policies[3] == "tova")]
    policies, trace = S.confirm_routing(objective, routed, budgets, "h2o", preference, 0.5)
    assert policies == ["tova", "h2o", "h2o", "h2o"]
    assert seen == [["h2o"] * 4, ["h2o", "h2o", "snapkv", "h2o"], ["tova", "h2o", "h2o", "h2o"],
                    ["tova", "h2o", "h2o", "tova"]]  # gains 0.7, 0.4, 0.1
    assert [t["step"] for t in trace] == ["start", "layer 0 -> tova", "end"] and trace[-1]["evaluations"] == 4
    assert S.confirm_routing(objective, ["h2o"] * 4, budgets, "h2o", preference, 0.5)[0] == ["h2o"] * 4


def test_token_kl_max_is_recorded_labelled_and_never_served_by_mean_plans(tiny_checkpoint, longbench_dir, tmp_path):
    """--token-kl max: the plans record it, their validation KLs are each held-out sample's worst-token
    KL, the summary says so, and a folder calibrated with the mean is calibrated again, not reused."""
    model, tokenizer = CK.load_model(tiny_checkpoint), CK.load_tokenizer(tiny_checkpoint)
    cs = C.CalibrationSettings(n_samples=4, n_validation=2, max_length=200, n_continuation=6)
    run = lambda s: C.run(model, tokenizer, tiny_checkpoint, [48], tmp_path, s, P.Settings(), longbench_dir)  # noqa: E731
    assert K.load_plan(run(cs)[48]["polykv"]).info["calibration_settings"]["token_kl"] == "mean"
    worst = replace(cs, token_kl="max")
    plan = K.load_plan(run(worst)[48]["polykv"])
    assert plan.info["calibration_settings"]["token_kl"] == "max"
    val_refs = C.build_references(model, tokenizer, tiny_checkpoint, C.calibration_sets(tokenizer, worst, longbench_dir)[1],
                                  worst, P.Settings(), "x")
    assert [r.token_kl for r in val_refs] == ["max", "max"]
    assert plan.info["calibration"]["validation_kls"] == pytest.approx(O.sample_kls(model, val_refs, plan), abs=2e-6)
    assert ", KL of each sample's worst token | uniform " in report.calibration_table(tmp_path)


def test_confirmation_runs_alone_on_finished_plans_and_matches_a_fresh_run(tiny_checkpoint, longbench_dir, tmp_path,
                                                                          monkeypatch, capsys):
    """Single-layer signals route layer 0 to TOVA and layer 1 to SnapKV; jointly only TOVA on layer 0
    helps (and K-norm is the best uniform policy): --confirm-routing keeps that route alone. On plans
    made without it, only the confirmation (at the fitted span) and the span step run, and give what a
    fresh run gives; confirmed plans never serve a run without it, nor unconfirmed refined ones a run
    with it, nor a half-confirmed folder either."""
    model, tokenizer = CK.load_model(tiny_checkpoint), CK.load_tokenizer(tiny_checkpoint)
    cs = C.CalibrationSettings(n_samples=4, n_validation=2, max_length=200, n_continuation=6, span=3)
    true_single, true_kls, spans_seen = O.single_layer_kl, O.sample_kls, set()
    calibrate = lambda folder, settings: C.run(model, tokenizer, tiny_checkpoint, [48], tmp_path / folder,  # noqa: E731
                                               settings, P.Settings(), longbench_dir)
    joint_cost = [{"knorm": 0, "tova": -1, "snapkv": 3}, {"knorm": 0, "tova": 2, "snapkv": 3}]
    monkeypatch.setattr(O, "single_layer_kl", lambda m, r, l, p, *a: true_single(m, r, l, p, *a)
                        + 10 * (p != ("tova", "snapkv")[l]))
    monkeypatch.setattr(O, "sample_kls", lambda m, refs, plan: spans_seen.add(plan.settings.span) or [kl + 10 * sum(
        joint_cost[l].get(p, 2) for l, p in enumerate(plan.policies)) - 100 * (plan.settings.span == 1)
        for kl in true_kls(m, refs, plan)])  # span 1 wins a span step: the made plans below choose it
    fresh = calibrate("fresh", replace(cs, confirm_routing=True))
    assert "[48] polykv: 1 of 2 routes confirmed on the joint KL: layer 0 -> tova" in capsys.readouterr().out
    for name in ("polykv", "polykv_routing"):
        plan = K.load_plan(fresh[48][name])
        assert plan.policies == ["tova", "knorm"] and plan.info["calibration"]["best_uniform"] == "knorm"
        assert [min(row, key=row.get) for row in plan.info["calibration"]["signals"]["preference"]] == ["tova", "snapkv"]
    assert "| 48, span 3 (fitted at 3), routes confirmed | uniform knorm | " in report.calibration_table(tmp_path / "fresh")
    calibrate("resumed", replace(cs, spans=[1, 3]))  # made without the confirmation, and their span step chose span 1
    made = K.load_plan(tmp_path / "resumed" / "budget48" / "polykv.json")
    assert made.policies == ["tova", "snapkv"] and made.settings.span == 1
    capsys.readouterr()
    spans_seen.clear()

    class Recalibrated(Exception):
        pass

    def recalibrate(*args, **kwargs):
        raise Recalibrated()

    def no_recalibration(*args, **kwargs):
        pytest.fail("recalibrated finished plans")

    with monkeypatch.context() as m:
        m.setattr(C, "calibrate_budget", no_recalibration)
        resumed = calibrate("resumed", replace(cs, confirm_routing=True))
        assert "the confirmation and the span step only" in capsys.readouterr().out and spans_seen == {3}
        for name, path in resumed[48].items():
            again, plan = K.load_plan(path), K.load_plan(fresh[48][name])
            assert (again.policies, again.budgets) == (plan.policies, plan.budgets)
            for key in ("confirmation_trace", "validation_kls"):
                assert again.info["calibration"].get(key) == pytest.approx(plan.info["calibration"].get(key))
            assert again.info["calibration_settings"]["confirm_routing"]
        m.setattr(O, "build_reference", lambda *a, **k: pytest.fail("redid a finished confirmation"))
        assert calibrate("resumed", replace(cs, confirm_routing=True)) == resumed  # confirmed plans, asked with: kept
        m.undo()  # other spans: the span step only, no second confirmation
        m.setattr(C, "calibrate_budget", no_recalibration)
        calibrate("resumed", replace(cs, confirm_routing=True, spans=[1, 3]))
        printed = capsys.readouterr().out
        assert "in " + str(tmp_path / "resumed") + ": the span step only" in printed and "routes confirmed" not in printed
        m.setattr(C, "calibrate_budget", recalibrate)
        with pytest.raises(Recalibrated):  # confirmed plans, asked without: made again
            calibrate("fresh", cs)
        half = tmp_path / "resumed" / "budget48" / "polykv_routing.json"  # interrupted: one plan written unconfirmed
        info = json.loads(half.read_text())
        info["calibration_settings"]["confirm_routing"] = False
        half.write_text(json.dumps(info))
        with pytest.raises(Recalibrated):
            calibrate("resumed", replace(cs, confirm_routing=True, spans=[1, 3]))
    refined = replace(cs, refine=True, max_evals=3)
    calibrate("refined", refined)
    with monkeypatch.context() as m, pytest.raises(Recalibrated):  # refined from unconfirmed routes: made again
        m.setattr(C, "calibrate_budget", recalibrate)
        calibrate("refined", replace(refined, confirm_routing=True))
