"""Bad input files stop with one line naming the file and the key or line (errors.UserError).

Every fixture here is a tiny checkpoint built with our own Qwen2 (no transformers import), so each
test runs in a fraction of a second.
"""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import lora
import model_qwen2 as mq
from errors import UserError

TINY = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=64,
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=1, torch_dtype="float32")


def one_line_error(call, *fragments) -> str:
    """The call raises UserError whose message is one line, holds every fragment, and chains nothing."""
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and info.value.__cause__ is None, message
    for fragment in fragments:
        assert str(fragment) in message, message
    return message


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A random tiny Qwen2 checkpoint (config.json + model.safetensors) and a saved adapter beside it."""
    torch.manual_seed(0)
    model = mq.Qwen2(mq.Qwen2Config.from_dict(TINY))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    d = tmp_path_factory.mktemp("tiny")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(TINY))
    lora.inject(model, r=2, alpha=4)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn_like(layer.lora_B.weight))
    lora.save_adapter(model, d / "adapter", "tiny")
    return d


@pytest.fixture
def model_dir(tiny_dir, tmp_path) -> Path:
    return copy_dir(tiny_dir, tmp_path / "model")


@pytest.fixture
def adapter_dir(tiny_dir, tmp_path) -> Path:
    return copy_dir(tiny_dir / "adapter", tmp_path / "adapter")


def write_config(model_dir: Path, **changes) -> Path:
    path = model_dir / "config.json"
    path.write_text(json.dumps({**TINY, **changes}))
    return path


def test_tiny_fixture_loads(model_dir, adapter_dir):
    model = lora.load_adapter(mq.load_model(model_dir), adapter_dir)
    assert len(lora.lora_layers(model)) == 7


# ---------------------------------------------------------------------------- 1. training data


def test_non_utf8_jsonl_names_the_line(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]})
    path = tmp_path / "train.jsonl"
    # Enough good lines that the bad byte sits far past the first read buffer.
    path.write_bytes(("\n".join([good] * 400) + "\n").encode() + b'{"messages": "caf\xe9"}\n' + good.encode())
    message = one_line_error(lambda: data.load_chat_jsonl(path), f"{path}:401", "UTF-8")
    assert "position" not in message


def test_non_utf8_cached_download_names_the_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PHASEGUARD_CACHE", str(tmp_path / "cache"))
    url = "https://example.invalid/data/train.jsonl"
    cached = data.cached_path(url)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b'\n\n{"messages": [\xff]}\n')
    one_line_error(lambda: data.security_split(url), f"{cached}:3", "UTF-8")


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "train.jsonl"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(row).encode() + b"\r\n")
    assert data.load_chat_jsonl(path) == [row]


def test_non_utf8_questions_yaml_names_the_line(tmp_path):
    path = tmp_path / "questions.yaml"
    path.write_bytes(b"- id: a\n  paraphrases:\n  - caf\xe9\n")
    one_line_error(lambda: data.load_em_questions(path), f"{path}:3", "UTF-8")


# ---------------------------------------------------------------------------- 2. config.json


@pytest.mark.parametrize("key,value", [
    ("hidden_size", "64"),
    ("num_hidden_layers", 2.5),
    ("vocab_size", -5),
    ("num_key_value_heads", 0),
    ("num_attention_heads", 0),
    ("intermediate_size", True),
    ("num_hidden_layers", False),
    ("max_position_embeddings", "long"),
    ("head_dim", -8),
    ("rms_norm_eps", "1e-6"),
    ("rms_norm_eps", -1.0),
    ("rope_theta", 0),
    ("rope_theta", True),
    ("tie_word_embeddings", "false"),
    ("eos_token_id", "2"),
    ("eos_token_id", []),
    ("bos_token_id", -1),
    ("rope_parameters", "default"),
])
def test_config_bad_value_names_file_and_key(model_dir, key, value):
    path = write_config(model_dir, **{key: value})
    one_line_error(lambda: mq.load_model(model_dir), path, key)


def test_config_nan_from_json(model_dir):
    path = model_dir / "config.json"
    path.write_text(json.dumps({**TINY, "rope_theta": math.nan}))  # json writes NaN, json.loads accepts it
    one_line_error(lambda: mq.load_model(model_dir), path, "rope_theta")


@pytest.mark.parametrize("changes,fragment", [
    (dict(num_hidden_layers=1_000_000), "num_hidden_layers=1000000 is more than 1024"),
    (dict(vocab_size=10**9, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8), "parameters, more than 1e+12"),
])
def test_config_sizes_are_bounded_before_any_layer_is_built(model_dir, monkeypatch, changes, fragment):
    path = write_config(model_dir, **changes)
    monkeypatch.setattr(mq, "Qwen2", lambda *a: pytest.fail("a layer was built before the size check"))
    one_line_error(lambda: mq.load_model(model_dir), path, fragment)


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_is_transformers_count(tied):
    """The count the size check uses, against transformers' own model of the same config."""
    transformers = pytest.importorskip("transformers")
    sizes = dict(TINY, num_hidden_layers=3, tie_word_embeddings=tied)
    with torch.device("meta"):
        theirs = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**sizes))
    assert mq.Qwen2Config.from_dict(sizes).parameter_count() == theirs.num_parameters()


def test_lora_rank_above_a_layers_smaller_side_is_refused_before_allocating(model_dir):
    model = mq.load_model(model_dir)
    one_line_error(lambda: lora.inject(model, r=10**6), "r=1000000", "k_proj", "use r <= 8")
    assert not lora.lora_layers(model)


def test_config_heads_not_divisible_by_kv_heads(model_dir):
    path = write_config(model_dir, num_attention_heads=4, num_key_value_heads=3)
    one_line_error(lambda: mq.load_model(model_dir), path, "num_attention_heads", "num_key_value_heads")


def test_config_hidden_not_divisible_by_heads(model_dir):
    path = write_config(model_dir, hidden_size=18, num_attention_heads=4, num_key_value_heads=2)
    one_line_error(lambda: mq.load_model(model_dir), path, "hidden_size", "num_attention_heads")


def test_config_odd_head_dim(model_dir):
    path = write_config(model_dir, hidden_size=18, num_attention_heads=2)  # head_dim 9: RoPE needs it even
    one_line_error(lambda: mq.load_model(model_dir), path, "head_dim")


def test_config_list_instead_of_object(model_dir):
    path = model_dir / "config.json"
    path.write_text(json.dumps([TINY]))
    one_line_error(lambda: mq.load_model(model_dir), path, "JSON object")


def test_config_not_utf8(model_dir):
    path = model_dir / "config.json"
    path.write_bytes(b'{"model_type": "qwen2\xff"}')
    one_line_error(lambda: mq.load_model(model_dir), path)


def test_config_from_dict_without_a_file_names_the_key():
    one_line_error(lambda: mq.Qwen2Config.from_dict({**TINY, "hidden_size": "64"}), "hidden_size")
    one_line_error(lambda: mq.Qwen2Config(**{**TINY, "num_key_value_heads": 0}), "num_key_value_heads")


def test_config_eos_list_and_explicit_head_dim_still_load(model_dir):
    write_config(model_dir, eos_token_id=[1, 2])
    assert mq.load_model(model_dir).config.eos_token_id == 1
    cfg = mq.Qwen2Config.from_dict({**TINY, "hidden_size": 18, "num_attention_heads": 2, "head_dim": 8})
    assert cfg.head_dim == 8


# ---------------------------------------------------------------------------- 3. shard index


def make_index(model_dir: Path, index) -> Path:
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00001.safetensors")
    path = model_dir / "model.safetensors.index.json"
    path.write_text(json.dumps(index))
    return path


@pytest.mark.parametrize("index,fragment", [
    ({"metadata": {}, "weight_map": ["model-00001-of-00001.safetensors"]}, "weight_map"),
    ({"metadata": {}}, "weight_map"),
    ({"weight_map": {"lm_head.weight": 5}}, "lm_head.weight"),
    ({"weight_map": {"lm_head.weight": None}}, "lm_head.weight"),
    ({"weight_map": {}}, "weight_map"),
    ([], "JSON object"),
])
def test_bad_shard_index(model_dir, index, fragment):
    path = make_index(model_dir, index)
    one_line_error(lambda: mq.load_model(model_dir), path, fragment)


def test_good_shard_index_loads(model_dir):
    names = list(load_file(model_dir / "model.safetensors"))
    make_index(model_dir, {"weight_map": {k: "model-00001-of-00001.safetensors" for k in names}})
    mq.load_model(model_dir)


# ---------------------------------------------------------------------------- 4. adapter_config.json


def write_adapter_config(adapter_dir: Path, **changes) -> Path:
    path = adapter_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return path


@pytest.mark.parametrize("key,value", [
    ("r", "8"),
    ("r", 0),
    ("r", -2),
    ("r", 2.0),
    ("r", True),
    ("lora_alpha", "abc"),
    ("lora_alpha", math.inf),
    ("lora_alpha", math.nan),
    ("lora_alpha", False),
    ("target_modules", 5),
    ("target_modules", ["q_proj", 5]),
    ("target_modules", []),
    ("target_modules", ["q_proj", "qkv_proj"]),
    ("use_rslora", "false"),
    ("lora_dropout", "0.1"),
    ("lora_dropout", 1.5),
    ("lora_alpha", 1e30),  # finite, but the update would overflow the activations (NaN logits)
])
def test_adapter_config_bad_field(model_dir, adapter_dir, key, value):
    path = write_adapter_config(adapter_dir, **{key: value})
    model = mq.load_model(model_dir)
    one_line_error(lambda: lora.load_adapter(model, adapter_dir), path, key)
    assert not lora.lora_layers(model)  # nothing injected


def test_adapter_config_list_instead_of_object(adapter_dir):
    path = adapter_dir / "adapter_config.json"
    path.write_text("[]")
    one_line_error(lambda: lora.read_adapter_config(adapter_dir), path, "JSON object")


def test_adapter_config_not_utf8(adapter_dir):
    path = adapter_dir / "adapter_config.json"
    path.write_bytes(b'{"peft_type": "LORA\xff"}')
    one_line_error(lambda: lora.read_adapter_config(adapter_dir), path)


# ---------------------------------------------------------------------------- 5. adapter tensors


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_adapter_tensor_not_finite(model_dir, adapter_dir, bad):
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    tensors[key][3, 1] = bad
    save_file(tensors, weights)
    model = mq.load_model(model_dir)
    one_line_error(lambda: lora.load_adapter(model, adapter_dir), weights, key)
    assert not lora.lora_layers(model)  # failed before injecting


def test_failed_load_leaves_a_fresh_model_without_adapters(model_dir, adapter_dir):
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
    save_file({**tensors, key: torch.zeros(3, 2)}, weights)  # wrong shape
    model = mq.load_model(model_dir)
    one_line_error(lambda: lora.load_adapter(model, adapter_dir), weights, key, "(3, 2)")
    assert not lora.lora_layers(model)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))


def test_failed_load_leaves_existing_adapters_untouched(model_dir, adapter_dir):
    model = mq.load_model(model_dir)
    lora.inject(model, r=2, alpha=4)
    before = {k: v.clone() for k, v in lora.adapter_state_dict(model).items()}
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[-1]  # copied last in key order: earlier tensors must not have been copied either
    tensors[key][0, 0] = math.nan
    save_file(tensors, weights)
    one_line_error(lambda: lora.load_adapter(model, adapter_dir), weights, key)
    after = lora.adapter_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(layer.alpha == 4 for layer in lora.lora_layers(model).values())


def test_adapter_tensor_integer_dtype(model_dir, adapter_dir):
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, weights)
    one_line_error(lambda: lora.load_adapter(mq.load_model(model_dir), adapter_dir), weights, key)


# ---------------------------------------------------------------------------- tokenizer files


def test_tokenizer_not_utf8_or_not_an_object(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_bytes(b'{"added_tokens": ["\xff"]}')
    one_line_error(lambda: mq.load_tokenizer(bad), bad)
    bad.write_text("[]")
    one_line_error(lambda: mq.load_tokenizer(bad, max_token_id=10), bad)


def test_tokenizer_without_qwen_specials_names_the_file(tmp_path):
    from tokenizers import Tokenizer, models
    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path))
    one_line_error(lambda: mq.load_tokenizer(path), path, "<|im_start|>")
