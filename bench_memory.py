"""
Peak memory, for bench.py's section 5: the peak growth of resident memory during one prefill (each
length in a fresh process: `python bench_memory.py T`), and the peak RSS of a small evaluation run.
Linux-only figures (/proc/self/status, ru_maxrss); elsewhere they are left out.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import checkpoint as CK
import model as M

PROJECT = Path(__file__).resolve().parent


def short(n: int) -> str:
    """4096 -> "4k": the sizes' names in the summary line."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def proc_status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: peak resident), or None off Linux."""
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory (VmHWM) to its current size (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def prefill_peak(model_dir: Path, n: int, device: str, dtype: torch.dtype) -> dict:
    """In THIS process (bench_peak_memory runs it in a fresh one per length): the peak growth of resident
    memory during one prefill of n tokens, after a short warm-up prefill, and the cache's KV bytes."""
    model = CK.load_model(model_dir, device, dtype)
    ids = torch.randint(100, model.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(5)).to(device)
    M.prefill(model, ids[:, :64])  # warm-up: kernels, thread pools, allocator
    exact = reset_peak_rss()  # else VmHWM still holds loading's peak, and only growth above it shows
    before = proc_status_kib("VmRSS")
    _, cache = M.prefill(model, ids)
    peak = proc_status_kib("VmHWM")
    return {"tokens": n, "growth_mib": (peak - before) / 1024, "kv_mib": cache.nbytes() / 2**20, "exact": exact}


# A bare Python between bench.py and the command: on Linux a child's ru_maxrss starts from its
# parent's resident size at the fork, so only a small parent leaves the command's own peak visible.
PEAK_OF_CHILD = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); open(sys.argv[1], 'w')"
                 ".write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(code)")


def run_child(cmd: list[str]) -> tuple[int, float, str]:
    """Run a command; -> (exit code, its peak RSS in MiB, its output)."""
    with tempfile.TemporaryDirectory() as tmp:
        maxrss = Path(tmp) / "maxrss"
        proc = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, str(maxrss), *cmd], cwd=PROJECT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return proc.returncode, int(maxrss.read_text()) / 1024, proc.stdout  # ru_maxrss: KiB on Linux


def bench_peak_memory(model_dir: Path, sizes: dict, device: str, dtype: str) -> dict[str, float]:
    """Peak memory growth of one prefill at several lengths (a fresh process each), and the peak RSS
    of a small evaluation run."""
    res, growth = {}, {}
    for n in sizes["peak_lengths"]:
        code, _, out = run_child([sys.executable, str(PROJECT / "bench_memory.py"), str(n), "--model",
                                  str(model_dir), "--device", device, "--dtype", dtype])
        if code != 0:
            print(f"prefill peak at {n} tokens: failed (exit {code}):\n{out[-2000:]}")
            continue
        r = json.loads(out.strip().splitlines()[-1])
        growth[n] = r["growth_mib"]
        res[f"prefill_peak_mib_{short(n)}"] = r["growth_mib"]
        print(f"prefill {n:>5} tokens: peak memory growth {r['growth_mib']:7.1f} MiB ({1024 * r['growth_mib'] / n:.1f} "
              f"MiB per 1k tokens; its KV cache {r['kv_mib']:.1f} MiB)" + ("" if r["exact"] else
              " [peak not resettable here: growth above the loading peak only]"), flush=True)
    if len(growth) >= 2 and min(growth.values()) > 0:
        (a, ga), (b, gb) = sorted(growth.items())[-2:]
        res["prefill_peak_growth_ratio"] = gb / ga
        print(f"  {short(b)} / {short(a)} tokens: growth x{gb / ga:.2f} (linear: x{b / a:.0f}, quadratic: x{(b / a) ** 2:.0f})")

    with tempfile.TemporaryDirectory() as out_dir:
        cmd = [sys.executable, str(PROJECT / "longbench_eval.py"), "--benchmark", "ruler", "--tasks", "niah_single_1",
               "--limit", "1", "--max-length", str(sizes["eval_length"]), "--budget", str(sizes["budget"]),
               "--methods", "snapkv", "h2o", "--out", out_dir, "--model", str(model_dir), "--device", device,
               "--dtype", dtype]
        t0 = time.perf_counter()
        code, rss, out = run_child(cmd)
        seconds = time.perf_counter() - t0
    shown = " ".join(cmd[1:]).replace(out_dir, "<tmpdir>").replace(str(PROJECT) + "/", "")
    if code != 0:
        print(f"evaluation run failed (exit {code}): python {shown}\n{out[-2000:]}")
        return res
    res["eval_peak_rss_mib"] = rss
    print(f"evaluation run (python {shown}): peak RSS {rss:.0f} MiB, {seconds:.0f} s", flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description="One T-token prefill's peak memory growth, as JSON (bench.py's section 5).")
    p.add_argument("tokens", type=int)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()
    with torch.no_grad():
        print(json.dumps(prefill_peak(args.model or CK.default_model_dir(), args.tokens, args.device, getattr(torch, args.dtype))))


if __name__ == "__main__":
    main()
