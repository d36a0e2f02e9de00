"""One source of truth: the policy registry feeds every list of names and every CLI's choices, and
each default (the observation window, the calibration's knobs) is written in one place."""
import ast
import importlib
from pathlib import Path

import pytest
import torch

import policies as P

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = sorted(p for p in ROOT.glob("*.py"))


def test_a_new_policy_is_one_function_and_one_registry_entry(monkeypatch):
    """Register a scorer at run time, reload the modules above policies.py: every list of names,
    the routing candidates, the evaluation's --methods choices and plan validation know it."""
    def oldest_scores(keys, stats, s):  # keeps the oldest tokens
        return -torch.arange(keys.shape[2], dtype=torch.float32).expand(*keys.shape[:2], -1)
    monkeypatch.setitem(P.SCORERS, "oldest", oldest_scores)
    try:
        K = importlib.reload(importlib.import_module("polykv"))
        E = importlib.reload(importlib.import_module("longbench_eval"))
        assert "oldest" in K.CANDIDATES and "oldest" in K.BASELINES and "oldest" in K.METHODS
        settings = E.parse_settings(["--methods", "oldest", "--budget", "64"])
        assert settings.methods == ("oldest",)
        K.validate_plan(K.uniform_plan(2, "oldest", 64), 2, 64)
        keys = torch.randn(1, 2, 100, 4)
        cache = importlib.import_module("model").KVCache(1)
        cache.set_layer(0, keys, keys)
        out = K.apply_plan(cache, [P.LayerStats(0, None)], K.Plan(["oldest"], [40], settings=P.Settings(window=8)))
        assert torch.equal(out.keys(0), torch.cat([keys[:, :, :32], keys[:, :, -8:]], dim=2))
    finally:
        monkeypatch.undo()
        importlib.reload(importlib.import_module("polykv"))
        importlib.reload(importlib.import_module("longbench_eval"))


def test_cli_choices_come_from_the_registry():
    import longbench_eval as E
    import polykv as K
    import search as S
    assert K.CANDIDATES == tuple(p for p in P.SCORERS if p != "random")
    assert K.METHODS == ("fullkv",) + tuple(P.SCORERS) + ("pyramidkv",) + K.PLAN_METHODS
    assert E.parse_settings(["--methods", *K.METHODS]).methods == K.METHODS  # --methods takes every method
    with pytest.raises(SystemExit):
        E.parse_settings(["--methods", "lru"])
    assert len(S.routing_moves()) == len(K.CANDIDATES)  # the search routes among the candidates


def test_the_window_default_is_written_once():
    """Only policies.Settings gives `window` a default; every other function takes it from a Settings."""
    for path in PRODUCT:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                args = node.args
                defaults = dict(zip([a.arg for a in args.args][len(args.args) - len(args.defaults):], args.defaults))
                defaults |= {a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None}
                assert "window" not in defaults, f"{path.name}: {node.name}() gives window a default"
    assert P.Settings().window == 32


def test_calibration_defaults_are_written_once():
    """The CLI's defaults are CalibrationSettings' own; the prompt length is evaluation's for the
    benchmark (run_settings.MAX_LENGTH), chosen once the data is known."""
    import calibrate as C
    from run_settings import MAX_LENGTH
    args = C.parse_args([])
    d = C.CalibrationSettings()
    for name in C.CalibrationSettings.__dataclass_fields__:  # None: filled in later (spans from span; every candidate)
        assert getattr(args, name) == getattr(d, name) or (name, getattr(args, name)) in (
            ("max_length", None), ("spans", None), ("candidates", None)), name
    from_args = {f: getattr(args, f) for f in C.CalibrationSettings.__dataclass_fields__} | {"max_length": d.max_length}
    assert C.CalibrationSettings(**from_args) == d
    assert d.max_length == MAX_LENGTH["longbench"]


def test_no_pointers_outside_the_repository():
    for path in PRODUCT:
        text = path.read_text()
        for needle in ("../shared", "DESIGN.md", "Issue ", "issue #"):
            assert needle not in text, f"{path.name} mentions {needle!r}"


@pytest.mark.parametrize("name", ["calibrate.py", "objective.py", "search.py", "longbench_eval.py", "run_settings.py", "report.py"])
def test_the_top_floors_read_in_one_sitting(name):
    """The calibration and the evaluation: each file about 400 lines at most, no function over about 40."""
    text = (ROOT / name).read_text()
    assert len(text.splitlines()) <= 430
    long = [(f.name, f.end_lineno - f.lineno + 1) for f in ast.walk(ast.parse(text))
            if isinstance(f, ast.FunctionDef) and f.end_lineno - f.lineno + 1 > 42]
    assert not long, f"{name}: {long}"
