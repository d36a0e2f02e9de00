"""calibration_study.py's tables from constructed rows: exact means over the right samples, the
leave-one-family-out share, and the plot only where there is a curve; its settings checked before
the model loads, and a study folder resumed only with the settings it was made with."""
import json
import sys

import pytest

import calibrate as C
import calibration_study as S
import checkpoint as CK
import longbench as LB
import objective as O
import polykv as K


def row(key: str, plans: list[str]) -> dict:
    budget, draw, arm = key.split("/")
    n = int(draw[1:]) if draw.startswith("n") else 32
    return {"key": key, "budget": int(budget), "draw": draw, "n": n, "arm": arm, "plans": {p: {} for p in plans}}


def test_learning_curve_and_leave_one_family_out_exact(tmp_path):
    plans = ["uniform", "polykv_routing", "polykv_allocation", "polykv"]
    rows = {k: row(k, plans) for k in ("512/n16/route-allocate", "512/in-family/route-allocate",
                                       "512/out-of-family/route-allocate")}
    kl = {"v1": 0.2, "v2": 0.4, "h1": 1.0, "h2": 3.0}  # validation samples v*, held-out family samples h*
    scale = {"uniform": 1.0, "polykv_routing": 0.9, "polykv_allocation": 0.5, "polykv": 0.25}
    validation = {f"{k}/{p}": {"key": f"{k}/{p}", "kls": {i: x * scale[p] * (1.5 if "out-of" in k and p == "polykv" else 1)
                                                              for i, x in kl.items()}}
                  for k in rows for p in plans}
    text = S.study_tables(rows, validation, ["v1", "v2"], ["h1", "h2"], tmp_path)
    # n16 row: means over v1, v2 only (0.3 x scale); arms this draw lacks are dashes
    assert "| 16 | 0.3000 | 0.2700 | 0.1500 | 0.0750 | – | – | – | – |" in text
    # paired, per validation sample: routing 0.9x uniform (v1 -0.02, v2 -0.04), allocation 0.5x (-0.10, -0.20),
    # PolyKV 0.5x allocation (-0.05, -0.10); the bootstrap's draws lie between the samples' own differences
    assert "| 16 | -0.0300 [-0.0400, -0.0200] | -0.1500 [-0.2000, -0.1000] | -0.0750 [-0.1000, -0.0500] | – | – | – | – |" in text
    # family: uniform 2.0 on h1, h2; PolyKV 0.5 with the family, 0.75 without: (2 - 0.75) / (2 - 0.5) survives
    assert "best uniform 2.0000 -> PolyKV 0.5000; without it, best uniform 2.0000 -> PolyKV 0.7500" in text
    assert "survives: 83%." in text and (tmp_path / "curve.png").stat().st_size > 1000


def test_orders_search_and_tova_aggregation_are_paired_exactly(tmp_path):
    """PolyKV's two orders, the search on top and TOVA's two aggregations: each pair's difference
    per validation sample, with the bootstrap's ends between the samples' own differences."""
    kl = {"v1": 0.2, "v2": 0.4}
    scale = {"512/n16/route-allocate": 1.0, "512/n16/allocate-route": 0.5, "512/n16/refined": 0.75}
    rows = {k: row(k, ["polykv"]) for k in scale}
    rows |= {f"512/tova_agg/{a}": {"key": f"512/tova_agg/{a}", "budget": 512, "draw": "tova_agg", "arm": a,
                                   "plans": {"tova": {}}} for a in ("mean", "all")}
    validation = {f"{k}/polykv": {"kls": {i: x * f for i, x in kl.items()}} for k, f in scale.items()}
    validation |= {f"512/tova_agg/{a}/tova": {"kls": {i: x * f for i, x in kl.items()}} for a, f in (("mean", 1), ("all", 2))}
    text = S.study_tables(rows, validation, ["v1", "v2"], [], tmp_path)
    # allocate-route minus route-allocate: -0.1, -0.2; search minus route-allocate: -0.05, -0.1; minus allocate-route +0.05, +0.1
    assert "| 16 | -0.1500 [-0.2000, -0.1000] | -0.0750 [-0.1000, -0.0500] | +0.0750 [+0.0500, +0.1000] |" in text
    assert "over all query heads (as published) 0.6000; all minus within, paired: +0.3000 [+0.2000, +0.4000]." in text


def test_a_run_without_learning_curve_draws_writes_no_plot(tmp_path):
    rows = {k: row(k, ["uniform", "polykv"]) for k in ("512/in-family/route-allocate", "512/out-of-family/route-allocate")}
    validation = {f"{k}/{p}": {"key": f"{k}/{p}", "kls": {"h1": 1.0 if p == "uniform" else 0.5}} for k in rows for p in ("uniform", "polykv")}
    text = S.study_tables(rows, validation, [], ["h1"], tmp_path)
    assert "share of the in-family gain that survives: 100%." in text and not (tmp_path / "curve.png").exists()


def test_a_study_without_its_folder_fails_before_the_model_loads(monkeypatch, capsys):
    monkeypatch.setattr(CK, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit):
        S.main(["--data-dir", "somewhere"])
    assert "--out is required" in capsys.readouterr().err



@pytest.fixture
def no_model(monkeypatch, tmp_path):
    """main() up to the model: resolving the model and data is stubbed, loading the model stops the run."""
    monkeypatch.setattr(CK, "resolve_model_dir", lambda name: tmp_path / (name or "SmolLM2-135M-Instruct"))
    monkeypatch.setattr(LB, "find_data_dir", lambda *a: tmp_path)
    monkeypatch.setattr(CK, "load_model", lambda *a, **k: sys.exit("loaded the model"))


@pytest.mark.parametrize("flags, message", [(["--max-ratio", "0.5"], "--max-ratio must be a number >= 1"),
                                            (["--n-validation", "-1"], "--n-validation must be positive")])
def test_bad_calibration_settings_fail_before_the_model_loads(no_model, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        S.main(["--data-dir", "x", "--out", str(tmp_path)] + flags)


def test_the_study_calibrates_with_its_max_ratio(no_model, monkeypatch, tmp_path):
    given, real = [], C.CalibrationSettings
    monkeypatch.setattr(C, "CalibrationSettings", lambda **kw: given.append(kw) or real(**kw))
    with pytest.raises(SystemExit, match="loaded the model"):
        S.main(["--data-dir", "x", "--out", str(tmp_path), "--max-ratio", "8"])
    assert [kw["max_ratio"] for kw in given if kw] == [8.0]  # the others are argparse's defaults


def test_a_study_resumes_only_with_its_own_settings(no_model, tmp_path):
    with pytest.raises(SystemExit, match="loaded the model"):  # a new folder: nothing to compare with
        S.main(["--data-dir", "x", "--out", str(tmp_path)])
    recorded = {"model": "SmolLM2-135M-Instruct", "data": LB.data_id(tmp_path),
                "calibration_settings": {**C.CalibrationSettings().__dict__}}
    del recorded["calibration_settings"]["max_ratio"]  # a study from before the cap was a setting: 4x
    (tmp_path / "study.json").write_text(json.dumps(recorded))
    with pytest.raises(SystemExit, match="loaded the model"):
        S.main(["--data-dir", "x", "--out", str(tmp_path), "--max-ratio", "4"])
    with pytest.raises(ValueError, match="ran with max_ratio 4.0 \\(now 8.0\\)"):
        S.main(["--data-dir", "x", "--out", str(tmp_path), "--max-ratio", "8"])
    with pytest.raises(ValueError, match="ran with model SmolLM2-135M-Instruct \\(now other\\)"):
        S.main(["--data-dir", "x", "--out", str(tmp_path), "--model", "other"])
    del recorded["calibration_settings"]["candidates"]  # a study from before KeyDiff: among the first five
    (tmp_path / "study.json").write_text(json.dumps(recorded))
    five = " ".join(K.FIRST_CANDIDATES)
    with pytest.raises(ValueError, match=f"ran with candidates --candidates {five} \\(now --candidates {five} keydiff\\)"):
        S.main(["--data-dir", "x", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="loaded the model"):
        S.main(["--data-dir", "x", "--out", str(tmp_path), "--candidates", *K.FIRST_CANDIDATES])


def test_head_routing_splits_only_the_head_that_lowers_the_joint_kl(tiny_checkpoint, longbench_dir, tmp_path,
                                                                     monkeypatch):
    """--head-routing on a tiny model's PolyKV plan, under a joint KL that rises by 1000 for every KV
    head whose policy is not its target (the plan's own, but TOVA or SnapKV on layer 0's second head):
    the search splits exactly that head and keeps the budgets; the plan records its parent's KLs and
    its own validation KL; a rerun keeps it; other data (other calibration samples) is refused."""
    model, tokenizer = CK.load_model(tiny_checkpoint), CK.load_tokenizer(tiny_checkpoint)
    cs = C.CalibrationSettings(n_samples=4, n_validation=2, max_length=200, n_continuation=6)
    C.run(model, tokenizer, tiny_checkpoint, [48], tmp_path, cs, S.SETTINGS, longbench_dir)
    parent = K.load_plan(K.plan_path(tmp_path, 48, "polykv"))
    target = [K.head_policies(p, 2) for p in parent.policies]
    target[0][1] = "tova" if target[0][1] != "tova" else "snapkv"
    true_kls = O.sample_kls
    off_target = lambda plan: sum(p != t for layer, want in zip(plan.policies, target)  # noqa: E731
                                  for p, t in zip(K.head_policies(layer, 2), want))
    monkeypatch.setattr(O, "sample_kls", lambda m, refs, plan: [kl + 1000 * off_target(plan)
                                                                 for kl in true_kls(m, refs, plan)])
    paths = S.refine_heads(model, tokenizer, tiny_checkpoint, tmp_path, [48], longbench_dir)
    plan = K.load_plan(paths[48])
    assert plan.policies == [K.layer_policy(t) for t in target] and "/" in plan.policies[0]
    assert plan.budgets == parent.budgets
    cal, parent_cal = plan.info["calibration"], parent.info["calibration"]
    assert cal["refined_from"] == {k: parent_cal[k] for k in ("in_sample_kl", "validation_kl")}
    assert f"layer 0 head 1 -> {target[0][1]}" in [t["step"] for t in cal["search_trace"]]
    assert cal["search_trace"][0]["kl"] > 1000 > cal["in_sample_kl"]  # the parent is one head off target
    assert 0 <= cal["validation_kl"] < 1000  # scored on the validation samples, on target
    monkeypatch.setattr(C, "build_references", lambda *a, **k: pytest.fail("redid a finished head-routing plan"))
    assert S.refine_heads(model, tokenizer, tiny_checkpoint, tmp_path, [48], longbench_dir) == paths
    monkeypatch.undo()
    other = tmp_path / "other_data"
    other.mkdir()
    for path in longbench_dir.rglob("*.json*"):
        (other / path.relative_to(longbench_dir)).parent.mkdir(exist_ok=True)
        (other / path.relative_to(longbench_dir)).write_text(path.read_text().replace('"_id": "', '"_id": "other-'))
    paths[48].unlink()
    with pytest.raises(ValueError, match="this data gives other calibration samples than the plans record"):
        S.refine_heads(model, tokenizer, tiny_checkpoint, tmp_path, [48], other)
