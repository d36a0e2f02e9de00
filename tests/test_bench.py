"""bench.py smoke tests on tiny random models: the script runs end to end (no timing assertions)."""
import pytest
import torch

import bench
import model as M

SMALL = dict(prefill_short=24, prefill_long=40, decode_ctx=40, long_ctx=96, budget=40, short_ctx=40, steps=2, calib_ctx=96)


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
        r1 = bench.bench_vs_transformers(model, None, SMALL, repeats=1, device="cpu")
        r2 = bench.bench_compression(model, SMALL, repeats=1, device="cpu")
        r3 = bench.bench_calibration(model, SMALL, repeats=1, device="cpu")
    assert "prefill_short_ratio" not in r1 and r1["decode_ours_tok_s"] > 0
    assert r2["kv_bytes_ratio"] == pytest.approx(r2["token_ratio"])  # every layer keeps 40 of 96 tokens
    assert r2["token_ratio"] == pytest.approx(40 / 96)
    assert r3["calibration_speedup"] > 0
    line = bench.summary_line(r1, r2, r3, SMALL)
    assert "decode96_compressed_over_plain40=" in line and "prefill" not in line.split()[0]


def test_main_end_to_end_against_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=150, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path)
    line = bench.main(["--model", str(tmp_path), "--quick", "--repeats", "1"])
    pairs = dict(kv.split("=") for kv in line.split())
    for name in ("prefill128_ratio", "prefill256_ratio", "decode256_ratio", "kv_bytes_ratio", "token_ratio",
                 "decode512_compressed_over_plain64", "speedup_vs_full512", "stats_overhead_share", "calibration_speedup",
                 "batched_decode_speedup"):
        assert float(pairs[name]) > -1, name
    assert float(pairs["kv_bytes_ratio"]) == pytest.approx(float(pairs["token_ratio"]), abs=1e-4)
