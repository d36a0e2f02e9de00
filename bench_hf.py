"""
bench.py's reference side: transformers on the same checkpoint (optional: without transformers
installed, bench.py times model.py alone), and the timing barrier both sides share.
"""
from __future__ import annotations

import inspect
import time
from pathlib import Path

import torch


def sync(device: str) -> None:
    """Wait for the device: CUDA runs asynchronously, so a timer must not stop before it does."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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
