"""
Speed and memory figures, in one run: model.py against transformers, and what
PolyKV compression buys at decode time and costs at prefill time.

    python bench.py                 # default model (SmolLM2-135M-Instruct), ~12 min on one CPU core
    python bench.py --quick         # small sizes: a smoke run
    python bench.py --model DIR --device cuda --dtype bfloat16

1. prefill: model.py vs transformers (sdpa), same checkpoint, at 1k and 4k prompt
   tokens: tokens/s and the ratio ours / transformers (>= 1.0: ours is at least as
   fast). Both compute the last position's logits only (transformers: logits_to_keep=1).
2. decode at a 4k context: ms/token, ours vs transformers (its DynamicCache); ours both
   eager (the reference) and with decode_one_token under torch.compile (optional).
3. compressed decode: ms/token from an 8k context compressed to a 512 average budget
   (uniform SnapKV), from the same context with FullKV, and from a plain 512-token
   prompt; and what compression costs at prefill time: gathering the statistics
   (window queries; H2O column sums in every layer) and apply_plan, as shares of a
   plain prefill.
4. batched decoding: one budget's baseline runs decoded one by one vs stacked into
   one batch (model.stack_caches + generate_batch), as the evaluation does.
5. memory: KV bytes of every baseline at budget 512 on the 8k prompt next to FullKV's
   (and next to the token ratio); the peak memory growth of one prefill at 2k/4k/8k
   tokens, each in a fresh process (it should grow ~linearly in T, not as T^2); the
   peak RSS of a small evaluation run (longbench_eval.py on one RULER sample).
6. calibration: the objective on the candidate plans a search sweep makes, re-running
   every layer vs starting at the first changed layer (objective.plan_sample_kl).

The machine may be shared and noisy: every comparison interleaves its variants
within each repetition and reports medians. Prompts are random token ids (speed
does not depend on the text). The last line is one `name=value` summary.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

import checkpoint as CK
import model as M
import policies as P
import polykv as K
from bench_hf import hf_decode, hf_prefill, load_hf, sync
from bench_memory import bench_peak_memory, short


# -----------------------------------------------------------------------------
# Timing helpers


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


def ours_decode(model: M.Transformer, cache: M.KVCache, steps: int, step: Callable = M.decode_one_token) -> float:
    """Seconds per greedy decode step (decode_one_token or its compiled form) on a copy of `cache` (left untouched)."""
    cache = cache.clone()  # room for 64 new tokens: no reallocation while timing
    device = str(cache.k[0].device)
    token = torch.ones(cache.k[0].shape[0], 1, dtype=torch.long, device=device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        token = step(model, token, cache).argmax(-1, keepdim=True)
    sync(device)
    return (time.perf_counter() - t0) / steps


# -----------------------------------------------------------------------------
# 1-2. model.py vs transformers


def bench_prefill(model: M.Transformer, hf, sizes: dict, repeats: int, device: str) -> dict[str, float]:
    """Prefill tokens/s at two prompt lengths, ours vs transformers, `repeats` interleaved pairs each
    (the ratio sits near 1.0: a median of fewer pairs moved it by several percent between runs)."""
    res = {}
    for name in ("prefill_short", "prefill_long"):
        n = sizes[name]
        ids = random_prompt(n, model.cfg.vocab_size, device)
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
    return res


def compiled_step(model: M.Transformer, cache: M.KVCache) -> Callable | None:
    """model.compiled_decode_one_token, compiled here by one step on a copy of `cache`; None (and why)
    where torch.compile cannot run (e.g. no C++ compiler)."""
    step = M.compiled_decode_one_token()
    t0 = time.perf_counter()
    try:
        ours_decode(model, cache, 1, step)
    except Exception as e:  # the compiler's failure modes are many; the eager path is unaffected
        print(f"torch.compile decode: unavailable ({type(e).__name__}: {short(str(e))})", flush=True)
        return None
    print(f"torch.compile decode: compiled in {time.perf_counter() - t0:.0f} s", flush=True)
    return step


def bench_decode(model: M.Transformer, hf, sizes: dict, repeats: int, device: str, compile: bool = True) -> dict[str, float]:
    """Decode ms/token at one context length: ours (eager, and compiled where torch.compile runs) vs transformers."""
    n, steps, res = sizes["decode_ctx"], sizes["steps"], {}
    ids = random_prompt(n, model.cfg.vocab_size, device, seed=1)
    _, cache = M.prefill(model, ids)
    variants = {"ours": lambda: ours_decode(model, cache, steps)}
    if compile and (step := compiled_step(model, cache)) is not None:
        variants["compiled"] = lambda: ours_decode(model, cache, steps, step)
    if hf is not None:
        _, past = hf_prefill(hf, ids)
        variants["hf"] = lambda: hf_decode(hf, past, steps)
    med = interleaved(variants, repeats)
    for name, ms_key, ratio_key in (("ours", "decode_ours_ms", "decode_ratio"),
                                    ("compiled", "decode_compiled_ms", "decode_compiled_ratio")):
        if name not in med:
            continue
        res[ms_key] = 1e3 * med[name]
        line = f"decode at a {n}-token context: {name} {1e3 * med[name]:.1f} ms/token ({1 / med[name]:.1f} tok/s)"
        if hf is not None:
            res[ratio_key] = med["hf"] / med[name]
            line += f" | transformers {1e3 * med['hf']:.1f} ms/token | ratio {res[ratio_key]:.2f}"
        print(line, flush=True)
    if hf is not None:
        res["decode_hf_ms"] = 1e3 * med["hf"]
    return res


# -----------------------------------------------------------------------------
# 3-4. Compression: decode from a compressed long context, its prefill-time cost, batching


def bench_compression(model: M.Transformer, sizes: dict, repeats: int,
                      device: str) -> tuple[dict[str, float], M.KVCache, list[P.LayerStats]]:
    """Decode from a compressed long context vs FullKV and vs a plain short prompt; the prefill-time
    cost of the statistics and of apply_plan. Also returns the long prompt's full cache and its
    statistics (window queries, H2O sums in every layer) for the sections that follow."""
    cfg, res = model.cfg, {}
    T, budget, n_short, steps = sizes["long_ctx"], sizes["budget"], sizes["short_ctx"], sizes["steps"]
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

    # a long prefill takes a minute on one core: one repetition, warm from sections 1-2, the full one last
    med = interleaved({"plain": lambda: ours_prefill(model, ids), "window": lambda: with_stats(()),
                       "h2o": lambda: with_stats(None)}, sizes["long_prefill_repeats"], warmup=False)
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
          f"{med['h2o']:.2f} s ({100 * res['stats_overhead_share']:+.1f}%) [{sizes['long_prefill_repeats']} run(s) each]")
    print(f"apply_plan at budget {budget}: snapkv {1e3 * apply['snapkv']:.0f} ms "
          f"({100 * res['apply_snapkv_share']:.1f}% of prefill) | h2o {1e3 * apply['h2o']:.0f} ms "
          f"({100 * res['apply_h2o_share']:.1f}% of prefill)", flush=True)

    # --- decode: FullKV at T, compressed T, plain short prompt
    compressed = kept[snap.name]
    _, short_cache = M.prefill(model, random_prompt(n_short, cfg.vocab_size, device, seed=3))
    med = interleaved({"full": lambda: ours_decode(model, cache, steps),
                       "compressed": lambda: ours_decode(model, compressed, steps),
                       "plain": lambda: ours_decode(model, short_cache, steps)}, repeats)
    res.update(decode_full_ms=1e3 * med["full"], decode_compressed_ms=1e3 * med["compressed"],
               decode_plain_ms=1e3 * med["plain"], compressed_over_plain=med["compressed"] / med["plain"],
               speedup_vs_full=med["full"] / med["compressed"])
    print(f"decode ms/token: FullKV at {T} {res['decode_full_ms']:.1f} | snapkv@{budget} from {T} "
          f"{res['decode_compressed_ms']:.1f} | plain {n_short}-token prompt {res['decode_plain_ms']:.1f}")
    print(f"  compressed / plain = {res['compressed_over_plain']:.3f} (target <= 1.1) | "
          f"speed-up over FullKV = {res['speedup_vs_full']:.2f}x", flush=True)
    return res, cache, stats


def baseline_caches(cache: M.KVCache, stats: list[P.LayerStats], n_layers: int, budget: int,
                    room: int = 64) -> dict[str, M.KVCache]:
    """Every baseline method's compressed cache at one budget (K.BASELINES), from one prefill."""
    settings = P.Settings()
    return {m: K.apply_plan(cache, stats, K.baseline_plan(m, n_layers, budget, settings), room) for m in K.BASELINES}


def bench_batching(model: M.Transformer, cache: M.KVCache, stats: list[P.LayerStats], sizes: dict,
                   repeats: int, device: str) -> dict[str, float]:
    """The evaluation's batching: one budget's baseline runs decoded one by one vs stacked into one batch."""
    steps, budget = sizes["steps"], sizes["budget"]
    caches = list(baseline_caches(cache, stats, model.cfg.n_layers, budget, room=steps + 1).values())
    last = torch.zeros(len(caches), model.cfg.vocab_size, device=device)

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

    med = interleaved({"one": one_by_one, "stacked": stacked}, min(repeats, 3))
    res = {"batched_decode_speedup": med["one"] / med["stacked"]}
    print(f"decoding the {len(caches)} baselines at {budget} ({steps} tokens each): one by one {med['one']:.2f} s | "
          f"stacked into one batch {med['stacked']:.2f} s -> {res['batched_decode_speedup']:.2f}x", flush=True)
    return res


# -----------------------------------------------------------------------------
# 5. Memory: KV bytes per method, a prefill's peak growth, an evaluation run's peak RSS


def bench_kv_bytes(model: M.Transformer, cache: M.KVCache, stats: list[P.LayerStats], sizes: dict) -> dict[str, float]:
    """Exact bytes of each baseline's compressed cache next to FullKV's, and next to the token ratio
    and polykv.plan_kv_bytes (what the plan says it keeps)."""
    cfg, T, budget = model.cfg, sizes["long_ctx"], sizes["budget"]
    full = cache.nbytes()
    print(f"KV cache of a {T}-token prompt: FullKV {full / 2**20:.1f} MiB; at budget {budget}:")
    res = {"kv_bytes_fullkv": full}
    for method, compressed in baseline_caches(cache, stats, cfg.n_layers, budget).items():
        plan = K.baseline_plan(method, cfg.n_layers, budget, P.Settings())
        res[f"kv_bytes_{method}"] = compressed.nbytes()
        res[f"kv_bytes_ratio_{method}"] = compressed.nbytes() / full
        res[f"token_ratio_{method}"] = sum(min(b, T) for b in plan.budgets) / (cfg.n_layers * T)
        res[f"kv_planned_bytes_{method}"] = K.plan_kv_bytes(plan, T, cfg, cache.k[0].element_size())
        print(f"  {method:<13} {compressed.nbytes() / 2**20:7.2f} MiB | bytes ratio {res[f'kv_bytes_ratio_{method}']:.4f} "
              f"| token ratio {res[f'token_ratio_{method}']:.4f} | plan_kv_bytes "
              f"{res[f'kv_planned_bytes_{method}'] / 2**20:.2f} MiB")
    res["kv_bytes_ratio"], res["token_ratio"] = res["kv_bytes_ratio_snapkv"], res["token_ratio_snapkv"]
    return res



# -----------------------------------------------------------------------------
# 6. Calibration: reusing the layers below the first one a candidate plan changes


def bench_calibration(model: M.Transformer, sizes: dict, repeats: int, device: str) -> dict[str, float]:
    """The calibration objective on candidate plans as the search makes them (each changes one or two
    layers of the current plan): every layer re-run (K.continuation_kl) vs objective.plan_sample_kl,
    which starts at the first changed layer."""
    import objective as O
    import random

    cfg, n = model.cfg, model.cfg.n_layers
    ref = O.build_reference(model, random_prompt(sizes["calib_ctx"], cfg.vocab_size, device, seed=4)[0].tolist(),
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
        O.plan_sample_kl(model, ref, K.Plan(best_p, best_b))  # the current plan, evaluated before its candidates
        for plan in candidates:
            O.plan_sample_kl(model, ref, plan)
        return time.perf_counter() - t0

    med = interleaved({"plain": plain, "reuse": reuse}, min(repeats, 3))
    res = {"calibration_speedup": med["plain"] / med["reuse"]}
    print(f"{len(candidates)} candidate plans on a {sizes['calib_ctx']}-token reference: every layer re-run "
          f"{med['plain']:.2f} s | from the first changed layer {med['reuse']:.2f} s -> {res['calibration_speedup']:.2f}x")
    return res


# -----------------------------------------------------------------------------
# Command line

FULL = dict(prefill_short=1024, prefill_long=4096, decode_ctx=4096, long_ctx=8192, budget=512, short_ctx=512, steps=32,
            calib_ctx=2048, long_prefill_repeats=1, peak_lengths=(2048, 4096, 8192), eval_length=2048)
QUICK = dict(prefill_short=128, prefill_long=256, decode_ctx=256, long_ctx=512, budget=64, short_ctx=64, steps=4,
             calib_ctx=256, long_prefill_repeats=1, peak_lengths=(128, 256, 512), eval_length=512)


def summary_line(res: dict, sizes: dict) -> str:
    """One `name=value` line of the headline figures, sizes in the names (prefill1k_ratio, ...); a figure
    a run did not measure (no transformers, a failed child process) is left out."""
    L, S, D = short(sizes["long_ctx"]), short(sizes["short_ctx"]), short(sizes["decode_ctx"])
    names = {  # key in res: (name in the line, format)
        "prefill_short_ratio": (f"prefill{short(sizes['prefill_short'])}_ratio", ".2f"),
        "prefill_long_ratio": (f"prefill{short(sizes['prefill_long'])}_ratio", ".2f"),
        "decode_ratio": (f"decode{D}_ratio", ".2f"), "decode_ours_ms": (f"decode{D}_ours_ms", ".1f"),
        "decode_hf_ms": (f"decode{D}_hf_ms", ".1f"), "decode_compiled_ratio": (f"decode{D}_compiled_ratio", ".2f"),
        "decode_compiled_ms": (f"decode{D}_compiled_ms", ".1f"),
        "compressed_over_plain": (f"decode{L}_compressed_over_plain{S}", ".3f"),
        "speedup_vs_full": (f"speedup_vs_full{L}", ".2f"), "batched_decode_speedup": ("batched_decode_speedup", ".2f"),
        "kv_bytes_ratio": ("kv_bytes_ratio", ".4f"), "token_ratio": ("token_ratio", ".4f"),
        "stats_overhead_share": ("stats_overhead_share", ".3f"), "stats_window_share": ("stats_window_share", ".3f"),
        "apply_snapkv_share": ("apply_plan_share", ".4f"),
        **{f"prefill_peak_mib_{short(n)}": (f"prefill_peak_mib_{short(n)}", ".0f") for n in sizes["peak_lengths"]},
        "prefill_peak_growth_ratio": ("prefill_peak_growth_ratio", ".2f"),
        "eval_peak_rss_mib": ("eval_peak_rss_mib", ".0f"), "calibration_speedup": ("calibration_speedup", ".2f")}
    return " ".join(f"{name}={res[key]:{fmt}}" for key, (name, fmt) in names.items() if key in res)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per variant (medians; the "
                   "batching and calibration sections use at most 3, the 8k prefills 1)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd decode (it compiles for ~1-2 min)")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    dtype = getattr(torch, args.dtype)
    model_dir = args.model or CK.default_model_dir()
    t_start = time.perf_counter()
    model = CK.load_model(model_dir, args.device, dtype)
    hf = None
    if not args.no_transformers:
        hf = load_hf(model_dir, args.device, dtype)
        if hf is None:
            print("transformers is not installed: skipping the comparison (pip install -r requirements-test.txt)")
    print(f"model {model_dir} | {args.device} {args.dtype} | torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads | medians of {args.repeats} interleaved repetitions", flush=True)

    res = {}
    with torch.no_grad():
        print("\n== 1. prefill: model.py vs transformers (sdpa), same checkpoint; ratio = ours / transformers throughput")
        res.update(bench_prefill(model, hf, sizes, args.repeats, args.device))
        print("\n== 2. decode: model.py vs transformers; ratio = transformers ms / ours")
        res.update(bench_decode(model, hf, sizes, args.repeats, args.device, compile=not args.no_compile))
        del hf
        print(f"\n== 3. compressed decode: {sizes['long_ctx']}-token context, uniform snapkv at average budget "
              f"{sizes['budget']}")
        r3, cache, stats = bench_compression(model, sizes, args.repeats, args.device)
        res.update(r3)
        print(f"\n== 4. batched decoding: the {len(K.BASELINES)} baselines at budget {sizes['budget']}, "
              f"from the {sizes['long_ctx']}-token prompt")
        res.update(bench_batching(model, cache, stats, sizes, args.repeats, args.device))
        print("\n== 5. memory")
        res.update(bench_kv_bytes(model, cache, stats, sizes))
        del cache, stats
        res.update(bench_peak_memory(model_dir, sizes, args.device, args.dtype))
        print("\n== 6. calibration objective: candidate plans, re-running every layer vs from the first changed one")
        res.update(bench_calibration(model, sizes, args.repeats, args.device))
    print(f"\nbench.py took {time.perf_counter() - t_start:.0f} s")
    line = summary_line(res, sizes)
    print(line)
    return line


if __name__ == "__main__":
    main()
