"""Bad input gets a clear, early error naming the problem; two runs never lose each other's records;
records identify model and data by content; a model id resolves from the local Hugging Face cache."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

import calibrate as C
import longbench as LB
import longbench_metrics as LM
import longbench_eval as E
import checkpoint as CK
import model as M
import policies as P
import polykv as K
import run_folder as RF
from test_longbench_eval import N_LAYERS, args, ckpt, data, save_plans  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def records_in(out: Path) -> list[dict]:
    path = out / "predictions.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.is_file() else []


# --- two runs, one folder ------------------------------------------------------------------------


def lock_holder(folder: Path) -> subprocess.Popen:
    """Another process that takes folder's lock and holds it for a minute (kill it when done)."""
    holder = subprocess.Popen([sys.executable, "-c", f"import time, run_folder as RF; from pathlib import Path; "
                               f"RF.take_lock(Path({str(folder)!r})); print('locked', flush=True); time.sleep(60)"],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_other(ckpt, data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = lock_holder(out)
    try:
        assert E.main(args(ckpt, data, out, "--methods", "knorm", "--budget", "40")) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by another run (pid {holder.pid}" in err and not records_in(out)
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, and the next run takes it over
    assert (out / ".lock").read_text().strip() == str(holder.pid)
    assert E.main(args(ckpt, data, out, "--methods", "knorm", "--budget", "40")) == 0 and records_in(out)


def test_the_lock_is_released_and_retaken_by_its_own_process(tmp_path):
    lock = RF.take_lock(tmp_path)
    assert RF.take_lock(tmp_path) == lock  # the same process may take it again
    RF.release_lock(lock)
    assert not lock.exists()


# --- bad flags, refused before any work --------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (["--budget", "0"], "a budget must be at least the observation window (32)"),
    (["--budget", "1"], "a budget must be at least the observation window (32)"),
    (["--limit", "-1"], "--limit must be >= 0"),
    (["--max-length", "0"], "--max-length must be at least 64"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--ruler-seed", "1000"], "--ruler-seed must be in [0, 1000)"),
])
def test_bad_flags_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        E.parse_settings(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_duplicate_budgets_run_once(ckpt, tmp_path, monkeypatch):
    assert E.parse_settings(["--budgets", "512", "128", "512"]).budgets == (128, 512)
    asked = []
    monkeypatch.setattr(C, "run", lambda model, tok, model_dir, budgets, *a, **k: asked.append(budgets))
    monkeypatch.setattr(LB, "find_data_dir", lambda *a: None)
    C.main(["--budgets", "512", "128", "512", "--model", str(ckpt), "--out", str(tmp_path)])
    assert asked == [[512, 128]]  # once each, calibrated in the order given


def test_a_calibration_of_a_budget_another_process_calibrates_into_the_same_folder_is_refused(ckpt, tmp_path, monkeypatch):
    held = tmp_path / "budget64"
    held.mkdir()
    asked = []
    monkeypatch.setattr(C, "run", lambda model, tok, model_dir, budgets, *a, **k: asked.append(budgets))
    monkeypatch.setattr(LB, "find_data_dir", lambda *a: None)
    holder = lock_holder(held)
    try:
        with monkeypatch.context() as m, pytest.raises(ValueError, match=f"{held} is in use by another run \\(pid {holder.pid}"):
            m.setattr(CK, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
            C.main(["--budgets", "128", "64", "--model", str(ckpt), "--out", str(tmp_path)])
        C.main(["--budgets", "128", "--model", str(ckpt), "--out", str(tmp_path)])  # another budget: its own lock
        assert asked == [[128]] and (tmp_path / "budget128" / ".lock").read_text() == str(os.getpid())
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("argv,message", [(["--budgets", "-5"], "below the observation window"),
                                          (["--budgets", "0"], "below the observation window"),
                                          (["--min-win-share", "1.5"], "--min-win-share must be in [0, 1)")])
def test_calibrate_refuses_bad_values_before_loading_anything(argv, message, monkeypatch):
    monkeypatch.setattr(CK, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        C.main(argv)


@pytest.mark.parametrize("prompt,extra,message", [
    ("", [], "--prompt is empty"),
    ("x" * 4100, [], "exceeds the model's context window of 4096 tokens"),
    ("x" * 4000, ["--max-new-tokens", "200"], "exceeds the model's context window of 4096 tokens"),
    ("hi", ["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
])
def test_model_cli_refuses_prompts_it_cannot_run_before_loading_weights(ckpt, prompt, extra, message, monkeypatch, capsys):
    monkeypatch.setattr(CK, "load_model", lambda *a, **k: pytest.fail("loaded the weights"))
    monkeypatch.setattr(sys, "argv", ["model.py", "--model", str(ckpt), "--prompt", prompt, *extra])
    with pytest.raises(SystemExit) as e:
        M.main()
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_model_cli_generates_within_the_window(ckpt, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["model.py", "--model", str(ckpt), "--prompt", "x" * 4000, "--max-new-tokens", "3"])
    M.main()
    assert "4000 prompt tokens" in capsys.readouterr().out


# --- bad files: one clear line naming the file --------------------------------------------------------


def test_bad_plan_settings_are_refused_before_any_record(ckpt, data, tmp_path, capsys):
    path = Path(save_plans(tmp_path, ckpt.name)[0])
    doc = json.loads(path.read_text())
    for settings, message in (({"window": -4}, "settings.window must be at least 1"),
                              ({"pooling": "bogus"}, "settings.pooling must be one of max, avg")):
        path.write_text(json.dumps({**doc, "settings": {**doc["settings"], **settings}}))
        assert E.main(args(ckpt, data, tmp_path / "out", "--methods", "polykv", "--plan", str(path))) == 2
        err = capsys.readouterr().err
        assert f"{path}: {message}" in err and not records_in(tmp_path / "out")
    path.write_text(json.dumps({k: v for k, v in doc.items() if k != "model"}))
    assert E.main(args(ckpt, data, tmp_path / "out", "--methods", "polykv", "--plan", str(path))) == 2
    assert "does not say which model it was calibrated for" in capsys.readouterr().err


def test_a_head_routed_plan_with_the_wrong_head_count_is_refused(ckpt, data, tmp_path, capsys):
    plan = K.Plan(["h2o/tova/knorm"] + ["h2o"] * (N_LAYERS - 1), [48] * N_LAYERS, name="polykv_heads", model=ckpt.name)
    K.save_plan(plan, tmp_path / "heads.json")
    assert E.main(args(ckpt, data, tmp_path / "out", "--plan", str(tmp_path / "heads.json"))) == 2
    assert "layer 0: policy 'h2o/tova/knorm' names 3 KV heads, the model has 2" in capsys.readouterr().err


def test_a_head_routed_plan_runs_like_any_plan(ckpt, data, tmp_path):
    plan = K.Plan(["h2o/tova", "snapkv", "knorm/h2o"], [40, 56, 48], name="polykv_heads", model=ckpt.name)
    K.save_plan(plan, tmp_path / "heads.json")
    assert E.main(args(ckpt, data, tmp_path / "out", "--plan", str(tmp_path / "heads.json"), "--methods",
                       "snapkv", "polykv_heads")) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "48" in metrics["scores"]["polykv_heads"] and "polykv_heads" in metrics["gap_recovery"]["48"]


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_broken_checkpoints_name_the_file(ckpt, data, tmp_path, capsys):
    bad = copy_checkpoint(ckpt, tmp_path / "trunc")
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut short
    assert E.main(args(bad, data, tmp_path / "o1", "--methods", "knorm", "--budget", "40")) == 2
    assert f"{weights}: not a readable safetensors file" in capsys.readouterr().err
    broken = copy_checkpoint(ckpt, tmp_path / "config")
    (broken / "config.json").write_text("{oops")
    assert E.main(args(broken, data, tmp_path / "o2", "--methods", "knorm", "--budget", "40")) == 2
    assert f"{broken / 'config.json'}: not a readable JSON file" in capsys.readouterr().err
    small = copy_checkpoint(ckpt, tmp_path / "vocab")
    cfg = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**cfg, "vocab_size": 100}))
    assert E.main(args(small, data, tmp_path / "o3", "--methods", "knorm", "--budget", "40")) == 2
    assert "tokenizer.json has 259 tokens but config.json's vocab_size is 100" in capsys.readouterr().err


def test_non_utf8_data_names_file_and_line(ckpt, data, tmp_path, capsys):
    bad = tmp_path / "bad"
    (bad / "config").mkdir(parents=True)
    for f in (data / "config").iterdir():
        (bad / "config" / f.name).write_text(f.read_text())
    lines = (data / "trec.jsonl").read_bytes().split(b"\n")
    (bad / "trec.jsonl").write_bytes(lines[0] + b"\n" + lines[1].replace(b"what", b"wh\xe9t") + b"\n")
    assert E.main(args(ckpt, bad, tmp_path / "out", "--methods", "knorm")) == 2
    assert "trec.jsonl:2: not UTF-8" in capsys.readouterr().err


def test_a_record_that_is_not_a_record_is_redone(ckpt, data, tmp_path):
    out = tmp_path / "run"
    assert E.main(args(ckpt, data, out, "--methods", "knorm", "--budget", "40")) == 0
    lines = (out / "predictions.jsonl").read_text().splitlines()
    (out / "predictions.jsonl").write_text("\n".join(lines[1:] + ["{}", "[1, 2]", '{"id": 3}']) + "\n")
    assert E.main(args(ckpt, data, out, "--methods", "knorm", "--budget", "40")) == 0
    assert sorted(map(json.dumps, records_in(out))) != [] and len(records_in(out)) == len(lines)


# --- records identify the model and the data by content ----------------------------------------


def test_other_weights_in_a_folder_of_the_same_name_are_refused(ckpt, data, tmp_path, capsys):
    same_name = copy_checkpoint(ckpt, tmp_path / "a" / ckpt.name)
    out = tmp_path / "run"
    assert E.main(args(same_name, data, out, "--methods", "knorm", "--budget", "40")) == 0
    tensors = {k: v + 0.01 for k, v in CK.read_safetensors(same_name).items()}
    save_file(tensors, str(same_name / "model.safetensors"))  # another checkpoint, same folder name
    assert E.main(args(same_name, data, out, "--methods", "knorm", "--budget", "40")) == 2
    assert "holds a run with different model_id" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fuzzy_backend"] == LM.FUZZ_BACKEND and metrics["data"] == LB.data_id(data)
    assert str(data) not in json.dumps(metrics)  # no machine-specific path


def test_a_model_id_resolves_from_the_local_hugging_face_cache(ckpt, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-llama" / "snapshots" / ("a" * 40)
    copy_checkpoint(ckpt, snapshot)
    (cache / "models--someone--tiny-llama" / "refs").mkdir()
    (cache / "models--someone--tiny-llama" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    resolved = CK.resolve_model_dir("someone/tiny-llama")
    assert resolved == snapshot and CK.model_name(resolved) == "tiny-llama"
    with pytest.raises(FileNotFoundError, match="not a model in the local Hugging Face cache.*huggingface-cli download"):
        CK.resolve_model_dir("someone/absent")
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        CK.resolve_model_dir(tmp_path / "nowhere" / "at" / "all")


def test_a_plan_runs_under_a_name_of_its_own_beside_another(ckpt, data, tmp_path, capsys):
    """NAME=FILE: e.g. a plan calibrated on RULER, evaluated as polykv_ruler beside the committed polykv."""
    first = save_plans(tmp_path / "a", ckpt.name)[0]
    other = K.Plan(["tova"] * N_LAYERS, [64, 32, 48], name="polykv", model=ckpt.name)
    K.save_plan(other, tmp_path / "other.json")
    out = tmp_path / "run"
    assert E.main(args(ckpt, data, out, "--plan", first, f"polykv_other={tmp_path / 'other.json'}", "--methods",
                       "snapkv", "polykv", "polykv_other")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["gap_recovery"]["48"]) == {"polykv", "polykv_other"}
    plans = {r["method"]: r["plan"] for r in records_in(out) if r["budget"]}
    assert plans["polykv_other"] == RF.plan_fingerprint(other) != plans["polykv"]
    with pytest.raises(SystemExit):  # a name must say it is a PolyKV variant
        E.parse_settings(["--plan", f"mine={first}", "--methods", "mine"])
    assert "polykv* names given by --plan NAME=FILE" in capsys.readouterr().err
    K.save_plan(K.Plan(["tova"] * N_LAYERS, [64, 32, 48], name="polykv", model=ckpt.name,
                       settings=P.Settings(tova_agg="mean")), tmp_path / "mean.json")  # other policy settings
    assert E.main(args(ckpt, data, tmp_path / "mixed", "--plan", first, f"polykv_mean={tmp_path / 'mean.json'}",
                       "--methods", "polykv", "polykv_mean")) == 2
    assert "different policy settings (tova_agg: 'all' vs 'mean' in plan polykv_mean)" in capsys.readouterr().err


def test_a_run_recorded_before_tova_agg_resumes_with_within_group_tova_only(tmp_path):
    """The committed sweeps' run.json predate the field: they were made with within-group TOVA."""
    old = {"data_id": "d", "model": "m", "max_length": 2048, "dtype": "float32",
           "settings": {"window": 32, "kernel": 7, "pooling": "max", "sinks": 4, "agg": "mean", "seed": 0}}
    (tmp_path / "run.json").write_text(json.dumps(old))
    config = {**old, "model_id": "x", "query": "aware", "settings": {**old["settings"], "tova_agg": "mean", "span": 1}}
    RF.check_run_config(tmp_path, config)  # accepted (and no span then: span 1), and run.json now records the fields
    assert json.loads((tmp_path / "run.json").read_text())["settings"]["tova_agg"] == "mean"
    (tmp_path / "run.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="holds a run with different settings"):
        RF.check_run_config(tmp_path, {**config, "settings": {**config["settings"], "tova_agg": "all"}})
