"""
Speed and memory figures, in one run: model.py against transformers, and what
PolyKV compression buys at decode time and costs at prefill time.

    python bench.py                 # default model (SmolLM2-135M-Instruct), ~10 min on 2 CPU cores
    python bench.py --quick         # small sizes: a smoke run
    python bench.py --model DIR --device cuda --dtype bfloat16

1. model.py vs transformers (sdpa, its DynamicCache), same checkpoint: prefill
   tokens/s at 1k and 4k prompt tokens, decode tokens/s at a 4k context, as
   ratios ours / transformers (>= 1.0: ours is at least as fast). Both prefills
   compute the last position's logits only (transformers: logits_to_keep=1).
2. Compression: decode ms/token from an 8k context with FullKV and with a
   uniform SnapKV plan at a 512 average budget, next to a plain 512-token
   prompt; KV bytes of the compressed cache over FullKV's next to the token
   ratio; and the prefill-time cost of compression: gathering the statistics
   during prefill (window queries; H2O column sums in every layer) and
   apply_plan, each as a share of a plain prefill; and the evaluation's batching: one
   budget's 7 baselines decoded one by one vs stacked into one batch (model.stack_caches).
3. Calibration: the objective on the candidate plans a search sweep makes, re-running
   every layer vs starting at the first changed layer (calibrate.plan_sample_kl).

The machine may be shared and noisy: every comparison interleaves its variants
within each repetition and reports medians. Prompts are random token ids (speed
does not depend on the text). The last line is one `name=value` summary.
"""
from __future__ import annotations

import argparse
import inspect
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

import model as M
import policies as P
import polykv as K

# -----------------------------------------------------------------------------
# Timing helpers


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(variants: dict[str, Callable[[], float]], repeats: int, warmup: bool = True) -> dict[str, float]:
    """Run each variant once per repetition, in turn (A B C A B C ...), after one warm-up
    round; each call returns the seconds it measured. -> median seconds per variant."""
    for fn in variants.values() if warmup else ():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(fn())
    return {name: statistics.median(ts) for name, ts in times.items()}


def random_prompt(n: int, vocab_size: int, device: str, seed: int = 0) -> torch.Tensor:
    """(1, n) token ids; low ids (special tokens in most vocabularies) are avoided."""
    gen = torch.Generator().manual_seed(seed)
    low = min(100, vocab_size // 2)
    return torch.randint(low, vocab_size, (1, n), generator=gen).to(device)


# -----------------------------------------------------------------------------
# model.py: a timed prefill and a timed run of decode steps


def ours_prefill(model: M.Transformer, ids: torch.Tensor) -> float:
    """Seconds for a full prefill of ids (1, T)."""
    sync(str(ids.device))
    t0 = time.perf_counter()
    M.prefill(model, ids)
    sync(str(ids.device))
    return time.perf_counter() - t0


def ours_decode(model: M.Transformer, cache: M.KVCache, steps: int) -> float:
    """Seconds per greedy decode step on a copy of `cache` (left untouched)."""
    cache = cache.clone()  # room for 64 new tokens: no reallocation while timing
    device = str(cache.k[0].device)
    token = torch.ones(1, 1, dtype=torch.long, device=device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        token = M.decode_one_token(model, token, cache).argmax(-1, keepdim=True)
    sync(device)
    return (time.perf_counter() - t0) / steps


# -----------------------------------------------------------------------------
# transformers, the reference (optional)


def load_hf(model_dir: Path, device: str, dtype: torch.dtype):
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    hf = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=dtype)
    return hf.to(device).eval()


def hf_cache_kwarg(hf) -> str:
    """transformers >= 5.2x names the cache argument `cache`; earlier versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


@torch.no_grad()
def hf_prefill(hf, ids: torch.Tensor):
    """-> (seconds, DynamicCache) of one prefill, last position's logits only."""
    sync(str(ids.device))
    t0 = time.perf_counter()
    out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
    sync(str(ids.device))
    return time.perf_counter() - t0, getattr(out, hf_cache_kwarg(hf))


@torch.no_grad()
def hf_decode(hf, past, steps: int) -> float:
    """Seconds per greedy decode step on the DynamicCache `past`, cropped back afterwards."""
    device, cache_kwarg = str(hf.device), hf_cache_kwarg(hf)
    token = torch.ones(1, 1, dtype=torch.long, device=device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = hf(input_ids=token, use_cache=True, **{cache_kwarg: past})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    seconds = (time.perf_counter() - t0) / steps
    past.crop(-steps)  # negative: drop the last `steps` tokens (every transformers version)
    return seconds


# -----------------------------------------------------------------------------
# The two sections


def bench_vs_transformers(model: M.Transformer, hf, sizes: dict, repeats: int, device: str) -> dict[str, float]:
    """Prefill tok/s at two prompt lengths and decode tok/s at one context, ours vs transformers."""
    vocab, res = model.cfg.vocab_size, {}
    for name in ("prefill_short", "prefill_long"):
        n = sizes[name]
        ids = random_prompt(n, vocab, device)
        variants = {"ours": lambda: ours_prefill(model, ids)}
        if hf is not None:
            variants["hf"] = lambda: hf_prefill(hf, ids)[0]
        med = interleaved(variants, repeats)
        res[f"{name}_ours_tok_s"] = n / med["ours"]
        line = f"prefill {n:>5} tokens: ours {n / med['ours']:8.0f} tok/s"
        if hf is not None:
            res[f"{name}_hf_tok_s"] = n / med["hf"]
            res[f"{name}_ratio"] = med["hf"] / med["ours"]
            line += f" | transformers {n / med['hf']:8.0f} tok/s | ratio {res[f'{name}_ratio']:.2f}"
        print(line, flush=True)

    n, steps = sizes["decode_ctx"], sizes["steps"]
    ids = random_prompt(n, vocab, device, seed=1)
    _, cache = M.prefill(model, ids)
    variants = {"ours": lambda: ours_decode(model, cache, steps)}
    if hf is not None:
        _, past = hf_prefill(hf, ids)
        variants["hf"] = lambda: hf_decode(hf, past, steps)
    med = interleaved(variants, repeats)
    res["decode_ours_tok_s"] = 1 / med["ours"]
    line = f"decode at {n:>5} context: ours {1 / med['ours']:6.1f} tok/s ({1e3 * med['ours']:.1f} ms)"
    if hf is not None:
        res["decode_hf_tok_s"] = 1 / med["hf"]
        res["decode_ratio"] = med["hf"] / med["ours"]
        line += f" | transformers {1 / med['hf']:6.1f} tok/s ({1e3 * med['hf']:.1f} ms) | ratio {res['decode_ratio']:.2f}"
    print(line, flush=True)
    return res


def bench_compression(model: M.Transformer, sizes: dict, repeats: int, device: str) -> dict[str, float]:
    """Decode from a compressed long context vs FullKV and vs a plain short prompt; KV bytes;
    the prefill-time cost of the statistics and of apply_plan."""
    cfg, res = model.cfg, {}
    T, budget, short, steps = sizes["long_ctx"], sizes["budget"], sizes["short_ctx"], sizes["steps"]
    window = P.Settings().window
    ids = random_prompt(T, cfg.vocab_size, device, seed=2)
    snap, h2o = K.uniform_plan(cfg.n_layers, "snapkv", budget), K.uniform_plan(cfg.n_layers, "h2o", budget)

    # --- prefill cost: plain, + window queries (SnapKV/TOVA), + H2O column sums in every layer
    kept = {}

    def with_stats(h2o_layers) -> float:
        sync(device)
        t0 = time.perf_counter()
        _, kept["cache"], kept["stats"] = K.prefill_with_stats(model, ids, window, h2o_layers=h2o_layers)
        sync(device)
        return time.perf_counter() - t0

    prefill_reps = max(1, min(repeats, 3))  # a long prefill takes a while: fewer repetitions
    med = interleaved({"plain": lambda: ours_prefill(model, ids), "window": lambda: with_stats(()),
                       "h2o": lambda: with_stats(None)}, prefill_reps, warmup=False)  # warm from section 1
    cache, stats = kept["cache"], kept["stats"]  # last prefill: window queries + H2O sums everywhere

    def timed_apply(plan: K.Plan) -> float:
        sync(device)
        t0 = time.perf_counter()
        kept[plan.name] = K.apply_plan(cache, stats, plan)
        sync(device)
        return time.perf_counter() - t0

    apply = interleaved({"snapkv": lambda: timed_apply(snap), "h2o": lambda: timed_apply(h2o)}, repeats)
    plain = med["plain"]
    res["prefill_long_s"] = plain
    res["stats_window_share"] = med["window"] / plain - 1
    res["stats_overhead_share"] = med["h2o"] / plain - 1
    res["apply_snapkv_share"] = apply["snapkv"] / plain
    res["apply_h2o_share"] = apply["h2o"] / plain
    print(f"prefill {T} tokens: plain {plain:.2f} s | + window queries {med['window']:.2f} s "
          f"({100 * res['stats_window_share']:+.1f}%) | + window queries and H2O sums in all layers "
          f"{med['h2o']:.2f} s ({100 * res['stats_overhead_share']:+.1f}%)")
    print(f"apply_plan at budget {budget}: snapkv {1e3 * apply['snapkv']:.0f} ms "
          f"({100 * res['apply_snapkv_share']:.1f}% of prefill) | h2o {1e3 * apply['h2o']:.0f} ms "
          f"({100 * res['apply_h2o_share']:.1f}% of prefill)", flush=True)

    # --- memory: exact bytes of the tensors, next to the token count ratio
    compressed = kept[snap.name]
    res["kv_bytes_ratio"] = compressed.nbytes() / cache.nbytes()
    res["token_ratio"] = sum(min(b, T) for b in snap.budgets) / (cfg.n_layers * T)
    print(f"KV cache: full {cache.nbytes() / 2**20:.1f} MiB | snapkv@{budget} "
          f"{compressed.nbytes() / 2**20:.2f} MiB | bytes ratio {res['kv_bytes_ratio']:.4f} "
          f"| token ratio {res['token_ratio']:.4f}")

    # --- decode: FullKV at T, compressed T, plain short prompt
    _, short_cache = M.prefill(model, random_prompt(short, cfg.vocab_size, device, seed=3))
    med = interleaved({"full": lambda: ours_decode(model, cache, steps),
                       "compressed": lambda: ours_decode(model, compressed, steps),
                       "plain": lambda: ours_decode(model, short_cache, steps)}, repeats)
    res.update(decode_full_ms=1e3 * med["full"], decode_compressed_ms=1e3 * med["compressed"],
               decode_plain_ms=1e3 * med["plain"], compressed_over_plain=med["compressed"] / med["plain"],
               speedup_vs_full=med["full"] / med["compressed"])
    print(f"decode ms/token: FullKV at {T} {res['decode_full_ms']:.1f} | snapkv@{budget} from {T} "
          f"{res['decode_compressed_ms']:.1f} | plain {short}-token prompt {res['decode_plain_ms']:.1f}")
    print(f"  compressed / plain = {res['compressed_over_plain']:.3f} (target <= 1.1) | "
          f"speed-up over FullKV = {res['speedup_vs_full']:.2f}x", flush=True)

    # --- the evaluation's batching: the 7 compressed baselines of one budget, one by one vs stacked
    plans = [K.uniform_plan(cfg.n_layers, p, budget) for p in ("streamingllm", "h2o", "snapkv", "tova", "knorm", "random")]
    caches = [K.apply_plan(cache, stats, p, room=steps + 1) for p in plans + [K.pyramid_plan(cfg.n_layers, budget)]]
    last = torch.zeros(len(caches), cfg.vocab_size, device=device)

    def one_by_one() -> float:
        t0 = time.perf_counter()
        for c in caches:
            M.generate(model, c.clone(), last[:1], steps)
        sync(device)
        return time.perf_counter() - t0

    def stacked() -> float:
        t0 = time.perf_counter()
        M.generate_batch(model, M.stack_caches(caches, room=steps + 1), last, steps)
        sync(device)
        return time.perf_counter() - t0

    med = interleaved({"one": one_by_one, "stacked": stacked}, max(1, min(repeats, 3)))
    res["batched_decode_speedup"] = med["one"] / med["stacked"]
    print(f"decoding the {len(caches)} baselines at {budget} ({steps} tokens each): one by one {med['one']:.2f} s | "
          f"stacked into one batch {med['stacked']:.2f} s -> {res['batched_decode_speedup']:.2f}x", flush=True)
    return res


def bench_calibration(model: M.Transformer, sizes: dict, repeats: int, device: str) -> dict[str, float]:
    """The calibration objective on candidate plans as the search makes them (each changes one or two
    layers of the current plan): every layer re-run (K.continuation_kl) vs calibrate.plan_sample_kl,
    which starts at the first changed layer."""
    import calibrate as C
    import random

    cfg, n = model.cfg, model.cfg.n_layers
    ref = C.build_reference(model, random_prompt(sizes["calib_ctx"], cfg.vocab_size, device, seed=4)[0].tolist(),
                            "bench", 32, (), P.Settings().window)
    rng = random.Random(0)
    best_p, best_b = ["snapkv"] * n, [sizes["budget"]] * n
    candidates = []
    for layer in rng.sample(range(n), n):  # the search's order: by sensitivity, i.e. any order
        candidates += [K.Plan(K.reroute(best_p, layer, p), best_b) for p in ("h2o", "tova")]
        donor = rng.choice([l for l in range(n) if l != layer])
        quantum = sizes["budget"] // 16  # calibrate.py's 32 at a 512 budget
        candidates.append(K.Plan(best_p, K.move_budget(best_b, donor, layer, quantum, 1, 4 * sizes["budget"])))

    def plain() -> float:
        t0 = time.perf_counter()
        for plan in candidates:
            K.continuation_kl(ref.full_logprobs, model, K.apply_plan(ref.cache, ref.stats, plan, 32, ref.memo),
                              ref.continuation)
        return time.perf_counter() - t0

    def reuse() -> float:
        ref.recent.clear()
        t0 = time.perf_counter()
        C.plan_sample_kl(model, ref, K.Plan(best_p, best_b))  # the current plan, evaluated before its candidates
        for plan in candidates:
            C.plan_sample_kl(model, ref, plan)
        return time.perf_counter() - t0

    med = interleaved({"plain": plain, "reuse": reuse}, max(1, min(repeats, 3)))
    res = {"calibration_speedup": med["plain"] / med["reuse"]}
    print(f"{len(candidates)} candidate plans on a {sizes['calib_ctx']}-token reference: every layer re-run "
          f"{med['plain']:.2f} s | from the first changed layer {med['reuse']:.2f} s -> {res['calibration_speedup']:.2f}x")
    return res


# -----------------------------------------------------------------------------
# Command line

FULL = dict(prefill_short=1024, prefill_long=4096, decode_ctx=4096, long_ctx=8192, budget=512, short_ctx=512, steps=32,
            calib_ctx=2048)
QUICK = dict(prefill_short=128, prefill_long=256, decode_ctx=256, long_ctx=512, budget=64, short_ctx=64, steps=4,
             calib_ctx=256)


def summary_line(r1: dict, r2: dict, r3: dict, sizes: dict) -> str:
    k = lambda n: f"{n // 1024}k" if n % 1024 == 0 else str(n)  # noqa: E731
    pairs = {}
    for key, name in (("prefill_short_ratio", f"prefill{k(sizes['prefill_short'])}_ratio"),
                      ("prefill_long_ratio", f"prefill{k(sizes['prefill_long'])}_ratio"),
                      ("decode_ratio", f"decode{k(sizes['decode_ctx'])}_ratio")):
        if key in r1:
            pairs[name] = f"{r1[key]:.2f}"
    pairs[f"decode{k(sizes['decode_ctx'])}_ours_tok_s"] = f"{r1['decode_ours_tok_s']:.1f}"
    L, S = k(sizes["long_ctx"]), k(sizes["short_ctx"])
    pairs[f"decode{L}_compressed_over_plain{S}"] = f"{r2['compressed_over_plain']:.3f}"
    pairs[f"speedup_vs_full{L}"] = f"{r2['speedup_vs_full']:.2f}"
    pairs["kv_bytes_ratio"] = f"{r2['kv_bytes_ratio']:.4f}"
    pairs["token_ratio"] = f"{r2['token_ratio']:.4f}"
    pairs["stats_overhead_share"] = f"{r2['stats_overhead_share']:.3f}"
    pairs["stats_window_share"] = f"{r2['stats_window_share']:.3f}"
    pairs["apply_plan_share"] = f"{r2['apply_snapkv_share']:.4f}"
    pairs["batched_decode_speedup"] = f"{r2['batched_decode_speedup']:.2f}"
    pairs["calibration_speedup"] = f"{r3['calibration_speedup']:.2f}"
    return " ".join(f"{n}={v}" for n, v in pairs.items())


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per variant (medians; long prefills use at most 3)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    dtype = getattr(torch, args.dtype)
    if args.model is None:
        from convert_gguf import ensure_model  # the embedded default, converted on first use
        args.model = ensure_model("smollm2")

    model = M.load_model(args.model, args.device, dtype)
    hf = None
    if not args.no_transformers:
        hf = load_hf(args.model, args.device, dtype)
        if hf is None:
            print("transformers is not installed: skipping the comparison (pip install -r requirements-test.txt)")
    print(f"model {args.model} | {args.device} {args.dtype} | torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads | medians of {args.repeats} interleaved repetitions", flush=True)

    with torch.no_grad():
        print("\n== model.py vs transformers (sdpa), same checkpoint; ratio = ours / transformers throughput")
        r1 = bench_vs_transformers(model, hf, sizes, args.repeats, args.device)
        del hf
        print(f"\n== PolyKV compression: {sizes['long_ctx']}-token context, uniform snapkv plan at "
              f"average budget {sizes['budget']}")
        r2 = bench_compression(model, sizes, args.repeats, args.device)
        print("\n== calibration objective: candidate plans, re-running every layer vs from the first changed one")
        r3 = bench_calibration(model, sizes, args.repeats, args.device)
    line = summary_line(r1, r2, r3, sizes)
    print("\n" + line)
    return line


if __name__ == "__main__":
    main()
