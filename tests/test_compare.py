"""compare.py: two folders' per-sample scores paired exactly as one run's report pairs its own."""
import json
from pathlib import Path

import pytest

import compare
import report

ROOT = Path(__file__).resolve().parents[1]
FULL = {"a": [100, 100], "b": [100, 100]}


def folder(tmp_path, name, per_sample, seed=0, tasks=("a", "b")):
    d = tmp_path / name
    d.mkdir()
    metrics = {"sample_ids": {t: [f"{t}-{seed}-0", f"{t}-{seed}-1"] for t in tasks},
               "per_sample_scores": {"fullkv": {"full": FULL}, **per_sample}}
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def test_pairs_methods_across_folders_with_exact_values(tmp_path):
    span = {"polykv": {"512": {"a": [100, 0], "b": [100, 100]}}, "knorm": {"512": {"a": [100, 100], "b": [0, 0]}}}
    plain = {"polykv": {"512": {"a": [0, 0], "b": [100, 0]}}, "knorm": {"512": {"a": [0, 0], "b": [100, 0]}}}
    new, old = folder(tmp_path, "span", span), folder(tmp_path, "plain", plain)
    lines = compare.compare(new, old, ["polykv:best", "knorm"], 512)
    a, b = span["polykv"]["512"], plain["knorm"]["512"]
    d = report.bootstrap_difference(a, b)
    assert d[0] == 50.0  # 75 - 25
    assert lines[0] == (f"polykv 75.0 minus knorm 25.0: +50.0 [{d[1]:+.1f}, {d[2]:+.1f}], score gap recovery 66.7% "
                        f"[{report.pct(report.bootstrap_gap_recovery(a, b, FULL)[1])}, "
                        f"{report.pct(report.bootstrap_gap_recovery(a, b, FULL)[2])}]")
    d = report.bootstrap_difference(span["knorm"]["512"], b)  # the same method, with and without a setting
    r = report.bootstrap_gap_recovery(span["knorm"]["512"], b, FULL)
    assert lines[1] == (f"knorm 50.0 minus knorm 25.0: +25.0 [{d[1]:+.1f}, {d[2]:+.1f}], score gap recovery 33.3% "
                        f"[{report.pct(r[1])}, {report.pct(r[2])}]")


def test_refuses_what_cannot_be_paired(tmp_path):
    scores = {"knorm": {"512": {"a": [0, 0], "b": [0, 0]}}}
    new, old = folder(tmp_path, "new", scores), folder(tmp_path, "old", scores, seed=1)
    with pytest.raises(ValueError, match="hold different samples"):
        compare.compare(new, old, ["knorm"], 512)
    with pytest.raises(ValueError, match="no method 'h2o'; it has fullkv, knorm"):
        compare.compare(new, new, ["h2o"], 512)
    with pytest.raises(ValueError, match="knorm has no budget 256; it has 512"):
        compare.compare(new, new, ["knorm"], 256)
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        compare.compare(tmp_path / "missing", new, ["knorm"], 512)
    with pytest.raises(ValueError, match="no best baseline at budget 256"):
        compare.compare(new, new, ["knorm:best"], 256)
    (tmp_path / "old_run").mkdir()
    (tmp_path / "old_run" / "metrics.json").write_text(json.dumps({"scores": {}}))  # written before per-sample scores
    with pytest.raises(ValueError, match="old_run/metrics.json has no per-sample scores"):
        compare.compare(new, tmp_path / "old_run", ["knorm"], 512)
    (tmp_path / "old_run" / "metrics.json").write_text('{"scores": ')  # torn
    with pytest.raises(ValueError, match="old_run/metrics.json: not JSON"):
        compare.compare(new, tmp_path / "old_run", ["knorm"], 512)


def test_pooled_folders_equal_one_folder_holding_all_their_samples(tmp_path):
    """Two seeds' folder pairs pooled = one pair whose per-task lists are the two joined; 'best' is
    the baseline best on the joined scores: snapkv (75 joined), while knorm wins seed 0 and tova seed 1."""
    seed0 = {"polykv": {"512": {"a": [100, 0], "b": [100, 100]}}, "knorm": {"512": {"a": [100, 100], "b": [100, 100]}},
             "tova": {"512": {"a": [0, 0], "b": [0, 0]}}, "snapkv": {"512": {"a": [100, 100], "b": [100, 0]}}}
    seed1 = {"polykv": {"512": {"a": [100, 100], "b": [100, 100]}}, "knorm": {"512": {"a": [0, 0], "b": [0, 0]}},
             "tova": {"512": {"a": [100, 100], "b": [100, 100]}}, "snapkv": {"512": {"a": [100, 100], "b": [0, 100]}}}
    joined = {m: {"512": {t: seed0[m]["512"][t] + seed1[m]["512"][t] for t in "ab"}} for m in seed0}
    d0, d1 = folder(tmp_path, "seed0", seed0), folder(tmp_path, "seed1", seed1, seed=1)
    both = tmp_path / "both"
    both.mkdir()
    both_ids = {t: [f"{t}-0-0", f"{t}-0-1", f"{t}-1-0", f"{t}-1-1"] for t in "ab"}
    (both / "metrics.json").write_text(json.dumps({"sample_ids": both_ids, "per_sample_scores": {
        "fullkv": {"full": {t: FULL[t] * 2 for t in "ab"}}, **joined}}))
    pairs = ["polykv:best", "polykv:knorm", "knorm"]
    pooled = compare.compare(d0, d0, pairs, 512, pool=[(d1, d1)])
    assert pooled == compare.compare(both, both, pairs, 512)
    assert pooled[0].startswith("polykv 87.5 minus snapkv 75.0: +12.5")
    assert compare.compare(d0, d0, ["polykv:best"], 512)[0].startswith("polykv 75.0 minus knorm 100.0")
    assert compare.compare(d1, d1, ["polykv:best"], 512)[0].startswith("polykv 100.0 minus tova 100.0")


def test_best_is_the_best_baseline_each_committed_run_recorded():
    """On every committed result folder, 'best' is the baseline its own report named, at every budget."""
    checked = 0
    for path in sorted(ROOT.glob("results/*/*/metrics.json")):
        metrics = json.loads(path.read_text())
        if "per_sample_scores" not in metrics:
            continue
        for budget, differences in metrics.get("score_differences", {}).items():
            if differences.get("best_baseline"):
                assert compare.best_baseline([(path.parent, metrics)], budget) == differences["best_baseline"], path
                checked += 1
    assert checked >= 20


def test_refuses_pools_that_are_not_the_same_experiment_on_other_samples(tmp_path):
    scores = {"knorm": {"512": {"a": [0, 0], "b": [0, 0]}}}
    d0, again = folder(tmp_path, "seed0", scores), folder(tmp_path, "seed0_again", scores)
    with pytest.raises(ValueError, match="seed0_again repeats samples of .*seed0 \\(e.g. a-0-0\\)"):
        compare.compare(d0, d0, ["knorm"], 512, pool=[(again, again)])
    other = folder(tmp_path, "other_tasks", {"knorm": {"512": {"a": [0, 0], "c": [0, 0]}}}, seed=1, tasks=("a", "c"))
    with pytest.raises(ValueError, match="other_tasks holds other tasks than"):
        compare.compare(d0, d0, ["knorm"], 512, pool=[(other, other)])
    model = folder(tmp_path, "other_model", scores, seed=1)
    metrics = json.loads((model / "metrics.json").read_text())
    (model / "metrics.json").write_text(json.dumps({**metrics, "model": "Qwen"}))
    with pytest.raises(ValueError, match="other_model is another experiment than .*seed0: model Qwen"):
        compare.compare(d0, d0, ["knorm"], 512, pool=[(model, model)])
    fewer = folder(tmp_path, "fewer_baselines", {"h2o": {"512": {"a": [0, 0], "b": [0, 0]}}}, seed=1)
    with pytest.raises(ValueError, match="fewer_baselines ran the baselines h2o at budget 512, .*seed0 ran knorm"):
        compare.compare(d0, d0, ["knorm:best"], 512, pool=[(fewer, fewer)])
