"""bench.py smoke tests on tiny random models: the script runs end to end; no timing assertions,
but the figures that are not timings (KV bytes, peak memory) are checked."""
import sys
from pathlib import Path

import pytest
import torch

import bench
import bench_memory
import model as M
import policies as P
import polykv as K

SMALL = dict(prefill_short=24, prefill_long=40, decode_ctx=40, long_ctx=96, budget=40, short_ctx=40, steps=2, calib_ctx=96,
             long_prefill_repeats=1, peak_lengths=(64, 128), eval_length=512)


def tiny_model() -> M.Transformer:
    torch.manual_seed(0)
    cfg = M.Config(vocab_size=150, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48)
    model = M.Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def test_sections_run_without_transformers():
    model = tiny_model()
    with torch.no_grad():
        res = bench.bench_prefill(model, None, SMALL, repeats=1, device="cpu")
        res.update(bench.bench_decode(model, None, SMALL, repeats=1, device="cpu", compile=False))
        r3, cache, stats = bench.bench_compression(model, SMALL, repeats=1, device="cpu")
        res.update(r3)
        res.update(bench.bench_batching(model, cache, stats, SMALL, repeats=1, device="cpu"))
        res.update(bench.bench_kv_bytes(model, cache, stats, SMALL))
        res.update(bench.bench_calibration(model, SMALL, repeats=1, device="cpu"))
    assert "prefill_short_ratio" not in res and "decode_ratio" not in res and res["decode_ours_ms"] > 0
    assert cache.lengths == [96, 96] and res["kv_bytes_fullkv"] == cache.nbytes()
    for method in K.BASELINES:  # every baseline's bytes: exactly what its plan keeps, in proportion to its tokens
        plan = K.baseline_plan(method, 2, 40, P.Settings())
        assert res[f"kv_bytes_{method}"] == res[f"kv_planned_bytes_{method}"] == K.plan_kv_bytes(plan, 96, model.cfg)
        assert res[f"kv_bytes_ratio_{method}"] == pytest.approx(res[f"token_ratio_{method}"])
    assert res["token_ratio_snapkv"] == pytest.approx(40 / 96)  # every layer keeps 40 of 96 tokens
    assert res["token_ratio_pyramidkv"] == pytest.approx(80 / (2 * 96))  # its budgets sum to n_layers * 40 too
    assert res["batched_decode_speedup"] > 0 and res["calibration_speedup"] > 0
    pairs = dict(kv.split("=") for kv in bench.summary_line(res, SMALL).split())
    assert "prefill24_ratio" not in pairs and float(pairs["decode96_compressed_over_plain40"]) > 0
    assert float(pairs["kv_bytes_ratio"]) == pytest.approx(40 / 96, abs=1e-4)


def test_run_child_reports_that_childs_own_peak():
    big = [sys.executable, "-c", "x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096]); print('ok')"]
    small = [sys.executable, "-c", "import sys; sys.exit(3)"]
    code, peak, out = bench_memory.run_child(big)
    assert code == 0 and out.strip() == "ok" and peak > 200
    code, peak, _ = bench_memory.run_child(small)  # after the big one: its own peak, not the largest child's
    assert code == 3 and 0 < peak < 100


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_peak_rss_can_be_reset():
    x = torch.ones(100 * 2**20 // 4)  # 100 MiB, touched
    del x
    before = bench_memory.proc_status_kib("VmHWM")
    assert bench_memory.reset_peak_rss()
    assert bench_memory.proc_status_kib("VmHWM") < before - 50 * 1024  # the peak forgets the freed 100 MiB


def test_main_end_to_end_against_transformers(tiny_checkpoint):
    """--quick on a tiny LLaMA checkpoint with a real tokenizer: every section, the memory children
    (a prefill per length, one evaluation run) included; the summary line has every figure."""
    pytest.importorskip("transformers")
    line = bench.main(["--model", str(tiny_checkpoint), "--quick", "--repeats", "1"])
    pairs = {k: float(v) for k, v in (kv.split("=") for kv in line.split())}
    for name in ("prefill128_ratio", "prefill256_ratio", "decode256_ratio", "decode256_ours_ms", "kv_bytes_ratio",
                 "token_ratio", "decode512_compressed_over_plain64", "speedup_vs_full512", "stats_overhead_share",
                 "batched_decode_speedup", "prefill_peak_mib_128", "prefill_peak_mib_512", "eval_peak_rss_mib",
                 "calibration_speedup"):
        assert name in pairs, name
    assert pairs["kv_bytes_ratio"] == pytest.approx(pairs["token_ratio"], abs=1e-4) == pytest.approx(64 / 512, abs=1e-4)
    assert pairs["eval_peak_rss_mib"] > 100  # python + torch + the model: a real child's peak
    assert all(pairs[f"prefill_peak_mib_{n}"] >= 0 for n in (128, 256, 512))
