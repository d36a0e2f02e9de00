"""
A from-scratch LLaMA / Qwen2 / Qwen3 forward pass with a per-layer KV cache.

Read it top to bottom: config -> RoPE -> blocks -> prefill / decode (the cache is kv_cache.py) ->
generation -> command line (reading a checkpoint from disk, its tokenizer and chat
format are checkpoint.py's). References:
- LLaMA (Touvron et al. 2023) and Llama-3.1's RoPE frequency scaling (Meta, 2024);
- Qwen2 (q/k/v projection biases) and Qwen3 (RMSNorm on each head's q and k);
- nanoGPT and gpt-fast (Karpathy; PyTorch team) for the style: one config
  dataclass, shape comments, separate `prefill` and `decode_one_token`, and
  gpt-fast's fused projections (q/k/v in one matmul, gate/up in one).

The KV cache keeps one K and one V buffer per layer, and the layers' lengths may
differ: KV-cache compression (polykv.py) shrinks each layer on its own from the
outside. Keys are cached after RoPE, so a kept token keeps its true position, and
`cache.next_pos` (the position of the next token) continues from the prompt
length whatever the cache lengths are. This file knows nothing of policies or
plans: `prefill` can hand each layer's post-RoPE queries and keys to an
`observe` function the caller passes in, which is all a scorer needs.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from kv_cache import KVCache, stack_caches  # noqa: F401  (stack_caches: the runner batches through model)

# -----------------------------------------------------------------------------
# Config


@dataclass
class Config:  # checkpoint.config_from_hf reads one from a Hugging Face config.json
    model_type: str = "llama"
    vocab_size: int = 49152
    dim: int = 576  # hidden size
    n_layers: int = 30
    n_heads: int = 9  # query heads
    n_kv_heads: int = 3  # key/value heads (GQA: n_heads // n_kv_heads queries share one)
    head_dim: int = 64
    hidden_dim: int = 1536  # MLP inner size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3.1: {"rope_type": "llama3", ...}
    max_seq_len: int = 8192
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3


# -----------------------------------------------------------------------------
# Rotary position embedding (real-valued: rotate the two halves of each head)


def rope_frequencies(cfg: Config) -> torch.Tensor:
    """Inverse frequencies (hd/2,), with Llama-3.1's scaling of the low frequencies if configured."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq.float()
    # Llama-3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth blend between.
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen = old_ctx / s["low_freq_factor"]
    high_wavelen = old_ctx / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    blended = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], blended)
    return torch.where(wavelen < high_wavelen, inv_freq, scaled).float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd): both halves share each angle
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, nh, T, hd), cos and sin: (T, hd) in x's dtype. Pair i of a head is (x[i], x[i + hd/2]), rotated by angle i."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# -----------------------------------------------------------------------------
# The network


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 (as the reference does) so bf16 runs stay stable
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear, with the product of a few rows (a decode step, a short continuation) split by
    output columns across the CPU threads. MKL runs such a product on one thread, so it streams
    the weight at one core's memory bandwidth; as a batch of column blocks (one bmm) every thread
    streams its own block: decoding ~1.3x faster on 2 threads (bench.py), same values. The blocks
    are views of the weight as checkpoint.load_model stores it, transposed (in, out); any other
    weight, and long inputs (compute-bound, where MKL threads well), take nn.Linear's path."""
    max_split_rows = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # torch.compile's own kernel for the split runs slower than MKL's product
            return F.linear(x, self.weight, self.bias)
        rows, (n_out, n_in), n_split = x.shape[:-1].numel(), self.weight.shape, torch.get_num_threads()
        w = self.weight.t()  # (in, out)
        if rows > self.max_split_rows or n_split == 1 or n_out % n_split or not w.is_contiguous():
            return F.linear(x, self.weight, self.bias)
        blocks = w.view(n_in, n_split, n_out // n_split).transpose(0, 1)  # (n_split, in, out / n_split), no copy
        y = torch.bmm(x.reshape(1, rows, n_in).expand(n_split, -1, -1), blocks)  # (n_split, rows, out / n_split)
        y = y.transpose(0, 1).reshape(*x.shape[:-1], n_out)
        return y if self.bias is None else y + self.bias


class FusedLinear(Linear):
    """Projections of one input that the checkpoint stores apart, as ONE Linear: one matmul instead
    of several. `parts` names them in order with their output sizes, e.g. {"q_proj": 576,
    "k_proj": 192, "v_proj": 192}; their weights (and biases) are stacked along the output."""

    def __init__(self, dim: int, parts: dict[str, int], bias: bool = False):
        super().__init__(dim, sum(parts.values()), bias=bias)
        self.parts = parts


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.qkv_proj = FusedLinear(cfg.dim, {"q_proj": q, "k_proj": kv, "v_proj": kv}, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x, cos, sin, cache: "KVCache", layer: int, observe=None, last_only: bool = False) -> torch.Tensor:
        """x (B, N, dim) -> (B, N, dim); with last_only, (B, 1, dim): the last position's output alone
        (every position's keys and values are still cached, and observe still sees every query)."""
        B, N, _ = x.shape
        nh, n_kv, hd = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
        qk, v = self.qkv_proj(x).view(B, N, -1, hd).transpose(1, 2).split([nh + n_kv, n_kv], dim=1)  # (B, heads, N, hd)
        if self.cfg.qk_norm:  # Qwen3: RMSNorm on each query head and each key head
            qk = torch.cat([self.q_norm(qk[:, :nh]), self.k_norm(qk[:, nh:])], dim=1)
        q, k = apply_rope(qk, cos, sin).split([nh, n_kv], dim=1)  # (B, nh, N, hd), (B, n_kv, N, hd): rotated together
        k_all, v_all = cache.append(layer, k, v)  # (B, n_kv, L, hd): cached tokens + these N
        if observe is not None:
            observe(layer, q, k_all)
        if last_only:  # the last query sees every valid cache slot: the one-token path below
            q, N = q[:, :, -1:], 1
        L, pad = k_all.shape[2], cache.valid_slots(layer)  # pad: (B, L) in a stacked batch of caches, else None
        if N == L and pad is None:  # a prompt on an empty cache: SDPA's causal kernel, no mask, no L x L matrix
            y = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True, enable_gqa=True)  # (B, nh, N, hd)
        elif N == 1:  # one new token sees every cached token (no causal mask): two products over the cache.
            # The nh / n_kv query heads sharing a KV head are queries of it: each KV head is read once.
            # K @ q^T streams K's rows as they lie in the cache (q @ K^T would first copy K into a packed layout).
            g = q.reshape(B, n_kv, -1, hd) * hd**-0.5  # (B, n_kv, nh / n_kv, hd)
            scores = (k_all @ g.transpose(2, 3)).transpose(2, 3).contiguous()  # (B, n_kv, nh / n_kv, L)
            if pad is not None:
                scores = scores.masked_fill(~pad[:, None, None, :], float("-inf"))
            y = (scores.softmax(-1) @ v_all).view(B, nh, 1, hd)
        else:  # query i sits at cache index L-N+i and sees every valid cache index up to it
            mask = torch.arange(L, device=x.device)[None, :] <= torch.arange(L - N, L, device=x.device)[:, None]
            mask = mask if pad is None else mask & pad[:, None, None, :]  # (N, L) or (B, 1, N, L)
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=True)  # (B, nh, N, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, N, -1))


class MLP(nn.Module):
    max_tokens = 2048  # a longer prompt runs through in pieces: its (B, N, 2 * hidden) activations stay bounded

    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_up_proj = FusedLinear(cfg.dim, {"gate_proj": cfg.hidden_dim, "up_proj": cfg.hidden_dim})
        self.down_proj = Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.max_tokens:  # each token's MLP is independent of the others
            return torch.cat([self(piece) for piece in x.split(self.max_tokens, dim=1)], dim=1)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, N, hidden) each: views of one fresh output
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))  # SwiGLU, computed in place in that output


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, layer, observe=None, last_only=False):
        """x (B, N, dim) -> (B, N, dim), or (B, 1, dim) for the last position alone if last_only."""
        h = self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, observe, last_only)
        x = (x[:, -1:] if last_only else x) + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    # Module names follow the Hugging Face checkpoint names (minus the "model." prefix), and
    # state_dict() / load_state_dict() speak exactly those names: the fused projections are
    # split into the checkpoint's q/k/v_proj and gate/up_proj, and joined when loading.
    # So loading a checkpoint is a name check and a copy, and a saved state_dict is a checkpoint.
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.register_buffer("rope_cos", torch.empty(0, cfg.head_dim), persistent=False)  # (positions, hd): see rope()
        self.register_buffer("rope_sin", torch.empty(0, cfg.head_dim), persistent=False)
        self.register_state_dict_post_hook(split_fused)
        self.register_load_state_dict_pre_hook(join_fused)

    def rope(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (n, hd) of positions start .. start+n-1, sliced from tables computed once
        (and recomputed, twice as long, when a sequence runs past them)."""
        if start + n > self.rope_cos.shape[0]:
            self.rope_cos, self.rope_sin = rope_cos_sin(self.inv_freq, torch.arange(2 * (start + n), device=self.inv_freq.device))
        return self.rope_cos[start : start + n], self.rope_sin[start : start + n]


def fused_keys(model: nn.Module, prefix: str):
    """For each FusedLinear's weight and bias: its key, its parts' keys in the checkpoint, their sizes,
    e.g. ("layers.0.self_attn.qkv_proj.weight", ["layers.0.self_attn.q_proj.weight", ...], [576, 192, 192])."""
    for name, module in model.named_modules(prefix=prefix.rstrip(".")):
        if isinstance(module, FusedLinear):
            parent = name.rpartition(".")[0]
            for kind in ("weight", "bias"):
                yield f"{name}.{kind}", [f"{parent}.{part}.{kind}" for part in module.parts], list(module.parts.values())


def split_fused(model: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict() hook: each fused tensor as the checkpoint's separate ones (contiguous copies)."""
    for fused, parts, sizes in fused_keys(model, prefix):
        if fused in state_dict:
            tensors = state_dict.pop(fused).split(sizes)
            state_dict.update((part, t.clone(memory_format=torch.contiguous_format)) for part, t in zip(parts, tensors))


def join_fused(model: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """load_state_dict() hook: the checkpoint's separate tensors concatenated into each fused one."""
    for fused, parts, _ in fused_keys(model, prefix):
        if all(part in state_dict for part in parts):
            state_dict[fused] = torch.cat([state_dict.pop(part) for part in parts])


# -----------------------------------------------------------------------------
# Forward, prefill, decode, generation

Observe = Callable[[int, torch.Tensor, torch.Tensor], None]  # (layer, q (B,nh,C,hd), k_all (B,n_kv,L,hd))


@torch.no_grad()
def forward(model: Transformer, tokens: torch.Tensor, cache: KVCache, observe: Observe | None = None,
            last_only: bool = False, start: int = 0, x: torch.Tensor | None = None,
            layer_inputs: list | None = None) -> torch.Tensor:
    """Run N new tokens (B, N) on top of `cache` (appending to it). Returns logits (B, N, V), or (B, V) if last_only.

    start, x: run only the blocks from layer `start` on, given x (B, N, dim), the hidden state
    entering that layer (the calibration re-runs a plan from the first layer it changes).
    layer_inputs: a list to which the input (B, N, dim) of every block that runs is appended."""
    x = model.embed_tokens(tokens) if x is None else x  # (B, N, dim)
    N = x.shape[1]
    cos, sin = (t.to(x.dtype) for t in model.rope(cache.next_pos, N))  # (N, hd) each
    for layer in range(start, model.cfg.n_layers):
        if layer_inputs is not None:
            layer_inputs.append(x)
        # with last_only the last block runs attention's output, o_proj and the MLP for the last
        # position alone: the other positions' outputs would feed only logits that are dropped
        x = model.layers[layer](x, cos, sin, cache, layer, observe, last_only=last_only and layer == model.cfg.n_layers - 1)
    cache.next_pos += N
    x = model.norm(x[:, -1] if last_only else x)
    return model.lm_head(x).float()


def prefill(model: Transformer, tokens: torch.Tensor, observe: Observe | None = None,
            chunk_size: int | None = None) -> tuple[torch.Tensor, KVCache]:
    """Full causal attention over the prompt (B, T). Returns the last position's logits (B, V) and the full cache.

    One pass by default: SDPA's causal kernel never builds a T x T matrix, and the MLP takes long
    prompts in pieces, so memory grows as T. chunk_size runs the prompt in pieces instead (a
    masked kernel, slower), which bounds every activation to (B, chunk, ...)."""
    cache = KVCache(model.cfg.n_layers)
    step = chunk_size or tokens.shape[1]
    for start in range(0, tokens.shape[1], step):
        logits = forward(model, tokens[:, start : start + step], cache, observe, last_only=True)
    return logits, cache


def decode_one_token(model: Transformer, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """token: (B, 1) -> logits (B, V). The cache grows by one in every layer."""
    return forward(model, token, cache, last_only=True)


def compiled_decode_one_token() -> Callable:
    """decode_one_token under torch.compile, an optional path (as in gpt-fast): it fuses the small
    per-layer ops of a decode step. Needs a C++ compiler and ~1-2 min to compile on the first call;
    the cache length is a dynamic shape, so it compiles once, not once per step. Measured on a
    2-core CPU (bench.py): ~4% faster than eager on one thread, slower on two, where the eager
    step splits its products across threads (Linear) and the compiled one does not. The eager
    decode_one_token stays the reference (tested equal)."""
    return torch.compile(decode_one_token, dynamic=True)


def generate(model: Transformer, cache: KVCache, last_logits: torch.Tensor, max_new_tokens: int,
             stop_ids: list[int] | tuple[int, ...] = (), step: Callable = decode_one_token) -> list[int]:
    """Greedy decoding for one sequence, from the prefill's last logits (1, V). Generated tokens are
    never evicted. step: decode_one_token, or its compiled form (compiled_decode_one_token())."""
    out: list[int] = []
    token = last_logits.argmax(-1, keepdim=True)  # (1, 1)
    for _ in range(max_new_tokens):
        out.append(token.item())
        if out[-1] in stop_ids or len(out) == max_new_tokens:
            break
        token = step(model, token, cache).argmax(-1, keepdim=True)
    return out


def generate_batch(model: Transformer, cache: KVCache, last_logits: torch.Tensor, max_new_tokens: int,
                   stop_ids: list[int] | tuple[int, ...] = (), step: Callable = decode_one_token) -> list[list[int]]:
    """`generate` for B sequences at once (e.g. a `stack_caches` batch), from last logits (B, V).
    Each row stops as `generate` would; the batch runs until every row has stopped."""
    out: list[list[int]] = [[] for _ in range(last_logits.shape[0])]
    done = [False] * len(out)
    token = last_logits.argmax(-1, keepdim=True)  # (B, 1)
    for _ in range(max_new_tokens):
        for b, t in enumerate(token[:, 0].tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = t in stop_ids or len(out[b]) == max_new_tokens
        if all(done):
            break
        token = step(model, token, cache).argmax(-1, keepdim=True)
    return out


# -----------------------------------------------------------------------------
# Command line: python model.py --chat --prompt "What is the capital of France?"


def main() -> None:
    import checkpoint as CK  # the model on disk (checkpoint.py imports this file)

    p = argparse.ArgumentParser(description="Greedy generation with the from-scratch model.")
    p.add_argument("--prompt", required=True)
    p.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat format")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="decode with torch.compile (needs a C++ compiler; "
                   "compiling takes ~1-2 min; with 2+ threads the eager step measured faster, bench.py)")
    args = p.parse_args()
    if args.max_new_tokens < 0:
        p.error(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    model_dir = args.model or CK.default_model_dir()
    cfg, tokenizer = CK.load_config(model_dir), CK.load_tokenizer(model_dir)
    text = CK.chat_prompt(tokenizer, args.prompt) if args.chat else args.prompt
    prompt = tokenizer.encode(text, add_special_tokens=False).ids
    # checked before the weights load: an empty prompt has no last position to predict from,
    # and positions past max_seq_len were never trained (RoPE would extrapolate silently)
    if not prompt:
        p.error("--prompt is empty: it encodes to zero tokens")
    if len(prompt) + args.max_new_tokens > cfg.max_seq_len:
        p.error(f"the prompt ({len(prompt)} tokens) plus --max-new-tokens {args.max_new_tokens} exceeds "
                f"the model's context window of {cfg.max_seq_len} tokens ({Path(model_dir) / 'config.json'})")
    model = CK.load_model(model_dir, args.device, getattr(torch, args.dtype))
    ids = torch.tensor([prompt], device=args.device)
    t0 = time.perf_counter()
    logits, cache = prefill(model, ids)
    prefill_seconds = time.perf_counter() - t0
    step = decode_one_token
    if args.compile:  # compiled on a copy of the cache, so the decode rate below is decoding alone
        model.rope(0, ids.shape[1] + args.max_new_tokens)  # RoPE tables that never grow: no recompiles
        step, t0 = compiled_decode_one_token(), time.perf_counter()
        step(model, logits.argmax(-1, keepdim=True), cache.clone())
        print(f"[decode step compiled in {time.perf_counter() - t0:.0f} s]")
    stops = CK.stop_token_ids(model_dir, tokenizer)
    t0 = time.perf_counter()
    out = generate(model, cache, logits, args.max_new_tokens, stops, step)
    decode_seconds = time.perf_counter() - t0
    print(tokenizer.decode([t for t in out if t not in stops]))
    print(f"\n[{ids.shape[1]} prompt tokens: {ids.shape[1] / prefill_seconds:.0f} tok/s prefill; "
          f"{len(out)} new tokens: {len(out) / decode_seconds:.1f} tok/s decode]")


if __name__ == "__main__":
    main()
