"""lora.py: rs-LoRA injection, the `disabled` reference switch, merge, and PEFT parity."""
import json

import peft  # test extras: the external references for parity, never used by lora.py
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import lora
import model_qwen2
from errors import UserError

R, ALPHA = 4, 8


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny transformers Qwen2 with biases and norm weights moved off 0 and 1."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    model.save_pretrained(path)
    return path


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def randomize_adapters(model, seed=0):
    """Non-zero B (and A) so that the adapter path is actually tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            for w in (layer.lora_A.weight, layer.lora_B.weight):
                w.copy_(torch.randn(w.shape, generator=gen) * 0.1)


def adapted_model(hf_dir, r=R, alpha=ALPHA, **kwargs):
    model = model_qwen2.load_model(hf_dir)
    lora.inject(model, r=r, alpha=alpha, **kwargs)
    randomize_adapters(model)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fresh_adapter_changes_nothing_and_is_rslora(hf_dir, ids):
    base = model_qwen2.load_model(hf_dir)
    expected = base(ids)
    assert lora.inject(base, r=R, alpha=ALPHA) > 0
    layer = base.model.layers[0].self_attn.q_proj
    assert layer.scale == ALPHA / R ** 0.5 and layer.lora_A.weight.abs().sum() > 0
    assert torch.equal(base(ids), expected)
    classic = model_qwen2.load_model(hf_dir)
    lora.inject(classic, r=R, alpha=ALPHA, use_rslora=False)
    assert classic.lm_head.__class__ is torch.nn.Linear  # not a target
    assert classic.model.layers[1].mlp.down_proj.scale == ALPHA / R


def test_our_adapter_loads_in_peft(hf_dir, ids, tmp_path):
    model = adapted_model(hf_dir)
    with torch.no_grad():
        ours = model(ids)
    lora.save_adapter(model, tmp_path, base_model_name=str(hf_dir))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"], config["use_rslora"],
            config["lora_dropout"], config["base_model_name_or_path"]) == ("LORA", "CAUSAL_LM", R, ALPHA, True, 0.0, str(hf_dir))
    assert sorted(config["target_modules"]) == sorted(lora.QWEN2_TARGETS)
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight" in load_file(tmp_path / "adapter_model.safetensors")
    hf = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    torch.testing.assert_close(hf_logits(peft_model, ids), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_rslora", [True, False])
def test_peft_adapter_loads_here(hf_dir, ids, tmp_path, use_rslora):
    hf = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, use_rslora=use_rslora, target_modules=list(lora.QWEN2_TARGETS),
                             task_type="CAUSAL_LM", init_lora_weights=False)  # False: B is random, not zero
    peft_model = peft.get_peft_model(hf, config).eval()
    expected = hf_logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path)
    fresh = lora.load_adapter(model_qwen2.load_model(hf_dir), tmp_path)  # injects from the config
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), expected, atol=1e-5, rtol=0)
    injected = model_qwen2.load_model(hf_dir)  # resuming: adapters already there, scale from the file
    lora.inject(injected, r=R, alpha=1.0)
    lora.load_adapter(injected, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(injected(ids), expected, atol=1e-5, rtol=0)


def test_disabled_is_the_base_model_exactly(hf_dir, ids):
    base_logits = model_qwen2.load_model(hf_dir)(ids)
    model = adapted_model(hf_dir, dropout=0.1)
    model.train()  # dropout only on the LoRA path: the base path stays exact in train mode too
    with torch.no_grad():
        adapted = model.eval()(ids)
        assert not torch.equal(adapted, base_logits)
        with lora.disabled(model) as reference:
            assert torch.equal(reference.train()(ids), base_logits)
            with lora.disabled(model):
                assert torch.equal(model(ids), base_logits)
            assert torch.equal(model(ids), base_logits)  # still off after the inner block
        assert torch.equal(model.eval()(ids), adapted)
        with pytest.raises(KeyError):
            with lora.disabled(model):
                raise KeyError("boom")
        assert torch.equal(model(ids), adapted)  # restored on exceptions


def test_merge_unmerge_and_disabled_while_merged(hf_dir, ids):
    model = adapted_model(hf_dir)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        adapted, base_logits = model(ids), None
        with lora.disabled(model):
            base_logits = model(ids)
        lora.merge(model)
        lora.merge(model)  # idempotent, not merged twice
        torch.testing.assert_close(model(ids), adapted, atol=1e-5, rtol=0)
        with lora.disabled(model):
            torch.testing.assert_close(model(ids), base_logits, atol=1e-5, rtol=0)
            with pytest.raises(RuntimeError, match="disabled"):
                lora.merge(model)
        torch.testing.assert_close(model(ids), adapted, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="unmerge"):
        model.train()(ids)
    lora.unmerge(model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, weights[name], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), adapted, atol=1e-6, rtol=0)


def test_training_step_touches_only_lora(hf_dir, ids):
    model = model_qwen2.load_model(hf_dir).train()
    lora.inject(model, r=R, alpha=ALPHA)
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    before = {n: p.clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    layers = lora.lora_layers(model)
    assert len(layers) == 2 * 7

    def backward():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()

    backward()  # B = 0, so only B gets a gradient on the first step: that is LoRA's design
    assert all(layer.lora_B.weight.grad.abs().sum() > 0 for layer in layers.values())
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (name not in names), name
    backward()  # now B != 0 and the gradient reaches A as well
    for path, layer in layers.items():
        assert layer.lora_A.weight.grad.abs().sum() > 0, path
        assert layer.lora_B.weight.grad.abs().sum() > 0, path


def test_fp32_adapters_on_bf16_base(hf_dir, ids):
    model = model_qwen2.load_model(hf_dir, dtype=torch.bfloat16)
    lora.inject(model, r=R, alpha=ALPHA, dtype=torch.float32)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    assert model(ids).dtype == torch.bfloat16


def test_trainable_count_for_qwen25_7b_on_meta():
    config = model_qwen2.Qwen2Config()
    with torch.device("meta"):
        model = model_qwen2.Qwen2(config)
    count = lora.inject(model, r=32, alpha=64)
    H, I, KV = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    Q = config.num_attention_heads * config.head_dim
    # Each adapted (in -> out) layer adds r * (in + out) parameters.
    per_layer = 32 * ((H + Q) + (H + KV) * 2 + (Q + H) + (H + I) * 2 + (I + H))
    assert count == per_layer * config.num_hidden_layers == 80_740_352
    assert all(p.is_meta for p in model.parameters())


def assert_one_line(err, *fragments):
    message = str(err.value)
    assert "\n" not in message and err.value.__cause__ is None, message
    for fragment in fragments:
        assert fragment in message, message


def test_bad_input_is_one_clear_line(hf_dir, tmp_path):
    with pytest.raises(UserError) as err:
        lora.inject(model_qwen2.load_model(hf_dir), targets=("q_proj", "qkv_proj"))
    assert_one_line(err, "qkv_proj", "q_proj")
    with pytest.raises(UserError) as err:
        lora.inject(model_qwen2.load_model(hf_dir), targets=("mlp",))  # a module, but not a linear one
    assert_one_line(err, "'mlp'")

    saved = tmp_path / "r8"
    lora.save_adapter(adapted_model(hf_dir, r=8), saved, "tiny")
    with pytest.raises(UserError) as err:  # another rank
        lora.load_adapter(adapted_model(hf_dir, r=R), saved)
    assert_one_line(err, "adapter_config.json", "r=8", f"r={R}")

    weights = saved / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
    save_file({**tensors, key: torch.zeros(3, 8)}, weights)  # another shape
    with pytest.raises(UserError) as err:
        lora.load_adapter(model_qwen2.load_model(hf_dir), saved)
    assert_one_line(err, str(weights), key, "(3, 8)", "(32, 8)")

    save_file({k: v for k, v in tensors.items() if k != key}, weights)  # a missing key
    with pytest.raises(UserError) as err:
        lora.load_adapter(model_qwen2.load_model(hf_dir), saved)
    assert_one_line(err, str(weights), "missing", key)

    save_file({**tensors, "base_model.model.lm_head.lora_A.weight": torch.zeros(8, 64)}, weights)
    with pytest.raises(UserError) as err:
        lora.load_adapter(model_qwen2.load_model(hf_dir), saved)
    assert_one_line(err, "unexpected", "lm_head")

    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError) as err:
        lora.load_adapter(model_qwen2.load_model(hf_dir), saved)
    assert_one_line(err, str(weights), "cannot read")

    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(UserError) as err:
        lora.load_adapter(model_qwen2.load_model(hf_dir), saved)
    assert_one_line(err, "use_dora")
    with pytest.raises(UserError) as err:
        lora.load_adapter(model_qwen2.load_model(hf_dir), tmp_path / "nowhere")
    assert_one_line(err, "nowhere")
