"""model.py against transformers on tiny random configs, plus the cache semantics and bad input."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint as CK
import model as M

rope_cos_sin = M.rope_cos_sin  # the original, for tests that count its calls

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def tiny_hf(kind: str, tmp_path: Path):
    """A random tiny HF model of one family, saved as a checkpoint folder."""
    torch.manual_seed(0)
    if kind == "llama31":  # Llama-3.1 RoPE scaling, untied embeddings, rope_theta like the real one
        cfg = transformers.LlamaConfig(**TINY, rope_scaling=LLAMA3_SCALING | {"rope_theta": 500000.0},
                                       rope_theta=500000.0, tie_word_embeddings=False)
        hf = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":  # q/k/v biases
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, tie_word_embeddings=True))
        with torch.no_grad():  # random init leaves biases at zero: make them matter
            for layer in hf.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_()
    elif kind == "qwen3":  # per-head q/k RMSNorm, head_dim not tied to hidden size
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY, head_dim=24, tie_word_embeddings=True))
        with torch.no_grad():
            for layer in hf.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    else:
        raise ValueError(kind)
    hf.eval().save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("kind", ["llama31", "qwen2", "qwen3"])
def test_logits_match_transformers(kind, tmp_path):
    hf = tiny_hf(kind, tmp_path)
    ours = CK.load_model(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 300))  # 300 > original context 64: exercises llama3 scaling
    with torch.no_grad():
        expected = hf(ids).logits
    got = M.forward(ours, ids, M.KVCache(ours.cfg.n_layers))
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", ["llama31", "qwen3"])
def test_greedy_generation_matches_transformers(kind, tmp_path):
    hf = tiny_hf(kind, tmp_path)
    ours = CK.load_model(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (1, 40))
    expected = hf.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 40:].tolist()
    logits, cache = M.prefill(ours, ids, chunk_size=16)
    assert M.generate(ours, cache, logits, 20) == expected


def test_prefill_then_decode_equals_one_forward(tmp_path):
    tiny_hf("qwen3", tmp_path)
    ours = CK.load_model(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (1, 57))
    full = M.forward(ours, ids, M.KVCache(ours.cfg.n_layers))  # (1, 57, V)
    logits, cache = M.prefill(ours, ids[:, :50], chunk_size=16)
    assert torch.allclose(logits, full[:, 49], atol=1e-5)
    for t in range(50, 57):
        step = M.decode_one_token(ours, ids[:, t : t + 1], cache)
        assert torch.allclose(step, full[:, t], atol=1e-5)
    assert cache.next_pos == 57 and cache.lengths == [57] * 3


def test_last_only_equals_the_last_row_of_a_full_forward(tmp_path):
    """last_only runs the last block for the last position alone; its logits and the cache it
    leaves equal a full forward's: on an empty cache, N tokens on top of a cache, and a padded batch."""
    tiny_hf("qwen2", tmp_path)
    ours = CK.load_model(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (1, 60))
    _, cache = M.prefill(ours, ids[:, :40])
    short = cache.clone()
    for layer in range(3):  # a compressed cache: layers of different lengths
        short.set_layer(layer, cache.keys(layer)[:, :, -10 * (layer + 1):], cache.values(layer)[:, :, -10 * (layer + 1):])
    cases = [(lambda: M.KVCache(3), ids), (cache.clone, ids[:, 40:]), (short.clone, ids[:, 40:]),
             (lambda: M.stack_caches([cache, short]), ids[:, 40:].expand(2, -1))]  # the batch: padded slots
    for make, tokens in cases:
        a, b = make(), make()
        full = M.forward(ours, tokens, a)[:, -1]
        last = M.forward(ours, tokens, b, last_only=True)
        assert torch.allclose(last, full, atol=1e-5)
        assert a.lengths == b.lengths and all(torch.equal(a.keys(l), b.keys(l)) for l in range(3))
    rows = []  # what the last MLP computed: one position with last_only, every position without
    ours.layers[-1].mlp.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[1]))
    M.forward(ours, ids, M.KVCache(3), last_only=True)
    M.forward(ours, ids, M.KVCache(3))
    assert rows == [1, 60]


def test_chunked_prefill_equals_unchunked(tmp_path):
    tiny_hf("llama31", tmp_path)
    ours = CK.load_model(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (1, 100))
    one, cache_one = M.prefill(ours, ids, chunk_size=1000)
    many, cache_many = M.prefill(ours, ids, chunk_size=7)
    assert torch.allclose(one, many, atol=1e-5)
    for layer in range(3):
        assert torch.allclose(cache_one.keys(layer), cache_many.keys(layer), atol=1e-5)


def test_observe_sees_post_rope_chunk_queries_and_all_keys(tmp_path):
    tiny_hf("qwen2", tmp_path)
    ours = CK.load_model(tmp_path)
    seen = []
    M.prefill(ours, torch.randint(0, 97, (1, 20)), chunk_size=8,
              observe=lambda layer, q, k_all: seen.append((layer, q.shape[2], k_all.shape[2])))
    assert [s for s in seen if s[0] == 0] == [(0, 8, 8), (0, 8, 16), (0, 4, 20)]
    assert len(seen) == 3 * 3


def test_positions_continue_from_prompt_length_after_eviction(tmp_path):
    """Dropping cache entries must not shift the position of the tokens that follow."""
    tiny_hf("llama31", tmp_path)
    ours = CK.load_model(tmp_path)
    ids = torch.randint(0, 97, (1, 30))
    _, cache = M.prefill(ours, ids)
    for layer in range(3):  # evict the first 10 tokens in every layer
        cache.set_layer(layer, cache.keys(layer)[:, :, 10:], cache.values(layer)[:, :, 10:])
    wrong = cache.clone()
    wrong.next_pos = 20  # the bug this guards against: positions taken from the compressed length
    nxt = torch.tensor([[5]])
    got = M.decode_one_token(ours, nxt, cache)
    assert cache.next_pos == 31 and cache.lengths == [21] * 3
    assert not torch.allclose(M.decode_one_token(ours, nxt, wrong), got)
    # the new key is the plain projected key rotated by its true position, 30
    layer0 = ours.layers[0].self_attn
    x = ours.layers[0].input_layernorm(ours.embed_tokens(nxt))
    _, k, _ = layer0.qkv_proj(x).split(list(layer0.qkv_proj.parts.values()), dim=-1)  # the fused q, k, v
    plain = k.view(1, 1, 2, -1).transpose(1, 2)
    cos, sin = M.rope_cos_sin(ours.inv_freq, torch.tensor([30]))
    assert torch.allclose(cache.keys(0)[:, :, -1:], M.apply_rope(plain, cos, sin), atol=1e-6)


def test_clone_is_independent(tmp_path):
    tiny_hf("qwen2", tmp_path)
    ours = CK.load_model(tmp_path)
    _, cache = M.prefill(ours, torch.randint(0, 97, (1, 12)))
    copy = cache.clone()
    M.decode_one_token(ours, torch.tensor([[1]]), copy)
    assert cache.lengths == [12] * 3 and copy.lengths == [13] * 3
    assert torch.equal(cache.keys(2), copy.keys(2)[:, :, :12])


def test_compiled_decode_equals_eager(tmp_path):
    """The optional torch.compile'd decode step: the same logits as the eager reference, step after
    step while the cache grows (and its buffer doubles), and the same greedy tokens."""
    import shutil
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile needs a C++ compiler")
    tiny_hf("qwen2", tmp_path)
    ours = CK.load_model(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (1, 60))
    logits, cache = M.prefill(ours, ids)
    compiled, eager = M.compiled_decode_one_token(), cache.clone()
    for t in range(70):  # 60 + 70 tokens: past the cache's first capacity (120)
        token = torch.tensor([[t % TINY["vocab_size"]]])
        assert torch.allclose(compiled(ours, token, cache), M.decode_one_token(ours, token, eager), atol=1e-5)
    assert cache.lengths == eager.lengths == [130] * 3
    assert M.generate(ours, M.prefill(ours, ids)[1], logits, 30, step=compiled) == \
        M.generate(ours, M.prefill(ours, ids)[1], logits, 30)


def test_stacked_caches_decode_like_each_alone(tmp_path):
    """Caches with different per-layer lengths, stacked into one padded batch, generate exactly
    what each generates alone (the padding is masked out; capacity growth keeps the mask)."""
    tiny_hf("qwen2", tmp_path)
    ours = CK.load_model(tmp_path)
    torch.manual_seed(1)
    for p in ours.parameters():  # larger weights than HF's init: outputs that depend on the cache
        p.data.normal_(0, 0.3)
    logits, full = M.prefill(ours, torch.randint(0, 97, (1, 40)))
    caches = [full.clone()]
    for keep in ([30, 12, 25], [8, 40, 16], [20, 20, 20]):  # per layer: keep the last `keep` tokens
        c = full.clone()
        for layer, n in enumerate(keep):
            c.set_layer(layer, full.keys(layer)[:, :, -n:], full.values(layer)[:, :, -n:], room=2)
        caches.append(c)
    alone = [M.generate(ours, c.clone(), logits, 20) for c in caches]
    batch = M.stack_caches(caches, room=3)  # room < 20 new tokens: the buffers (and masks) must grow
    assert batch.lengths == [40, 40, 40] and batch.valid_slots(1)[0].all() and batch.valid_slots(1)[1, :12].all()
    assert not batch.valid_slots(1)[1, 12:].any()  # row 1 keeps 12 tokens in layer 1: the rest is padding
    together = M.generate_batch(ours, batch, logits.expand(len(caches), -1), 20)
    assert together == alone and len({tuple(t) for t in together}) > 1  # the plans really differ
    assert batch.lengths == [59] * 3 and batch.valid_slots(0)[:, 40:].all()
    # one decode step: same logits as the unbatched caches
    step = M.decode_one_token(ours, torch.tensor([[3]] * 4), M.stack_caches(caches))
    for b, c in enumerate(caches):
        assert torch.allclose(step[b], M.decode_one_token(ours, torch.tensor([[3]]), c.clone())[0], atol=1e-5)
    # a row that stops early keeps its own length
    first = together[1][2]
    assert M.generate_batch(ours, M.stack_caches(caches), logits.expand(4, -1), 20, stop_ids=[first])[1] == \
        M.generate(ours, caches[1].clone(), logits, 20, stop_ids=[first])


def test_fused_projections_load_and_save_under_the_checkpoint_names(tmp_path):
    """q/k/v and gate/up are concatenated once at load time; state_dict() splits them back, so a saved
    state_dict is a checkpoint (load_model reads it) and load_state_dict takes one back."""
    tiny_hf("qwen2", tmp_path / "hf")  # q/k/v biases are fused too
    ours = CK.load_model(tmp_path / "hf")
    ckpt = load_file(tmp_path / "hf" / "model.safetensors")
    attn = ours.layers[1].self_attn
    parts = ["model.layers.1.self_attn." + p for p in ("q_proj", "k_proj", "v_proj")]
    assert torch.equal(attn.qkv_proj.weight, torch.cat([ckpt[p + ".weight"] for p in parts]))
    assert torch.equal(attn.qkv_proj.bias, torch.cat([ckpt[p + ".bias"] for p in parts]))
    gate_up = torch.cat([ckpt[f"model.layers.1.mlp.{p}.weight"] for p in ("gate_proj", "up_proj")])
    assert torch.equal(ours.layers[1].mlp.gate_up_proj.weight, gate_up)
    assert ours.lm_head.weight is ours.embed_tokens.weight  # tied embeddings stay tied

    state = ours.state_dict()
    assert not [k for k in state if "qkv_proj" in k or "gate_up_proj" in k]
    assert {f"model.{k}" for k in state} == set(ckpt) | {"model.lm_head.weight"}
    for key, tensor in ckpt.items():
        assert torch.equal(state[key.removeprefix("model.")], tensor), key
    (tmp_path / "ours").mkdir()
    save_file({f"model.{k}": v.contiguous() for k, v in state.items() if k != "lm_head.weight"},
              tmp_path / "ours" / "model.safetensors")  # no shared storage between the split parts
    (tmp_path / "ours" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    again, fresh = CK.load_model(tmp_path / "ours"), M.Transformer(ours.cfg).eval()
    fresh.load_state_dict(state)  # strict: the hook joins the parts
    ids = torch.randint(0, 97, (1, 12))
    expected = M.forward(ours, ids, M.KVCache(3))
    assert torch.equal(M.forward(again, ids, M.KVCache(3)), expected)
    assert torch.allclose(M.forward(fresh, ids, M.KVCache(3)), expected, atol=1e-6)


def test_rope_tables_are_computed_once_and_grow_when_needed(tmp_path, monkeypatch):
    tiny_hf("llama31", tmp_path)
    ours = CK.load_model(tmp_path)
    ids = torch.randint(0, 97, (1, 30))
    full = M.forward(CK.load_model(tmp_path), ids, M.KVCache(3))  # another copy: ours has no tables yet
    calls = []
    monkeypatch.setattr(M, "rope_cos_sin", lambda *a: calls.append(1) or rope_cos_sin(*a))
    logits, cache = M.prefill(ours, ids[:, :10])
    assert len(calls) == 1 and ours.rope_cos.shape[0] == 20  # room for as many tokens again
    for t in range(10, 30):  # past position 19 the tables are recomputed, twice as long, once
        assert torch.allclose(M.decode_one_token(ours, ids[:, t : t + 1], cache), full[:, t], atol=1e-5)
    assert len(calls) == 2 and ours.rope_cos.shape[0] == 42  # twice the 21 positions needed then
    cos, sin = rope_cos_sin(ours.inv_freq, torch.arange(42))
    assert torch.equal(ours.rope_cos, cos) and torch.equal(ours.rope_sin, sin)


@pytest.mark.parametrize("rows", [1, 5, 64, 65])
def test_few_rows_are_split_across_threads_with_the_same_values(rows, monkeypatch):
    """A few rows: one bmm over column blocks of the weight (stored transposed, as load_model stores
    it), one block per thread. Many rows, an output size the threads do not divide, or a weight
    stored (out, in): nn.Linear's path. Both give nn.Linear's values."""
    bmm_calls, bmm = [], torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: bmm_calls.append(1) or bmm(*a))
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # 3 blocks, also on a machine with fewer cores
    try:
        torch.manual_seed(0)
        for n_out, bias, transposed in ((96, False, True), (96, True, True), (95, False, True), (96, False, False)):
            layer = M.Linear(48, n_out, bias=bias)
            if transposed:
                layer.weight.data = layer.weight.data.t().contiguous().t()
            x = torch.randn(1, rows, 48)
            bmm_calls.clear()
            got = layer(x)
            assert got.shape == (1, rows, n_out)
            assert torch.allclose(got, torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)
            assert len(bmm_calls) == (rows <= M.Linear.max_split_rows and n_out % 3 == 0 and transposed)
    finally:
        torch.set_num_threads(threads)


def test_long_prompt_mlp_in_pieces_is_exact(tmp_path, monkeypatch):
    tiny_hf("qwen3", tmp_path)
    ours = CK.load_model(tmp_path)
    ids = torch.randint(0, 97, (2, 50))
    whole = M.forward(ours, ids, M.KVCache(3))
    monkeypatch.setattr(M.MLP, "max_tokens", 7)  # 50 tokens: 8 pieces
    assert torch.allclose(M.forward(ours, ids, M.KVCache(3)), whole, atol=1e-6)


# --- bad input: clear errors that name the problem -------------------------------------------


def test_unknown_model_type(tmp_path):
    tiny_hf("qwen2", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        CK.load_model(tmp_path)


def test_unsupported_rope_scaling(tmp_path):
    tiny_hf("llama31", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        CK.load_model(tmp_path)


def test_missing_tensor(tmp_path):
    tiny_hf("qwen2", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor\(s\): layers.1.mlp.up_proj.weight"):
        CK.load_model(tmp_path)


def test_wrong_shape(tmp_path):
    tiny_hf("qwen2", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.2.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"layers.2.self_attn.k_proj.weight has shape \(3, 64\), expected \(32, 64\)"):
        CK.load_model(tmp_path)


def test_unexpected_tensor(tmp_path):
    tiny_hf("qwen2", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\): layers.0.extra.weight"):
        CK.load_model(tmp_path)


def test_missing_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json: not found"):
        CK.load_tokenizer(tmp_path)


def test_missing_weights(tmp_path):
    tiny_hf("qwen2", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        CK.load_model(tmp_path)


def test_sharded_checkpoint(tmp_path):
    hf = tiny_hf("qwen2", tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    a, b = CK.load_model(tmp_path / "one"), CK.load_model(tmp_path / "sharded")
    ids = torch.randint(0, 97, (1, 10))
    assert torch.equal(M.forward(a, ids, M.KVCache(3)), M.forward(b, ids, M.KVCache(3)))
