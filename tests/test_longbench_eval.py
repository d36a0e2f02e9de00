"""longbench_eval.py end to end on a tiny random checkpoint and a tiny LongBench-format folder:
outputs, resume, a 2-process gloo run equal to 1 process, calibration-id exclusion, query-agnostic
compression, RULER without data, bad input."""
import json
from dataclasses import replace
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import longbench as LB  # noqa: E402
import longbench_metrics as LM  # noqa: E402
import longbench_eval as E  # noqa: E402
import run_settings as RS  # noqa: E402
import checkpoint as CK  # noqa: E402
import model as M  # noqa: E402
import polykv as K  # noqa: E402
import report  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
N_LAYERS = 3
WORDS = "alpha beta gamma delta river stone cloud maple ember quartz willow harbor".split()


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE without merges: one token per byte, plus ChatML specials."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = byte_tokenizer()
    tok.save(str(d / "tokenizer.json"))
    hf = dict(model_type="llama", vocab_size=tok.get_vocab_size(), hidden_size=48, intermediate_size=64,
              num_hidden_layers=N_LAYERS, num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=4096,
              tie_word_embeddings=True, eos_token_id=tok.token_to_id("<|im_end|>"))
    (d / "config.json").write_text(json.dumps(hf))
    torch.manual_seed(0)
    net = M.Transformer(CK.config_from_hf(hf))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    save_file({f"model.{k}": v.contiguous() for k, v in net.state_dict().items() if k != "lm_head.weight"},
              str(d / "model.safetensors"))
    return d


def context(i: int, n_words: int = 90) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n_words))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """2 tasks x 6 samples: hotpotqa (chat template, QA F1) and trec (raw prompt, classification).
    2 per task are the calibration reserve; the other 4, in file order, are evaluated."""
    d = tmp_path_factory.mktemp("longbench")
    (d / "config").mkdir()
    (d / "config" / "dataset2prompt.json").write_text(json.dumps({
        "hotpotqa": "Answer the question.\n{context}\nQuestion: {input}\nAnswer:",
        "trec": "Classify the question.\n{context}\n{input}"}))
    (d / "config" / "dataset2maxlen.json").write_text(json.dumps({"hotpotqa": 6, "trec": 5}))
    for task, extra in (("hotpotqa", {}), ("trec", {"all_classes": ["Location", "Person", "Number"]})):
        rows = [{"input": f"what is {WORDS[i]}?", "context": context(i), "answers": [WORDS[i]], "_id": f"{task}-{i}",
                 "length": 90, "dataset": task, "language": "en", **extra} for i in range(6)]
        (d / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def args(ckpt, data, out, *extra) -> list[str]:
    return ["--model", str(ckpt), "--data-dir", str(data), "--out", str(out), "--max-length", "200",
            "--limit", "2", *extra]


def test_end_to_end_then_resume(ckpt, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert E.main(args(ckpt, data, out, "--methods", "h2o", "snapkv", "--budgets", "48", "64")) == 0
    printed = capsys.readouterr().out
    recs = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(recs) == 4 * (1 + 2 * 2)  # 4 samples x (fullkv + 2 methods x 2 budgets)
    assert {(r["method"], r["budget"]) for r in recs} == {("fullkv", None)} | {
        (m, b) for m in ("h2o", "snapkv") for b in (48, 64)}
    assert all(r["n_prompt_tokens"] > 64 for r in recs)  # long enough to be compressed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"] == ["hotpotqa", "trec"] and metrics["n_samples"] == 4
    assert set(metrics["scores"]) == {"fullkv", "h2o", "snapkv"}
    assert metrics["fidelity"]["fullkv"]["full"] == {"exact_match": 1.0, "prefix_agreement": 1.0, "tf_agreement": 1.0,
                                                     "tf_kl": 0.0}
    tf = metrics["fidelity"]["h2o"]["48"]
    assert 0 <= tf["tf_agreement"] < 1 and tf["tf_kl"] > 0
    assert set(metrics["scores"]["h2o"]) == {"48", "64"}
    sd = metrics["score_differences"]["48"]  # FullKV minus the best baseline, from the same scores
    best = max(("h2o", "snapkv"), key=lambda m: metrics["scores"][m]["48"]["average"])
    assert sd["best_baseline"] == best and sd["fullkv_minus_best"][0] == pytest.approx(
        metrics["scores"]["fullkv"]["full"]["average"] - metrics["scores"][best]["48"]["average"])
    assert sd["fullkv_minus_best"][1] <= sd["fullkv_minus_best"][0] <= sd["fullkv_minus_best"][2]
    per = metrics["per_sample_scores"]  # kept per sample, in sample_ids' order: another run can pair with them
    by_id = {r["id"]: r for r in recs if (r["method"], r["budget"]) == ("snapkv", 48)}
    assert {t: len(ids) for t, ids in metrics["sample_ids"].items()} == {"hotpotqa": 2, "trec": 2}
    assert per["snapkv"]["48"]["hotpotqa"] == [LM.sample_scores("hotpotqa", [by_id[i]["prediction"]], [[WORDS[int(i[-1])]]],
                                                                ["x"])[0] for i in metrics["sample_ids"]["hotpotqa"]]
    assert report.average(per["snapkv"]["48"]) == pytest.approx(metrics["scores"]["snapkv"]["48"]["average"])
    assert report.bootstrap_difference(per["fullkv"]["full"], per[best]["48"])[0] == pytest.approx(sd["fullkv_minus_best"][0])
    assert (out / "scores.png").stat().st_size > 0 and (out / "results.md").is_file()
    assert metrics["tf_tokens"] == E.TF_TOKENS and f"(first {E.TF_TOKENS} tokens)" in (out / "results.md").read_text()
    assert "longbench, query-aware, 2 per task" in printed.splitlines()[0]  # the mode, said first
    assert "| h2o |" in printed and "| snapkv | 0.00 / 0." in printed  # the summary table
    kl_row = f"| h2o | {tf['tf_kl']:.4f} | {metrics['fidelity']['h2o']['64']['tf_kl']:.4f} |"
    assert kl_row in printed  # the teacher-forced KL summary, one column per budget
    # the compressed caches really are smaller than the full one
    kv = {(r["method"], r["budget"]): r["kv_bytes"] for r in recs if r["id"] == recs[0]["id"]}
    assert kv[("h2o", 48)] < kv[("h2o", 64)] < kv[("fullkv", None)]

    calls = []
    monkeypatch.setattr(M, "generate_batch", lambda *a, **k: calls.append(1) or [])
    before = (out / "predictions.jsonl").read_text()
    assert E.main(args(ckpt, data, out, "--methods", "h2o", "snapkv", "--budgets", "48", "64")) == 0
    assert calls == [] and (out / "predictions.jsonl").read_text() == before
    assert json.loads((out / "metrics.json").read_text())["scores"] == metrics["scores"]


def test_rerunning_some_budgets_keeps_the_others_in_the_tables(ckpt, data, tmp_path, monkeypatch):
    """The tables cover every budget whose records are all in the folder, not only the budgets of
    the last command; a budget missing a method's records is left out of them."""
    out = tmp_path / "run"
    assert E.main(args(ckpt, data, out, "--methods", "h2o", "--budgets", "48", "64")) == 0
    both = json.loads((out / "metrics.json").read_text())
    monkeypatch.setattr(M, "generate_batch", lambda *a, **k: pytest.fail("recomputed a finished run"))
    assert E.main(args(ckpt, data, out, "--methods", "h2o", "--budgets", "64")) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert set(again["scores"]["h2o"]) == {"48", "64"} and again["scores"] == both["scores"]
    assert set(again["gap_recovery"]) == set(both["gap_recovery"])
    assert "| h2o | 0.00 / 0." in (out / "results.md").read_text()  # the summary table, one column per budget
    monkeypatch.undo()
    assert E.main(args(ckpt, data, out, "--methods", "h2o", "tova", "--budgets", "64")) == 0  # no tova at 48
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["scores"]["h2o"]) == set(metrics["scores"]["tova"]) == {"64"}


def test_a_budget_on_record_with_other_policy_settings_stays_out_of_the_tables(ckpt, data, tmp_path):
    """A plan at another budget made with other policy settings cannot share this run's tables
    (its baselines would differ): that budget is left out, the run still reports its own."""
    out = tmp_path / "run"
    for d in ("p48", "p64"):
        (tmp_path / d).mkdir()
    p48 = save_plans(tmp_path / "p48", ckpt.name, budget=48)[0]
    p64 = save_plans(tmp_path / "p64", ckpt.name, budget=64)[0]
    assert E.main(args(ckpt, data, out, "--plan", p48, "--methods", "polykv", "--budgets", "48")) == 0
    plan = K.load_plan(p48)  # the same layers (its records still match), other settings
    plan.settings = replace(plan.settings, window=16)
    K.save_plan(plan, p48)
    assert E.main(args(ckpt, data, out, "--plan", p48, p64, "--methods", "polykv", "--budgets", "64")) == 0
    assert set(json.loads((out / "metrics.json").read_text())["scores"]["polykv"]) == {"64"}


def test_bootstrap_difference_exact_cases():
    same = {"a": [10.0, 50.0, 0.0], "b": [100.0]}
    assert report.bootstrap_difference(same, same) == [0.0, 0.0, 0.0]
    shifted = {t: [x + 7.5 for x in v] for t, v in same.items()}
    assert report.bootstrap_difference(shifted, same) == pytest.approx([7.5, 7.5, 7.5])
    # one task, per-sample differences {0, 10}: a resample's mean is 0, 5 or 10 (each extreme 1/4 of the time)
    diff = report.bootstrap_difference({"t": [10.0, 30.0]}, {"t": [10.0, 20.0]})
    assert diff == pytest.approx([5.0, 0.0, 10.0])
    # tasks weigh equally, as in the LongBench average: task "b" (one sample, +40) counts as much as "a"
    point, low, high = report.bootstrap_difference({"a": [0.0, 0.0, 0.0], "b": [40.0]}, {"a": [0.0, 0.0, 0.0], "b": [0.0]})
    assert (point, low, high) == pytest.approx((20.0, 20.0, 20.0))


def test_bootstrap_gap_recovery_exact_cases():
    best, full = {"a": [0.0, 0.0], "b": [20.0]}, {"a": [100.0, 100.0], "b": [60.0]}
    half = {"a": [50.0, 50.0], "b": [40.0]}  # recovers half of each task's gap: 50/100 and 20/40
    assert report.bootstrap_gap_recovery(half, best, full) == pytest.approx([0.5, 0.5, 0.5])
    assert report.bootstrap_gap_recovery(best, best, best) == [None, None, None]  # no gap: no recovery
    # one task, FullKV 100 and best 0 on both samples, the method 0 or 100: a resample recovers 0, 1/2 or 1
    assert report.bootstrap_gap_recovery({"t": [0.0, 100.0]}, {"t": [0.0, 0.0]}, {"t": [100.0, 100.0]}) == \
        pytest.approx([0.5, 0.0, 1.0])
    # FullKV ties the best baseline in some draws (a quarter here): the interval is open at both ends
    point, low, high = report.bootstrap_gap_recovery({"t": [0.0, 0.0]}, {"t": [0.0, 0.0]}, {"t": [0.0, 100.0]})
    assert (point, low, high) == (0.0, None, None)


def test_teacher_forced_fidelity_equals_one_cache_at_a_time(ckpt):
    """The batched teacher-forced fidelity equals, per cache, the plain teacher-forced pass:
    agreement = argmax matches, KL = polykv.continuation_kl; an uncompressed cache agrees fully."""
    model = CK.load_model(ckpt)
    torch.manual_seed(0)
    logits, cache, stats = K.prefill_with_stats(model, torch.randint(0, 200, (1, 120)), 32)
    full_tokens = M.generate(model, cache.clone(), logits, 20)
    plans = [K.uniform_plan(N_LAYERS, p, 48) for p in ("h2o", "tova")] + [K.pyramid_plan(N_LAYERS, 64)]
    caches = [cache.clone()] + [K.apply_plan(cache, stats, p) for p in plans]
    cont = torch.tensor(full_tokens)
    full_lp = K.teacher_forced_logprobs(model, cache.clone(), cont)
    got = E.teacher_forced_fidelity(model, M.stack_caches(caches), full_tokens, full_lp)
    assert got[0] == {"tf_agreement": 1.0, "tf_kl": 0.0}
    for c, g in zip(caches[1:], got[1:]):
        lp = K.teacher_forced_logprobs(model, c.clone(), cont)
        assert g["tf_agreement"] == pytest.approx((lp.argmax(-1) == cont[1:]).float().mean().item(), abs=1e-5)
        assert g["tf_kl"] == pytest.approx(K.continuation_kl(full_lp, model, c.clone(), cont), rel=1e-4, abs=1e-6)
    assert any(g["tf_agreement"] < 1 for g in got[1:])
    assert E.teacher_forced_fidelity(model, M.stack_caches(caches), full_tokens[:1], full_lp)[1]["tf_agreement"] is None


def test_batched_decoding_equals_one_by_one(ckpt, data, tmp_path):
    """--batch 1 decodes each run alone; the default stacks a budget's runs: same predictions."""
    extra = ["--methods", "h2o", "snapkv", "tova", "pyramidkv", "--budgets", "40", "64"]
    assert E.main(args(ckpt, data, tmp_path / "one", *extra, "--batch", "1")) == 0
    assert E.main(args(ckpt, data, tmp_path / "many", *extra)) == 0
    strip = lambda d: sorted((r["id"], r["method"], r["budget"], r["tokens"], r["kv_bytes"]) for r in  # noqa: E731
                             map(json.loads, (tmp_path / d / "predictions.jsonl").read_text().splitlines()))
    assert strip("one") == strip("many") and len(strip("one")) == 4 * 9
    assert len({r[3] and tuple(r[3]) for r in strip("one")}) > 2  # the methods really differ


def test_interrupted_run_resumes_only_missing(ckpt, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert E.main(args(ckpt, data, out, "--methods", "tova", "--budget", "48")) == 0
    lines = (out / "predictions.jsonl").read_text().splitlines()
    (out / "predictions.jsonl").write_text("\n".join(lines[:-3]) + '\n{"torn')  # killed mid-write
    real, calls = M.generate_batch, []
    monkeypatch.setattr(M, "generate_batch",  # counts the runs decoded
                        lambda model, cache, logits, *a, **k: calls.extend([1] * len(logits)) or real(model, cache, logits, *a, **k))
    assert E.main(args(ckpt, data, out, "--methods", "tova", "--budget", "48")) == 0
    assert len(calls) == 3
    untimed = lambda ls: sorted(json.dumps({k: v for k, v in json.loads(l).items() if "seconds" not in k})  # noqa: E731
                                for l in ls)
    assert untimed((out / "predictions.jsonl").read_text().splitlines()) == untimed(lines)
    # resuming into a folder made with other settings is refused
    assert E.main(args(ckpt, data, out, "--methods", "tova", "--budget", "48", "--max-length", "180")) == 2
    assert "holds a run with different max_length" in capsys.readouterr().err


def test_resume_follows_the_data_not_its_path(ckpt, data, tmp_path, monkeypatch, capsys):
    out, moved = tmp_path / "run", tmp_path / "elsewhere"
    assert E.main(args(ckpt, data, out, "--methods", "tova", "--budget", "48")) == 0
    shutil.copytree(data, moved)  # the same files in another place: the run resumes, nothing recomputed
    monkeypatch.setattr(M, "generate_batch", lambda *a, **k: pytest.fail("recomputed a finished run"))
    assert E.main(args(ckpt, moved, out, "--methods", "tova", "--budget", "48")) == 0
    rows = (moved / "trec.jsonl").read_text().splitlines()
    (moved / "trec.jsonl").write_text("\n".join(rows[:2]) + "\n")  # other data: refused
    assert E.main(args(ckpt, moved, out, "--methods", "tova", "--budget", "48")) == 2
    assert "holds a run with different data_id" in capsys.readouterr().err


def test_without_data_or_network_ruler_runs_and_says_so(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LONGBENCH_DIR", raising=False)
    monkeypatch.setattr(E, "PROJECT", tmp_path)  # no data/LongBench there
    monkeypatch.setattr(LB, "online", lambda: False)
    out = tmp_path / "ruler"
    assert E.main(["--model", str(ckpt), "--out", str(out), "--max-length", "900", "--limit", "1",
                   "--tasks", "niah_single_1", "--methods", "knorm", "--budget", "40"]) == 0
    printed = capsys.readouterr().out
    assert "no LongBench folder and no network: running RULER" in printed and "ruler, query-aware" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"] == ["niah_single_1"] and metrics["benchmark"] == "ruler"
    recs = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert {r["id"] for r in recs} == {"ruler_niah_single_1_900_s0_0"} and all(r["n_prompt_tokens"] <= 900 for r in recs)


def test_query_agnostic_compresses_the_context_only(ckpt, data, tmp_path):
    """FullKV is the same either way (context, then question, on one cache); compressed methods differ,
    and their caches end with the question, which is never evicted."""
    aware, agnostic = tmp_path / "aware", tmp_path / "agnostic"
    extra = ["--methods", "snapkv", "knorm", "--budget", "40", "--limit", "1"]
    assert E.main(args(ckpt, data, aware, *extra)) == 0
    assert E.main(args(ckpt, data, agnostic, *extra, "--query", "agnostic")) == 0
    rec = lambda d: {(r["id"], r["method"]): r for r in map(json.loads, (d / "predictions.jsonl").read_text().splitlines())}  # noqa: E731
    a, g = rec(aware), rec(agnostic)
    assert all(a[k]["tokens"] == g[k]["tokens"] for k in a if k[1] == "fullkv")
    for k in a:  # the cache when decoding starts: the same for FullKV; query-agnostic keeps the question on top
        assert a[k]["kv_bytes"] == g[k]["kv_bytes"] if k[1] == "fullkv" else a[k]["kv_bytes"] < g[k]["kv_bytes"]
    assert any(a[k]["tf_kl"] != g[k]["tf_kl"] for k in a if k[1] != "fullkv")
    assert json.loads((agnostic / "metrics.json").read_text())["query"] == "agnostic"
    assert E.main(args(ckpt, data, aware, *extra, "--query", "agnostic")) == 2  # one mode per folder


def save_plans(d: Path, model: str, calib_ids=(), val_ids=(), n_layers=N_LAYERS, budget=48) -> list[str]:
    paths = []
    for name, policies in (("polykv", ["h2o", "snapkv", "tova"]), ("polykv_routing", ["tova", "h2o", "snapkv"])):
        budgets = [budget - 16, budget + 16] + [budget] * (n_layers - 2)
        plan = K.Plan(policies[:n_layers] + ["h2o"] * (n_layers - 3), budgets, name=name, model=model,
                      info={"calibration_ids": list(calib_ids), "validation_ids": list(val_ids)})
        K.save_plan(plan, d / f"{name}.json")
        paths.append(str(d / f"{name}.json"))
    return paths


def outside_reserve(data: Path) -> dict[str, list[str]]:
    """Per task, in file order, the ids outside the calibration reserve: what gets evaluated."""
    by_task = LB.load_samples(data)
    reserve = LB.reserved_ids(by_task)
    return {t: [s["_id"] for s in ss if s["_id"] not in reserve] for t, ss in by_task.items()}


def test_plans_exclude_their_samples_for_every_method(ckpt, data, tmp_path, capsys):
    free = outside_reserve(data)
    plans = save_plans(tmp_path, ckpt.name, calib_ids=[free["hotpotqa"][0]], val_ids=[free["trec"][1]])
    out = tmp_path / "run"
    assert E.main(args(ckpt, data, out, "--plan", *plans, "--methods", "snapkv", "polykv", "polykv_routing")) == 0
    assert "(6 calibration samples excluded)" in capsys.readouterr().out  # the reserve's 4 and the plans' 2
    recs = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    # the next ones in file order
    assert {r["id"] for r in recs} == {*free["hotpotqa"][1:3], free["trec"][0], free["trec"][2]}
    assert {r["budget"] for r in recs} == {None, 48}  # the budget comes from the plans
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["excluded_calibration_samples"] == 6
    gap = metrics["gap_recovery"]["48"]["polykv"]
    assert gap["best_baseline"] == "snapkv" and "fidelity" in gap
    fid = metrics["fidelity"]
    assert gap["tf_kl"] == pytest.approx((fid["snapkv"]["48"]["tf_kl"] - fid["polykv"]["48"]["tf_kl"]) / fid["snapkv"]["48"]["tf_kl"])
    best = fid[gap["best_baseline_tf_agreement"]]["48"]["tf_agreement"]
    assert gap["tf_agreement"] == pytest.approx((fid["polykv"]["48"]["tf_agreement"] - best) / (1 - best))
    d = metrics["score_differences"]["48"]  # one baseline here: it is the best on both measures
    assert d["best_baseline"] == d["best_baseline_tf_kl"] == "snapkv"
    assert d["polykv"]["minus_best"][0] == pytest.approx(
        metrics["scores"]["polykv"]["48"]["average"] - metrics["scores"]["snapkv"]["48"]["average"])
    assert d["polykv"]["tf_kl_minus_best"][0] == pytest.approx(fid["polykv"]["48"]["tf_kl"] - fid["snapkv"]["48"]["tf_kl"])
    assert d["polykv"]["tf_kl_gap_recovery"][0] == pytest.approx(gap["tf_kl"])  # the point: the same share, 1 - KL / best KL
    assert d["polykv"]["tf_kl_gap_recovery"][1] <= gap["tf_kl"] <= d["polykv"]["tf_kl_gap_recovery"][2]
    # asking explicitly for a calibration sample (a plan's, or the reserve's) is refused
    reserved = sorted(LB.reserved_ids(LB.load_samples(data)))[0]
    for asked in (free["hotpotqa"][0], reserved):
        assert E.main(args(ckpt, data, tmp_path / "x", "--plan", *plans, "--ids", asked, free["trec"][0])) == 2
        assert "both calibration and evaluation" in capsys.readouterr().err


def test_a_plan_evaluated_in_the_other_query_mode_is_named(ckpt, data, tmp_path, capsys):
    """Plans record the query mode they were calibrated for (those written before the field: query-aware);
    evaluating one in the other mode is allowed (a transfer) and said."""
    paths = save_plans(tmp_path, ckpt.name)
    for path, recorded in zip(paths, ({"n_samples": 16}, {"n_samples": 16, "query": "agnostic"})):
        doc = json.loads(Path(path).read_text())
        Path(path).write_text(json.dumps({**doc, "calibration_settings": recorded}))
    extra = ["--plan", *paths, "--methods", "polykv", "polykv_routing", "--limit", "1"]
    assert E.main(args(ckpt, data, tmp_path / "agnostic", *extra, "--query", "agnostic")) == 0
    out = capsys.readouterr().out
    assert "the polykv plan for budget 48 was calibrated query-aware; this run compresses query-agnostic" in out
    assert "polykv_routing plan" not in out
    assert E.main(args(ckpt, data, tmp_path / "aware", *extra)) == 0
    out = capsys.readouterr().out
    assert "the polykv_routing plan for budget 48 was calibrated query-agnostic; this run compresses query-aware" in out
    assert "the polykv plan" not in out


def test_a_plan_with_a_span_gives_it_to_every_method_of_its_run(ckpt, data, tmp_path):
    """A plan calibrated with a span (calibrate.py --spans) is evaluated beside baselines that pool
    their scores the same way (one run, one set of policy settings), and results.md says so."""
    path = save_plans(tmp_path, ckpt.name)[0]
    plan = K.load_plan(path)
    plan.settings = replace(plan.settings, span=3)
    K.save_plan(plan, path)
    s = RS.parse_settings(args(ckpt, data, tmp_path / "run", "--methods", "knorm", "polykv", "--budgets", "48"))
    runs = RS.build_runs(s, {("polykv", 48): K.load_plan(path)}, N_LAYERS)
    assert [(m, p.settings.span) for m, _, p in runs if p] == [("knorm", 3), ("polykv", 3)]
    assert E.main(args(ckpt, data, tmp_path / "run", "--plan", path, "--methods", "knorm", "polykv")) == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["span"] == 3
    assert "max-pooled over 3 neighbouring tokens before selection (span), baselines included" in (
        tmp_path / "run" / "results.md").read_text()


def test_every_budget_evaluates_the_same_samples(ckpt, data, tmp_path):
    """With or without a plan at that budget, with or without PolyKV: the committed plans and the
    reserve are excluded whatever is asked, so the samples never depend on the budgets."""
    ids = lambda d: {json.loads(l)["id"] for l in (d / "predictions.jsonl").read_text().splitlines()}  # noqa: E731
    assert E.main(args(ckpt, data, tmp_path / "a", "--methods", "knorm", "--budget", "64")) == 0
    assert E.main(args(ckpt, data, tmp_path / "b", "--methods", "knorm", "--budget", "40", "48")) == 0
    free = outside_reserve(data)
    assert ids(tmp_path / "a") == ids(tmp_path / "b") == {*free["hotpotqa"][:2], *free["trec"][:2]}


def test_a_changed_plan_reruns_only_its_method(ckpt, data, tmp_path, monkeypatch):
    """Baselines first, PolyKV later into the same folder: same samples, baselines reused;
    a recalibrated plan re-runs PolyKV alone and the report uses the new plan's predictions."""
    out, plan_dir = tmp_path / "run", tmp_path / "plans"
    free = outside_reserve(data)
    plans = save_plans(plan_dir, ckpt.name, calib_ids=[free["hotpotqa"][0]])
    assert E.main(args(ckpt, data, out, "--plan", *plans, "--methods", "snapkv")) == 0
    real, calls = M.generate_batch, []
    monkeypatch.setattr(M, "generate_batch",  # counts the runs decoded
                        lambda model, cache, logits, *a, **k: calls.extend([1] * len(logits)) or real(model, cache, logits, *a, **k))
    assert E.main(args(ckpt, data, out, "--plan", plans[0], "--methods", "snapkv", "polykv")) == 0
    assert len(calls) == 4  # polykv on 4 samples; fullkv and snapkv reused
    first = json.loads((out / "metrics.json").read_text())
    plan = K.load_plan(plans[0])
    plan.budgets = [plan.budgets[1], plan.budgets[0]] + plan.budgets[2:]  # "recalibrated"
    K.save_plan(plan, plans[0])
    calls.clear()
    assert E.main(args(ckpt, data, out, "--plan", plans[0], "--methods", "snapkv", "polykv")) == 0
    assert len(calls) == 4
    recs = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert len({r["plan"] for r in recs if r["method"] == "polykv"}) == 2  # old records kept, not used
    second = json.loads((out / "metrics.json").read_text())
    assert second["scores"]["snapkv"] == first["scores"]["snapkv"] and second["n_samples"] == first["n_samples"] == 4
    assert {r["id"] for r in recs} == {*free["hotpotqa"][1:3], *free["trec"][:2]}


def test_a_missing_plan_fails_before_any_sample_is_read_and_names_the_calibration_it_needs(ckpt, data, tmp_path,
                                                                                           monkeypatch, capsys):
    monkeypatch.setattr(E, "load_benchmark", lambda *a: pytest.fail("read the samples first"))
    for mode in ("aware", "agnostic"):
        assert E.main(args(ckpt, data, tmp_path / mode, "--methods", "polykv", "--budget", "64", "--query", mode)) == 2
        err = capsys.readouterr().err
        assert f"python calibrate.py --model {ckpt} --budgets 64 --data-dir {data} --max-length 200" in err
        assert ("--query agnostic" in err) == (mode == "agnostic")
    ruler = ["--model", str(ckpt), "--benchmark", "ruler", "--tasks", "niah_single_1", "--limit", "1", "--max-length",
             "1024", "--methods", "polykv", "--budget", "64", "--out", str(tmp_path / "ruler")]
    assert E.main(ruler) == 2  # RULER's data, length and tasks, even where a LongBench folder would be found
    assert "--budgets 64 --benchmark ruler --tasks niah_single_1 --max-length 1024, or" in capsys.readouterr().err


def test_plan_names_split_at_the_first_equals_sign_everywhere(ckpt, data, tmp_path):
    """NAME=FILE: the command line's check and the plan loader read the same name and file."""
    folder = tmp_path / "a=b"  # a file whose path holds "=" too
    path = save_plans(folder, ckpt.name)[0]
    assert RS.plan_spec(f"polykv_x={path}") == ("polykv_x", Path(path)) and RS.plan_spec(path) == ("", Path(path))
    s = E.parse_settings(args(ckpt, data, tmp_path / "out", "--plan", f"polykv_x={path}", "--methods", "polykv_x"))
    cfg = CK.load_config(ckpt)
    assert [p.name for p in RS.load_given_plans(s, ckpt, cfg)] == ["polykv_x"]


def test_a_run_of_chosen_ids_writes_to_a_folder_of_its_own(ckpt, data, tmp_path, monkeypatch):
    """Else a two-sample debugging run would rewrite the report of the full run it picks from."""
    monkeypatch.setattr(E, "PROJECT", tmp_path)
    some = json.loads((data / "trec.jsonl").read_text().splitlines()[0])["_id"]
    assert E.main(["--model", str(ckpt), "--data-dir", str(data), "--max-length", "200", "--ids", some,
                   "--methods", "h2o", "--budget", "48"]) == 0
    [folder] = (tmp_path / "results" / CK.model_name(ckpt)).iterdir()
    assert folder.name.startswith("longbench_maxlen200_ids-") and (folder / "results.md").is_file()
    full = E.parse_settings(["--data-dir", "d", "--limit", "0", "--max-length", "200"])
    ids = E.parse_settings(["--data-dir", "d", "--ids", "b", "a", "--max-length", "200"])
    full, ids = (replace(x, benchmark="longbench", limit=0) for x in (full, ids))
    assert E.default_out(full, ckpt).name == "longbench_maxlen200_limitall"
    assert E.default_out(ids, ckpt).name.startswith("longbench_maxlen200_ids-")
    assert E.default_out(ids, ckpt) == E.default_out(replace(ids, ids=("a", "b")), ckpt) != E.default_out(
        replace(ids, ids=("a",)), ckpt)


@pytest.mark.parametrize("extra,message", [
    (["--tasks", "hotpotqa", "gov_report", "--methods", "h2o"], "unknown task(s) gov_report; valid here: hotpotqa, trec"),
    (["--methods", "polykv", "--plan", "PLACEHOLDER_OTHER_MODEL"], "plan is for model 'Llama-3.1-8B-Instruct'"),
    (["--methods", "polykv", "--plan", "PLACEHOLDER_LAYERS"], "has 5 policies and 5 budgets, the model has 3 layers"),
    (["--methods", "polykv", "--budget", "64", "--plan", "PLACEHOLDER_OK"], "no polykv plan for budget 64 (plans found: "),
    (["--methods", "polykv", "--budget", "64"], "python calibrate.py --model"),
])
def test_bad_input_is_a_clear_error(ckpt, data, tmp_path, capsys, extra, message):
    other = save_plans(tmp_path / "other", "Llama-3.1-8B-Instruct")[0]
    layers = save_plans(tmp_path / "layers", ckpt.name, n_layers=5)[0]
    ok = save_plans(tmp_path / "ok", ckpt.name)[0]
    extra = [{"PLACEHOLDER_OTHER_MODEL": other, "PLACEHOLDER_LAYERS": layers, "PLACEHOLDER_OK": ok}.get(x, x) for x in extra]
    assert E.main(args(ckpt, data, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_unknown_method_lists_valid_ones(ckpt, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        E.main(args(ckpt, data, tmp_path / "out", "--methods", "h2o", "lru"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'lru'" in err and all(m in err for m in K.METHODS)


def test_malformed_jsonl_names_file_and_line(ckpt, data, tmp_path, capsys):
    bad = tmp_path / "bad"
    (bad / "config").mkdir(parents=True)
    for f in (data / "config").iterdir():
        (bad / "config" / f.name).write_text(f.read_text())
    lines = (data / "trec.jsonl").read_text().splitlines()
    (bad / "trec.jsonl").write_text(lines[0] + "\n{not json\n")
    assert E.main(args(ckpt, bad, tmp_path / "out", "--methods", "h2o")) == 2  # no plan needed: the data is read
    assert "trec.jsonl:2: malformed JSON" in capsys.readouterr().err


def run_cli(argv, nproc=1) -> subprocess.CompletedProcess:
    """The CLI in a subprocess (torchrun for nproc > 1), its whole process group killed on timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   "--nproc_per_node", str(nproc)]
    proc = subprocess.Popen(launcher + [str(ROOT / "longbench_eval.py"), *argv], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_two_process_gloo_equals_one_process(ckpt, data, tmp_path):
    extra = ["--methods", "streamingllm", "pyramidkv", "--budget", "48", "--limit", "3", "--max-length", "160"]
    one = run_cli(args(ckpt, data, tmp_path / "one") + extra)
    two = run_cli(args(ckpt, data, tmp_path / "two") + extra, nproc=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    for key in ("scores", "fidelity", "gap_recovery", "n_samples", "tasks"):
        assert m1[key] == m2[key]
    assert not list((tmp_path / "two").glob("predictions.rank*.jsonl"))  # merged by rank 0
    strip = lambda d: sorted((r["id"], r["method"], r["budget"], r["prediction"]) for r in  # noqa: E731
                             map(json.loads, (tmp_path / d / "predictions.jsonl").read_text().splitlines()))
    assert strip("one") == strip("two") and len(strip("one")) == 6 * 3


def test_quick_default_skips_long_generation_tasks(ckpt, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(E, "QUICK_MAX_NEW", 5)  # hotpotqa generates 6 tokens, trec 5
    out = tmp_path / "quick"
    assert E.main(["--model", str(ckpt), "--data-dir", str(data), "--out", str(out), "--max-length", "200",
                   "--methods", "knorm", "--budget", "40"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "quick default run (1 per task, skipping hotpotqa" in first
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"] == ["trec"] and metrics["n_samples"] == E.QUICK["longbench"]


def test_ruler_essay_and_qa_tasks_run_on_the_files_given_and_say_which(ckpt, tmp_path, capsys):
    import test_ruler as TR
    prose = tmp_path / "prose.txt"
    prose.write_text(" ".join(f"Sentence number {i} ends here." for i in range(300)))
    squad = TR.squad_file(tmp_path / "squad.json")
    out = tmp_path / "ruler"
    argv = ["--model", str(ckpt), "--benchmark", "ruler", "--out", str(out), "--max-length", "900", "--limit", "1",
            "--methods", "knorm", "--budget", "40", "--haystack", str(prose), "--squad", str(squad)]
    assert E.main(argv + ["--tasks", "niah_single_2", "qa_1"]) == 0
    assert "haystacks: essay:prose.txt, squad:squad.json" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"] == ["niah_single_2", "qa_1"] and metrics["haystacks"] == ["essay:prose.txt", "squad:squad.json"]
    data_id = json.loads((out / "run.json").read_text())["data_id"]
    assert data_id.startswith("ruler-seed0+essay-") and "+qa_1-" in data_id
    squad.write_text(squad.read_text().replace("capital", "Capital"))  # other QA data: refused in this folder
    assert E.main(argv + ["--tasks", "qa_1"]) == 2 and "different data_id" in capsys.readouterr().err
    assert E.main(argv[:-4] + ["--tasks", "qa_2"]) == 2  # without its data
    assert "qa_2 with --hotpotqa" in capsys.readouterr().err


def test_ruler_data_flags_are_checked_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit):
        E.parse_settings(["--benchmark", "ruler", "--squad", str(tmp_path / "missing.json")])
    assert f"--squad {tmp_path / 'missing.json'}: no such file" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("words")
    with pytest.raises(SystemExit):
        E.parse_settings(["--benchmark", "longbench", "--haystack", str(tmp_path / "p.txt")])
    assert "are RULER's" in capsys.readouterr().err


def test_ruler_limits_and_data_flags_are_completed_sensibly(ckpt, tmp_path, monkeypatch):
    """RULER is generated: no --limit means the quick number per task, 0 ('all') is refused; a RULER data
    file alone makes the run RULER's (no LongBench lookup); files of tasks not chosen do not identify the data."""
    import test_ruler as TR
    cfg = CK.load_config(ckpt)
    monkeypatch.setattr(LB, "find_or_download", lambda *a: pytest.fail("looked for LongBench"))
    squad = TR.squad_file(tmp_path / "squad.json")
    s, _ = E.complete(E.parse_settings(["--model", str(ckpt), "--squad", str(squad), "--tasks", "niah_single_1"]), ckpt, cfg)
    assert (s.benchmark, s.limit, s.qa_files) == ("ruler", E.QUICK["ruler"], ())
    s, _ = E.complete(E.parse_settings(["--model", str(ckpt), "--squad", str(squad), "--tasks", "qa_1", "--limit", "2"]), ckpt, cfg)
    assert (s.limit, s.qa_files) == (2, (("qa_1", squad),))
    with pytest.raises(ValueError, match="--limit 0 .all. has no meaning for RULER"):
        E.complete(E.parse_settings(["--model", str(ckpt), "--benchmark", "ruler", "--limit", "0"]), ckpt, cfg)
