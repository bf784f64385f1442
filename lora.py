"""rs-LoRA for `model_qwen2.Qwen2`: adapters on frozen linear layers, a switch that turns
them off (the reference model pi_theta0 for free), merge/unmerge, and PEFT's file format.

Parameter names follow PEFT's: the adapter of `model.layers.0.mlp.down_proj` holds
`model.layers.0.mlp.down_proj.lora_A.weight` and `.lora_B.weight`, stored in
`adapter_model.safetensors` under `base_model.model.<that name>`. The base weight stays at
`<module>.weight`, so base checkpoint names are unchanged by injection.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError, is_finite_number, is_int, json_type, read_json_object

QWEN2_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
WEIGHTS_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
# The largest lora_alpha accepted. Used values run from 8 to a few hundred; at alpha 1e6 (r = 1) the
# update is scaled a million times, and larger values overflow fp32 activations within a few layers
# (1e30 gave NaN logits and a traceback in sampling).
MAX_ALPHA = 1e6
MAX_ALPHA_WHY = "larger scales overflow the activations"


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """rs-LoRA's alpha / sqrt(r) keeps the update's size steady as r grows; classic LoRA: alpha / r."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    """y = x W^T + b + B(A(dropout(x))) * scale, with W and b frozen.

    scale = lora_scale(alpha, r, use_rslora). A is kaiming-uniform (a = sqrt(5)) and B
    zero, as in PEFT, so a fresh adapter changes nothing.
    `disabled` skips the adapter (the base model, exactly); `merged` means B A * scale
    has been added into W and the adapter path must not run again.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = True, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        # The same Parameter objects as the wrapped layer: no copy, tying preserved.
        self.weight, self.bias = base.weight, base.bias
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scale = lora_scale(alpha, r, use_rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Adapter dtype defaults to the base weight's; fp32 adapters on a bf16 base keep
        # small updates from being rounded away.
        factory = dict(device=base.weight.device, dtype=dtype or base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.disabled = False
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.disabled or self.merged:
            if self.merged and self.training and torch.is_grad_enabled():
                raise RuntimeError("LoRA adapters are merged: unmerge(model) before training")
            return out
        x = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmuls pick their dtype
            x = x.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(x)) * self.scale
        return out + update.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """B A * scale, computed in the adapter dtype and cast to the base weight's."""
        return ((self.lora_B.weight @ self.lora_A.weight) * self.scale).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, r={self.r}, alpha={self.alpha}, rslora={self.use_rslora}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Module path -> LoRALinear, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def target_linears(model: nn.Module, targets) -> list[tuple[str, nn.Linear]]:
    """(path, layer) of every nn.Linear whose own name is in `targets`; each target must name one."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    found = [(name, m) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets]
    linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    for target in targets:
        hits = [m for n, m in found if n.rsplit(".", 1)[-1] == target]
        if not hits or not all(isinstance(m, nn.Linear) for m in hits):
            raise UserError(f"unknown LoRA target '{target}': the model's linear layers are named "
                            f"{', '.join(linear_names)}")
    return found


def inject(model: nn.Module, r: int = 32, alpha: float = 64, dropout: float = 0.0,
           targets=QWEN2_TARGETS, use_rslora: bool = True, dtype: torch.dtype | None = None) -> int:
    """Wrap every nn.Linear whose own name is in `targets`, in place; freeze everything
    else. Returns the number of trainable parameters. Works on the meta device."""
    if lora_layers(model):
        raise UserError("the model already has LoRA adapters")
    if r < 1:
        raise UserError(f"LoRA rank must be >= 1, got r={r}")
    found = target_linears(model, targets)
    # Checked before anything is allocated: r x (in + out) per layer can exceed any memory, and B A
    # cannot have a rank above the layer's smaller side anyway.
    name, narrowest = min(found, key=lambda hit: min(hit[1].in_features, hit[1].out_features))
    if r > (side := min(narrowest.in_features, narrowest.out_features)):
        raise UserError(f"LoRA rank r={r} exceeds {name}'s smaller side "
                        f"({narrowest.in_features} x {narrowest.out_features}): use r <= {side}")
    model.requires_grad_(False)
    for name, base in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(base, r, alpha, dropout, use_rslora, dtype))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Within this block the model computes the base model pi_theta0 exactly: each adapter
    is skipped by a flag, nothing is copied. Nested blocks and exceptions restore each
    layer's previous state. A merged layer is unmerged for the block and merged again on
    exit (the base is then exact only to rounding, as unmerge is). Run the reference under
    torch.no_grad(): a backward after the block (activation checkpointing recomputes the
    forward then) would see the adapters switched back on."""
    layers = list(lora_layers(model).values())
    saved = [(layer.disabled, layer.merged) for layer in layers]
    try:
        for layer in layers:
            _set_merged(layer, False)
            layer.disabled = True
        yield model
    finally:
        for layer, (was_disabled, was_merged) in zip(layers, saved):
            layer.disabled = was_disabled
            _set_merged(layer, was_merged)


@torch.no_grad()
def _set_merged(layer: LoRALinear, merged: bool):
    """Add (merge) or subtract (unmerge) B A * scale in the base weight, in place."""
    if layer.merged != merged:
        layer.weight.add_(layer.delta_weight(), alpha=1 if merged else -1)
        layer.merged = merged


def merge(model: nn.Module):
    """Add B A * scale into each base weight for fast sampling (no adapter matmuls).
    Merging twice is a no-op. Not allowed inside `disabled`: the reference would change."""
    layers = lora_layers(model).values()
    if any(layer.disabled for layer in layers):
        raise RuntimeError("merge() inside lora.disabled(model): the base weights must stay the reference")
    for layer in layers:
        _set_merged(layer, True)


def unmerge(model: nn.Module):
    """Subtract what `merge` added: the base weights come back up to rounding in their dtype."""
    for layer in lora_layers(model).values():
        _set_merged(layer, False)


# ----------------------------------------------------------------------------
# PEFT's file format: the one place that knows its key names and config fields.


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's key names (detached views, not copies)."""
    return {f"{PEFT_PREFIX}{path}.lora_{ab}.weight": getattr(layer, f"lora_{ab}").weight.detach()
            for path, layer in lora_layers(model).items() for ab in "AB"}


def check_adapter_tensors(expected: dict[str, tuple], tensors: dict[str, torch.Tensor], source: str):
    """Every expected key present, none other, each of the expected shape, floating point and finite."""
    for key in expected:
        if key not in tensors:
            raise UserError(f"{source}: missing adapter tensor '{key}'")
    for key, tensor in tensors.items():
        if key not in expected:
            raise UserError(f"{source}: unexpected tensor '{key}' (no such LoRA layer in the model)")
        if tuple(tensor.shape) != tuple(expected[key]):
            raise UserError(f"{source}: tensor '{key}' has shape {tuple(tensor.shape)}, "
                            f"the model's adapter has {tuple(expected[key])}")
        if not tensor.is_floating_point():
            raise UserError(f"{source}: tensor '{key}' has dtype {tensor.dtype}, expected floating point")
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int(finite.numel() - finite.sum())
            raise UserError(f"{source}: tensor '{key}' holds {bad} NaN or infinite value(s)")


def _copy_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]):
    layers = lora_layers(model)
    with torch.no_grad():
        for key, tensor in tensors.items():
            path, ab = key[len(PEFT_PREFIX):].rsplit(".", 2)[:2]
            getattr(layers[path], ab).weight.copy_(tensor)  # casts to the adapter's dtype


def _refuse_merged(model: nn.Module, source: str):
    if any(layer.merged for layer in lora_layers(model).values()):
        raise UserError(f"{source}: cannot load into a merged model, unmerge(model) first")


def peft_config(model: nn.Module, base_model_name: str | None) -> dict:
    layers = list(lora_layers(model).values())
    if not layers:
        raise UserError("the model has no LoRA adapters to save")
    first = layers[0]
    if any((l.r, l.alpha, l.use_rslora) != (first.r, first.alpha, first.use_rslora) for l in layers):
        raise UserError("adapters differ in r, alpha or rs-LoRA: PEFT's format needs one setting")
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
        "r": first.r, "lora_alpha": first.alpha, "use_rslora": first.use_rslora, "lora_dropout": dropout,
        "target_modules": sorted({p.rsplit(".", 1)[-1] for p in lora_layers(model)}),
        "bias": "none", "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True,
    }


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name: str | None = None) -> Path:
    """Write adapter_model.safetensors and adapter_config.json that PEFT and vLLM load."""
    from safetensors.torch import save_file
    directory = Path(directory)
    config = peft_config(model, base_model_name)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    # Write beside, then rename: a run killed mid-save never leaves a truncated file.
    save_file(tensors, str(directory / f"{WEIGHTS_FILE}.tmp"), metadata={"format": "pt"})
    (directory / f"{CONFIG_FILE}.tmp").write_text(json.dumps(config, indent=2) + "\n")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        os.replace(directory / f"{name}.tmp", directory / name)
    return directory


# Settings of PEFT's LoraConfig this loader cannot honour, with the value that is harmless.
UNSUPPORTED = {"use_dora": False, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
               "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False}


def read_adapter_config(directory: Path) -> dict:
    """adapter_config.json with r, lora_alpha, target_modules (a list), use_rslora and lora_dropout
    checked; each bad field is one error naming the file and the key."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{path}: no such file (a PEFT adapter directory needs one)")
    config = read_json_object(path)
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type is {config.get('peft_type')!r}, only 'LORA' is supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise UserError(f"{path}: missing '{key}'")
    for key, harmless in UNSUPPORTED.items():
        if config.get(key, harmless) not in (harmless, None, [], {}, False):
            raise UserError(f"{path}: {key}={config[key]!r} is not supported")
    r, alpha = config["r"], config["lora_alpha"]
    if not is_int(r) or r < 1:
        raise UserError(f"{path}: r must be a positive integer, got {r!r}")
    if not is_finite_number(alpha):
        raise UserError(f"{path}: lora_alpha must be a finite number, got {alpha!r}")
    if abs(alpha) > MAX_ALPHA:
        raise UserError(f"{path}: lora_alpha must be at most {MAX_ALPHA:g} in size ({MAX_ALPHA_WHY}), got {alpha!r}")
    rslora = config.get("use_rslora")
    if rslora is not None and not isinstance(rslora, bool):
        raise UserError(f"{path}: use_rslora must be true or false, got {rslora!r}")
    dropout = config.get("lora_dropout")
    if dropout is not None and not (is_finite_number(dropout) and 0 <= dropout < 1):
        raise UserError(f"{path}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    targets = config["target_modules"]
    if targets == "all-linear":  # PEFT's shorthand: every linear layer but the output head
        targets = list(QWEN2_TARGETS)
    elif isinstance(targets, str):
        raise UserError(f"{path}: target_modules={targets!r} is a regular expression; list the names instead")
    elif not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        got = f"{json_type(targets)} {targets!r}" if not isinstance(targets, list) else repr(targets)
        raise UserError(f"{path}: target_modules must be a non-empty list of module names, got {got[:120]}")
    return {**config, "target_modules": targets, "use_rslora": bool(rslora), "lora_dropout": dropout or 0.0}


def read_adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    if not path.is_file():
        raise UserError(f"{path}: no such file (only the safetensors format is read)")
    try:
        return load_file(str(path))
    except Exception as err:  # truncated or corrupt file
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise UserError(f"{path}: cannot read safetensors ({type(err).__name__}: {first_line})") from None


def load_adapter(model: nn.Module, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a PEFT LoRA adapter directory. A model without adapters gets them injected from
    adapter_config.json; a model with adapters (resuming a run) must have the file's rank, and
    takes the file's alpha. The config and every tensor (names, shapes, finite values) are
    checked before the model is touched: a failed load leaves it as it was."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: not a directory (expected a PEFT adapter directory)")
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    config = read_adapter_config(directory)
    tensors = read_adapter_weights(weights_path)
    rank, alpha, rslora = config["r"], config["lora_alpha"], config["use_rslora"]
    layers = lora_layers(model)
    if layers:
        if (model_rank := next(iter(layers.values())).r) != rank:
            raise UserError(f"{config_path}: adapter rank r={rank}, the model's adapters have r={model_rank}")
        _refuse_merged(model, str(weights_path))
        expected = {k: tuple(v.shape) for k, v in adapter_state_dict(model).items()}
    else:  # the shapes inject() would create, without injecting yet
        try:
            found = target_linears(model, config["target_modules"])
        except UserError as err:
            raise UserError(f"{config_path}: target_modules: {err}") from None
        expected = {}
        for path, linear in found:
            expected[f"{PEFT_PREFIX}{path}.lora_A.weight"] = (rank, linear.in_features)
            expected[f"{PEFT_PREFIX}{path}.lora_B.weight"] = (linear.out_features, rank)
    check_adapter_tensors(expected, tensors, str(weights_path))
    if not layers:
        inject(model, rank, alpha, config["lora_dropout"], config["target_modules"], rslora, dtype)
    _copy_adapter_tensors(model, tensors)
    for layer in lora_layers(model).values():  # the scale the adapter was trained with
        layer.alpha, layer.use_rslora, layer.scale = alpha, rslora, lora_scale(alpha, rank, rslora)
    return model
