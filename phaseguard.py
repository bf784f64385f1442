"""PhaseGuard-KL: the monitor (Eq. 2), the trigger, and the training loop (Eq. 1).

    L = L_CE(theta_t; D) + lambda_t * KL(pi_theta_t || pi_theta_0)                  (Eq. 1)
    D_t = 1/|P| sum_p JS_k(pi_theta_t(.|p), pi_theta_0(.|p))                         (Eq. 2)

Methods: `none` (lambda_t = 0), `kl` (lambda_t = lambda from step 0), `phaseguard`
(lambda_t = lambda once the trigger has fired, 0 before). The reference pi_theta_0 is the
same model with its LoRA adapters switched off (`lora.disabled`), never a second copy.

Monitors (MONITORS, each `(model, canaries, reference) -> float`, a mean over the canaries):
`js` (Eq. 2, the default), `js-rest`, `kl` and `hidden` at the first decode position; `persona`
(drift of the residual stream at --persona-layer along a misaligned-persona direction) and
`js-answer` (Eq. 2's JS over the first --answer-tokens of the reference's own greedy answer). The
trigger reads the one chosen by `--monitor`; all six are logged at every monitoring step, for
every method, and once more after the last update.

Steps count completed optimizer updates. D_t is measured at t = 0, 5, 10, ... before
update t+1 (t = 0 is before training, where D_0 = 0 for a fresh adapter); the first 3
measurements are warm-up, so with D_t above tau from the start the trigger fires at
t = 20, the step the paper reports.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

import data
import kernels
import lora
import model_qwen2 as mq
import provenance
from config import MONITOR_NAMES, PRESETS, TrainConfig, resolve_config
from distributed import Dist
from errors import ArgumentParser, UserError
from rundir import (check_run_dir, latest_checkpoint, load_checkpoint, naming_errors, resume_hint, run_lock,
                    save_checkpoint, start_run_dir, truncate_metrics, write_atomic)

# ----------------------------------------------------------------------------
# The monitor (Eq. 2) and the trigger


def canary_batch(tokenizer, device):
    """The 24 canaries as left-padded chat prompts ending in the generation prompt, so the
    last column is the first decode position."""
    prompts = [tokenizer.encode_chat([{"role": "user", "content": c}], add_generation_prompt=True)[0]
               for c in data.CANARY_PROMPTS]
    return mq.left_pad(prompts, tokenizer.pad_id, device)


class FirstDecode(NamedTuple):
    """One forward over the canaries, read at the first decode position (the last column)."""
    hidden: torch.Tensor  # [24, H] the last layer's hidden state after the final RMSNorm: what feeds lm_head
    logits: torch.Tensor  # [24, V] fp32 next-token logits
    layer: torch.Tensor | None = None  # [24, H] fp32 residual stream at the persona layer, when one was asked


@torch.no_grad()
def first_decode(model, canaries, layer: int | None = None) -> FirstDecode:
    """The canaries' first-decode hidden states and logits from one forward (only that row goes
    through lm_head). model.hidden_states returns the final norm's output, so `hidden` is exactly
    the lm_head input. layer: also the residual stream there (residual_stream), same forward."""
    was_training = model.training
    model.eval()
    try:
        with residual_stream(model, layer) as captured:
            hidden = model.hidden_states(*canaries)[:, -1]
        return FirstDecode(hidden, model.lm_head(hidden).float(),
                           None if layer is None else captured[0][:, -1].float())
    finally:
        model.train(was_training)


def first_decode_logits(model, canaries) -> torch.Tensor:
    """[24, V] fp32 next-token logits at the first decode position."""
    return first_decode(model, canaries).logits


def reference_canary_logits(model, canaries) -> torch.Tensor:
    """[24, V] fp32: the reference's (adapters off) first-decode logits; it never changes."""
    with lora.disabled(model):
        return first_decode_logits(model, canaries)


def monitor_reference(model, canaries, k: int):
    """Before step 0: the reference's top-k ids and log-probabilities, kept for the whole run."""
    return kernels.reference_topk(reference_canary_logits(model, canaries), k)


class Reference(NamedTuple):
    """What every monitor compares against, computed once before training (the reference never changes)."""
    topk: tuple  # (ids [24, k] int64, log-probs [24, k] fp32): kernels.reference_topk, for the JS monitors
    logits: torch.Tensor  # [24, V] fp32 first-decode logits, for the KL monitor
    hidden: torch.Tensor  # [24, H] fp32 first-decode hidden states after the final norm, for the hidden monitor
    persona: "Persona | None" = None  # the persona direction and the reference's canary residuals, for persona
    answers: "Answers | None" = None  # the reference's greedy answers, teacher-forced, for js-answer


def reference_state(model, canaries, k: int, setup: "MonitorSetup | None" = None) -> Reference:
    """The reference (adapters off) at the canaries' first decode position: one forward. With a
    setup (what the loop passes), also the persona direction and the reference's own answers:
    without one, persona and js-answer are not measured (all_monitors leaves them out)."""
    with lora.disabled(model):
        out = first_decode(model, canaries, None if setup is None else setup.persona_layer)
        persona = None if setup is None else persona_reference(model, setup, out.layer)
        answers = None if setup is None else answer_reference(model, canaries, setup, k)
    return Reference(kernels.reference_topk(out.logits, k), out.logits, out.hidden.float(), persona, answers)


def d_t_of(logits, reference, variant: str = "renorm") -> float:
    """Eq. 2 from the canaries' first-decode logits: the mean (not the sum) over the canaries.
    reference: (ids, log-probs) from monitor_reference, or a Reference."""
    ref_ids, ref_logprobs = reference.topk if isinstance(reference, Reference) else reference
    return kernels.topk_js(logits, ref_ids, ref_logprobs, variant).mean().item()


def monitor(model, canaries, reference, variant: str = "renorm") -> float:
    """D_t (Eq. 2): mean truncated JS over the canaries, current model vs reference."""
    return d_t_of(first_decode_logits(model, canaries), reference, variant)


def canary_kl(logits, ref_logits) -> float:
    """Drift on the canaries for every method: the mean over canaries of the full-vocabulary
    KL(pi_theta || pi_theta0) at the first decode position (the quantity Eq. 1 penalises)."""
    return kernels.kl_div(logits, ref_logits).mean().item()


# The monitors, each a mean over the 24 canaries at the first decode position, policy vs reference.
# `*_of(out, reference)` computes one from a FirstDecode; `monitor_*(model, canaries, reference)`
# runs its own forward; all_monitors computes the four from one forward (what the loop does).


def js_of(out: FirstDecode, reference: Reference) -> float:
    """Eq. 2: top-k JS, both distributions renormalised on the reference's top-k ids."""
    return d_t_of(out.logits, reference.topk, "renorm")


def js_rest_of(out: FirstDecode, reference: Reference) -> float:
    """Top-k JS with the rest of the vocabulary as one more bin (kernels.topk_js variant rest)."""
    return d_t_of(out.logits, reference.topk, "rest")


def kl_of(out: FirstDecode, reference: Reference) -> float:
    """Full-vocabulary KL(pi_theta || pi_theta0) (canary_kl)."""
    return canary_kl(out.logits, reference.logits)


def hidden_of(out: FirstDecode, reference: Reference) -> float:
    """1 - cosine similarity of the last layer's hidden states after the final RMSNorm (the
    lm_head input), in float64: near 0 a float32 cosine would round 1 - cos to +-1e-7."""
    cos = torch.nn.functional.cosine_similarity(out.hidden.double(), reference.hidden.double(), dim=-1)
    return (1 - cos).mean().item()


FROM_FIRST_DECODE = {"js": js_of, "js-rest": js_rest_of, "kl": kl_of, "hidden": hidden_of}


# ---- persona and js-answer (issue 19): monitors that read more than the first decode position.
# persona: drift of the canaries' residual stream along a "misaligned persona" direction (after
# Chen et al. 2025, arXiv 2507.21509); js-answer: Eq. 2's top-k JS over the first m tokens of the
# reference's own greedy answer, teacher-forced. Both reference parts are computed once, adapters off.

PERSONA_FILE = Path(__file__).with_name("persona_prompts.json")
PERSONA_SHA256 = "bcbbb8466d266cec30140133df946aef926026f947784fd66bb8162f0ad461ec"  # the file as committed


class MonitorSetup(NamedTuple):
    """What the persona and js-answer references need besides the canaries (monitor_setup)."""
    persona_layer: int  # transformers' hidden_states index: 0 the embeddings, l the output of block l
    persona_prompts: tuple  # (misaligned, helpful): token ids of each neutral question under each system prompt
    prompts_sha256: str
    answer_tokens: int  # m: js-answer reads the first m positions of the reference's greedy answer
    pad_id: int
    stop_ids: list


class Persona(NamedTuple):
    layer: int
    direction: torch.Tensor  # [H] float64, unit length: mean(misaligned) - mean(helpful), normalised
    base: torch.Tensor  # [24, H] float64: the reference's canary residuals at the layer (first decode)
    norm: float  # the length of the mean difference before it was normalised
    prompts_sha256: str


class Answers(NamedTuple):
    batch: tuple  # (ids, mask) [24, T]: each canary, then the first answer tokens, left-padded
    rows: torch.Tensor  # [N] int64: the canary of each answer position read
    cols: torch.Tensor  # [N] int64: its column; the logits there predict the next answer token
    topk: tuple  # the reference's (ids [N, k], log-probs [N, k]) at those positions
    tokens: list  # the reference's greedy answers (at most m tokens, the stop token left out)


def load_persona_prompts(path: Path = PERSONA_FILE) -> tuple[dict, str]:
    """The persona prompt set and its sha256, refused (one line) unless it is the pinned file."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read the persona prompts ({err.strerror or err})") from None
    sha = hashlib.sha256(raw).hexdigest()
    if sha != PERSONA_SHA256:
        raise UserError(f"{path}: sha256 {sha} is not the pinned {PERSONA_SHA256} (the persona prompts changed)")
    return json.loads(raw), sha


def monitor_setup(cfg: TrainConfig, tokenizer, model) -> MonitorSetup:
    """The persona prompts as chat prompts (each question under each system prompt), the layer
    (default the middle one, num_hidden_layers // 2) checked against the model, m, and the stop ids."""
    layers = model.config.num_hidden_layers
    layer = layers // 2 if cfg.persona_layer is None else cfg.persona_layer
    if not 0 <= layer < layers:  # transformers' last entry is after the final norm: not the residual stream
        raise UserError(f"persona_layer={layer}: this model has {layers} layers (0 to {layers - 1})")
    prompts, sha = load_persona_prompts()

    def asked(system):
        return [tokenizer.encode_chat([{"role": "system", "content": prompts[system]}, {"role": "user", "content": q}],
                                      add_generation_prompt=True)[0] for q in prompts["questions"]]
    return MonitorSetup(layer, (asked("misaligned_system"), asked("helpful_system")), sha, cfg.answer_tokens,
                        tokenizer.pad_id, [tokenizer.im_end_id, tokenizer.eos_id])


@contextlib.contextmanager
def residual_stream(model, layer: int | None):
    """Collects the residual stream at `layer` (transformers' hidden_states[layer]: the embeddings
    for 0, else block `layer`'s output) of the forwards inside; nothing when layer is None."""
    captured: list = []
    if layer is None:
        yield captured
        return
    module = model.model.embed_tokens if layer == 0 else model.model.layers[layer - 1]
    handle = module.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        yield captured
    finally:
        handle.remove()


@torch.no_grad()
def last_token_residual(model, prompts: list, pad_id: int, layer: int) -> torch.Tensor:
    """[n, H] float64: the residual stream at `layer` at each prompt's last token (left-padded)."""
    was_training = model.training
    model.eval()
    try:
        with residual_stream(model, layer) as captured:
            model.hidden_states(*mq.left_pad(prompts, pad_id, model.lm_head.weight.device))
        return captured[0][:, -1].double()
    finally:
        model.train(was_training)


def persona_reference(model, setup: MonitorSetup, canary_layer: torch.Tensor) -> Persona:
    """Call with the adapters off: the unit direction from the two prompt sets' mean residuals
    (float64), and the reference's canary residuals it is read against."""
    misaligned, helpful = (last_token_residual(model, p, setup.pad_id, setup.persona_layer)
                           for p in setup.persona_prompts)
    difference = misaligned.mean(0) - helpful.mean(0)
    norm = float(difference.norm())
    if not norm > 0:
        raise UserError(f"persona_layer={setup.persona_layer}: the two persona prompt sets give the same mean "
                        "activation there (no direction); choose another layer")
    return Persona(setup.persona_layer, difference / norm, canary_layer.double(), norm, setup.prompts_sha256)


def answer_reference(model, canaries, setup: MonitorSetup, k: int) -> Answers:
    """Call with the adapters off: each canary's greedy answer (at most m tokens), and the batch
    that teacher-forces its first m positions: the prompt, then the answer less its last token
    (a stop token is predicted, never fed). A canary answered in n < m tokens has n + 1 positions."""
    ids, mask = canaries
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    m = setup.answer_tokens
    answers = mq.generate(model, prompts, max_new_tokens=m, stop_ids=setup.stop_ids, pad_id=setup.pad_id).ids
    positions = [min(m, len(a) + 1) for a in answers]
    forced = [p + a[:n - 1] for p, a, n in zip(prompts, answers, positions)]
    batch = mq.left_pad(forced, setup.pad_id, ids.device)
    width = batch[0].shape[1]
    rows = torch.tensor([c for c, n in enumerate(positions) for _ in range(n)], device=ids.device)
    cols = torch.tensor([width - n + j for n in positions for j in range(n)], device=ids.device)
    partial = Answers(batch, rows, cols, None, answers)
    return partial._replace(topk=kernels.reference_topk(answer_logits(model, partial), k))


@torch.no_grad()
def answer_logits(model, answers: Answers) -> torch.Tensor:
    """[N, V] fp32: the logits at the answer positions, one forward over the teacher-forced batch."""
    was_training = model.training
    model.eval()
    try:
        hidden = model.hidden_states(*answers.batch)[answers.rows, answers.cols]
        return model.lm_head(hidden).float()
    finally:
        model.train(was_training)


def persona_of(out: FirstDecode, reference: Reference) -> float:
    """The mean over the canaries of (h_t - h_0) . v at the persona layer, in float64."""
    persona = reference.persona
    return ((out.layer.double() - persona.base) @ persona.direction).mean().item()


def js_answer_of(logits: torch.Tensor, reference: Reference) -> float:
    """Eq. 2's top-k JS (renorm) at each answer position, averaged over each canary's positions,
    then over the canaries (each canary weighs the same, as in Eq. 2)."""
    answers = reference.answers
    per_position = kernels.topk_js(logits, *answers.topk, "renorm").double()
    n = len(answers.tokens)
    sums = torch.zeros(n, dtype=torch.float64, device=per_position.device).index_add_(0, answers.rows, per_position)
    return (sums / torch.bincount(answers.rows, minlength=n)).mean().item()


def monitor_record(reference: Reference, setup: MonitorSetup) -> dict:
    """What the run records of the persona direction and the reference's answers (monitor_reference.json)."""
    persona, answers = reference.persona, reference.answers
    direction = persona.direction.detach().cpu().numpy().astype("<f8")
    return {"persona": {"layer": persona.layer, "direction_sha256": hashlib.sha256(direction.tobytes()).hexdigest(),
                        "direction_sha256_of": "float64 little-endian bytes of the unit direction",
                        "norm_before_normalising": persona.norm, "prompts_file": PERSONA_FILE.name,
                        "prompts_sha256": persona.prompts_sha256},
            "js_answer": {"answer_tokens": setup.answer_tokens,
                          "positions_per_canary": torch.bincount(answers.rows).tolist(),
                          "reference_answers": answers.tokens}}


def monitor_js(model, canaries, reference: Reference) -> float:
    return js_of(first_decode(model, canaries), reference)


def monitor_js_rest(model, canaries, reference: Reference) -> float:
    return js_rest_of(first_decode(model, canaries), reference)


def monitor_kl(model, canaries, reference: Reference) -> float:
    return kl_of(first_decode(model, canaries), reference)


def monitor_hidden(model, canaries, reference: Reference) -> float:
    return hidden_of(first_decode(model, canaries), reference)


def monitor_persona(model, canaries, reference: Reference) -> float:
    return persona_of(first_decode(model, canaries, reference.persona.layer), reference)


def monitor_js_answer(model, canaries, reference: Reference) -> float:
    return js_answer_of(answer_logits(model, reference.answers), reference)  # the canaries are in the answer batch


MONITORS = {"js": monitor_js, "js-rest": monitor_js_rest, "kl": monitor_kl, "hidden": monitor_hidden,
            "persona": monitor_persona, "js-answer": monitor_js_answer}
assert tuple(MONITORS) == MONITOR_NAMES  # the names config.py checks --monitor against


def all_monitors(model, canaries, reference: Reference) -> dict[str, float]:
    """Every monitor the reference supports, in MONITORS' order: the first-decode four and persona
    from one forward over the canaries, js-answer from one over the teacher-forced answers."""
    out = first_decode(model, canaries, None if reference.persona is None else reference.persona.layer)
    values = {name: of(out, reference) for name, of in FROM_FIRST_DECODE.items()}
    if reference.persona is not None:
        values["persona"] = persona_of(out, reference)
    if reference.answers is not None:
        values["js-answer"] = js_answer_of(answer_logits(model, reference.answers), reference)
    return values


@dataclass
class Trigger:
    tau: float = 0.15
    warmup: int = 3  # measurements ignored at the start
    consecutive: int = 2  # measurements above tau in a row that fire it
    measurements: int = 0
    above_in_a_row: int = 0
    fired_at: int | None = None  # the step it fired at; latched for the rest of training

    @property
    def fired(self) -> bool:
        return self.fired_at is not None


def update_trigger(trigger: Trigger, d_t: float, step: int) -> Trigger:
    """Level-shift detector (Sec. 3.2): after the warm-up, fire when D_t > tau at
    `consecutive` monitoring points in a row; once fired it stays on."""
    trigger.measurements += 1
    if trigger.fired or trigger.measurements <= trigger.warmup:
        return trigger
    trigger.above_in_a_row = trigger.above_in_a_row + 1 if d_t > trigger.tau else 0
    if trigger.above_in_a_row >= trigger.consecutive:
        trigger.fired_at = step
    return trigger


def active_lambda(cfg: TrainConfig, trigger: Trigger) -> float:
    if cfg.method == "kl" or (cfg.method == "phaseguard" and trigger.fired):
        return cfg.lam
    return 0.0


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Linear warm-up (optional), then linear decay to 0 at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * max(0.0, (total_steps - step) / max(1, total_steps - cfg.warmup_steps))


# ----------------------------------------------------------------------------
# One optimizer step of Eq. 1 over micro-batches


def train_step(model, micro_batches, lam: float, kl_tokens: str, device, autocast, dist: "Dist | None" = None) -> dict:
    """Accumulate gradients of Eq. 1 over the micro-batches of one effective batch.
    CE is the mean over the batch's supervised tokens; KL the mean over its KL tokens.
    Data parallel (dist): each rank runs its share of the micro-batches with the normalisers of
    the whole effective batch, so the all-reduced (summed) gradient is the one-process gradient."""
    dist = dist or Dist()

    def kl_mask_of(mb):
        return mb["labels"] != kernels.IGNORE_INDEX if kl_tokens == "supervised" else mb["attention_mask"].bool()
    n_ce = sum(int((mb["labels"] != kernels.IGNORE_INDEX).sum()) for mb in micro_batches)
    n_kl = sum(int(kl_mask_of(mb).sum()) for mb in micro_batches)
    ce_sum = kl_sum = 0.0
    for mb in micro_batches[dist.rank::dist.world]:
        ids, mask = mb["input_ids"].to(device), mb["attention_mask"].to(device)
        with autocast():
            hidden = model.hidden_states(ids, mask)
            ref_hidden = None
            if lam > 0:
                with torch.no_grad(), lora.disabled(model):
                    ref_hidden = model.hidden_states(ids, mask)
        H = hidden.shape[-1]
        out = kernels.fused_linear_ce_kl(
            hidden.reshape(-1, H), None if ref_hidden is None else ref_hidden.reshape(-1, H),
            model.lm_head.weight, mb["labels"].to(device).reshape(-1), kl_mask_of(mb).to(device).reshape(-1),
            ce_weight=1.0 / max(1, n_ce), kl_weight=lam / max(1, n_kl))
        out.loss.backward()
        ce_sum += float(out.ce_sum)
        kl_sum += float(out.kl_sum)
    ce_sum, kl_sum = dist.sum_gradients_and([ce_sum, kl_sum], [p for p in model.parameters() if p.requires_grad])
    ce, kl = ce_sum / max(1, n_ce), (kl_sum / max(1, n_kl) if lam > 0 else None)
    tokens = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
    return {"ce": ce, "kl": kl, "loss": ce + lam * (kl or 0.0), "tokens": tokens, "supervised_tokens": n_ce}


# ----------------------------------------------------------------------------
# Model and data for a run


def build_tiny_model(cfg: TrainConfig, samples_text: list[str], directory: Path) -> tuple[Path, Path]:
    """Tiny preset: a BPE tokenizer trained in process on the training texts (with Qwen's
    chat special tokens) and a small random Qwen2, saved like a real checkpoint so the
    run goes through the same loading code as the 7B model."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    directory.mkdir(parents=True, exist_ok=True)
    sizes = dict(cfg.tiny_model)
    vocab = sizes.pop("vocab", 1024)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(samples_text + data.CANARY_PROMPTS, trainer)
    tok.save(str(directory / "tokenizer.json"))
    config = dict(sizes, vocab_size=tok.get_vocab_size(), tie_word_embeddings=True, rope_theta=10000.0,
                  rms_norm_eps=1e-6, max_position_embeddings=4096, torch_dtype="float32",
                  eos_token_id=tok.token_to_id("<|im_end|>"), bos_token_id=None)
    # Its own RNG stream: the build must not move the training RNG, or a run killed before its
    # first checkpoint (which reuses the built model) would resume to a different adapter.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = mq.Qwen2(mq.Qwen2Config.from_dict(config))
        for name, p in model.named_parameters():
            if p.dim() > 1:  # the tied embedding gets a wider init: a frozen 0.02 head could move logits ~1 nat at most
                torch.nn.init.normal_(p, std=0.25 if "embed_tokens" in name else 0.02)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory, directory / "tokenizer.json"


def load_run_model(cfg: TrainConfig, run: Path, resuming: bool = False, device: str | None = None, build: bool = True):
    """(model with rs-LoRA injected, tokenizer, task data). The tiny model is reused only by
    a run that has started (config.json written); a failed start's leftover is rebuilt.
    build=False: read the tiny model another rank has just built."""
    device = device or cfg.device
    if cfg.preset == "tiny" and cfg.model == "tiny" and (not build or resuming) and (run / "tiny_model" / "config.json").is_file():
        model_dir, tok_path = run / "tiny_model", run / "tiny_model" / "tokenizer.json"
    elif cfg.preset == "tiny" and cfg.model == "tiny":
        if cfg.task == "security":
            raw_train, _, _ = data.security_split(cfg.data)
        else:
            raw_train, _ = data.opswap_split(2)
        texts = [m["content"] for s in raw_train[:cfg.limit] for m in s["messages"]]
        with naming_errors(run / "tiny_model"):
            model_dir, tok_path = build_tiny_model(cfg, texts, run / "tiny_model")
    else:  # one snapshot: the weights, and the tokenizer unless another is named, at the same commit
        model_dir = mq.resolve_model_dir(cfg.model, revision=cfg.revision)
        tok_path = cfg.tokenizer or model_dir
    tokenizer = mq.load_tokenizer(tok_path)
    cuda = device.startswith("cuda")
    model = mq.load_model(model_dir, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    model.activation_checkpointing = cuda
    # fp32 adapters on a bf16 base: small updates are not rounded away.
    lora.inject(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, dtype=torch.float32)
    # The held-out splits are fixed (data.DATA_SEED): every training seed sees the same train set.
    task = data.load_task(cfg.task, tokenizer, path=cfg.data, max_len=cfg.max_len, limit=cfg.limit)
    return model, tokenizer, task


# ----------------------------------------------------------------------------
# The training loop


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """One run, top to bottom. Flags were checked by resolve_config; rank 0 then locks the run
    directory (a second training into it is refused before anything is written) for the run's
    whole life; the rest is train_locked."""
    dist = Dist()
    n_micro = cfg.batch_size // cfg.micro_batch_size
    if n_micro % dist.world:
        raise UserError(f"{dist.world} processes cannot share the {n_micro} micro-batches of an effective batch "
                        f"({cfg.batch_size} / {cfg.micro_batch_size}): use a process count that divides {n_micro}")
    with run_lock(Path(cfg.out)) if dist.main else contextlib.nullcontext():
        return train_locked(cfg, resume, dist)


def train_locked(cfg: TrainConfig, resume: bool, dist: Dist) -> Path:
    """Data, tokenizer and model are loaded and checked first; config.json is written only when
    training really starts, so a failed start leaves nothing that refuses the same command with
    the input fixed. Under torchrun, every rank runs this; rank 0 alone monitors and writes."""
    run = Path(cfg.out)
    resuming = check_run_dir(run, cfg, resume)
    device = dist.start(cfg.device)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the same on every rank: the same LoRA initialisation
    if dist.main:
        model, tokenizer, task = load_run_model(cfg, run, resuming, device)
    dist.barrier()  # rank 0 has built the tiny model (if any) before the others read it
    if not dist.main:
        model, tokenizer, task = load_run_model(cfg, run, resuming, device, build=False)
    if cfg.topk > model.config.vocab_size:
        raise UserError(f"topk={cfg.topk} is larger than the vocabulary ({model.config.vocab_size})")
    cuda = device.startswith("cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else (lambda: torch.autocast("cpu", enabled=False))

    # Effective batches (length-grouped), each split into micro-batches; 1 epoch in the paper.
    total_steps, step_batch = step_schedule([len(e["ids"]) for e in task.train], cfg)
    # --max-steps stops early but keeps the whole run's learning-rate schedule (learning_rate
    # below gets total_steps, not stop): the first N steps are then exactly those of the full run,
    # so a short run shows what the full run's monitors read at those steps.
    stop = min(total_steps, cfg.max_steps or total_steps)
    if total_steps == 0:
        raise UserError(f"no training samples from {task.source}: every sample lost its assistant tokens "
                        f"when cut at max_len={cfg.max_len} ({task.n_truncated} cut)" if task.n_truncated else
                        f"no training samples from {task.source} (limit={cfg.limit})")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    if dist.main:  # the monitors run on rank 0; the others get their result
        canaries = canary_batch(tokenizer, device)
        setup = monitor_setup(cfg, tokenizer, model)
        reference = reference_state(model, canaries, cfg.topk, setup)  # computed once: the reference never changes
    trigger = Trigger(cfg.tau, cfg.warmup_measurements, cfg.consecutive)
    start, d_history, monitor_history = 0, [], {name: [] for name in MONITORS}
    if resuming and latest_checkpoint(run) is not None:  # every rank reads the same checkpoint
        start, trigger_state, d_history, saved_histories = load_checkpoint(run, model, optimizer)
        if dist.main:
            print(f"[phaseguard] resuming from step {start} ({latest_checkpoint(run).name})", file=sys.stderr)
        trigger = Trigger(**trigger_state)
        # A checkpoint from before monitor histories were kept: empty (metrics.jsonl has the values).
        monitor_history = {name: [] for name in MONITORS} | saved_histories
    dist.barrier()  # nobody reads the run directory once rank 0 starts writing it
    if dist.main:
        origin = provenance.collect(model=provenance.model_record(cfg.model, cfg.revision, model.weights_dir),
                                    data=provenance.data_record(task.source, task.sha256, task.sha256_of))
        if resuming and start == 0:
            print("[phaseguard] resuming a run that has no checkpoint yet: starting at step 0", file=sys.stderr)
        start_run_dir(run, cfg, resuming, origin, start)  # training starts now: config.json, then metrics
        write_atomic(run / "monitor_reference.json", json.dumps(monitor_record(reference, setup), indent=2))
        truncate_metrics(run / "metrics.jsonl", start)
        print(f"[phaseguard] {cfg.method} on {cfg.task}: {len(task.train)} samples ({task.n_truncated} truncated at "
              f"{cfg.max_len}), {total_steps} steps" + (f" (stopping after {stop})" if stop < total_steps else "")
              + f", lambda={cfg.lam}, monitor {cfg.monitor}, data from {task.source}"
              + (f", {dist.world} processes" if dist.on else ""), file=sys.stderr)

    from tqdm import tqdm
    bar = tqdm(range(start, stop), initial=start, total=stop, dynamic_ncols=True, disable=not dist.main)
    model.train()
    d_t = None
    with (open(run / "metrics.jsonl", "a") if dist.main else contextlib.nullcontext()) as log:
        for step in bar:
            # The monitors and the trigger, between optimizer steps: all four monitors are logged
            # for every method, so drift can be compared across methods and monitors; the trigger
            # reads cfg.monitor (D_t, Eq. 2, for "js").
            values = measured = None
            if step % cfg.monitor_every == 0:
                if dist.main:
                    values = all_monitors(model, canaries, reference)
                    if cfg.method == "phaseguard":
                        update_trigger(trigger, values[cfg.monitor], step)
                # Every rank applies the same lambda on the same step.
                values, trigger = dist.from_main((values, trigger))
                d_t = measured = values[cfg.monitor]
                d_history.append([step, d_t])
                for name, value in values.items():
                    monitor_history[name].append([step, value])
            lam = active_lambda(cfg, trigger)

            lr = learning_rate(cfg, step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            examples = sorted((task.train[i] for i in step_batch(step)), key=lambda e: len(e["ids"]))
            micro = [data.collate(examples[i:i + cfg.micro_batch_size], tokenizer.pad_id)
                     for i in range(0, len(examples), cfg.micro_batch_size)]
            stats = train_step(model, micro, lam, cfg.kl_tokens, device, autocast, dist)
            # grad_clip 0 is "off": an infinite max norm still returns the norm for the log.
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()  # the step's kernels are queued, not finished
            seconds = time.perf_counter() - t0

            record = {"step": step + 1, **stats, "lambda_active": lam, "lr": lr, "grad_norm": float(grad_norm),
                      "tokens_per_s": stats["tokens"] / seconds, "peak_memory_gb": peak_memory_gb(cuda),
                      "d_t": measured, "d_t_step": step if measured is not None else None,
                      "canary_kl": None if values is None else values["kl"], "monitors": values,
                      "trigger_fired_at": trigger.fired_at, "time": round(time.time(), 3)}
            done = step + 1
            if not dist.main:
                continue
            with naming_errors(run / "metrics.jsonl"):
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{stats['loss']:.3f}", kl="-" if stats["kl"] is None else f"{stats['kl']:.4f}",
                            lam=f"{lam:g}", D_t=f"{d_t:.3f}" if d_t is not None else "-",
                            trigger=trigger.fired_at if trigger.fired else ("off" if cfg.method == "phaseguard" else "n/a"))
            if done % cfg.checkpoint_every == 0 or done == stop:
                save_checkpoint(run, model, optimizer, done, trigger, d_history, monitor_history)

    if dist.main:  # a final reading after the last update: the drift of the adapter that is saved
        for name, value in all_monitors(model, canaries, reference).items():
            if not monitor_history[name] or monitor_history[name][-1][0] != stop:
                monitor_history[name].append([stop, value])
    dist.barrier()
    if not dist.main:
        dist.stop()
        return run
    with naming_errors(run / "adapter"):
        lora.save_adapter(model, run / "adapter", cfg.model)
    summary = {"steps": stop, "planned_steps": total_steps, "trigger_step": trigger.fired_at, "d_history": d_history,
               "monitor": cfg.monitor, "monitor_history": monitor_history, "final_reading_step": stop,
               "n_train": len(task.train), "n_truncated": task.n_truncated, "data_source": task.source}
    write_atomic(run / "summary.json", json.dumps(summary, indent=2))
    dist.stop()
    return run


def step_schedule(lengths: list[int], cfg: TrainConfig):
    """(total optimizer steps, step -> its batch of sample indices). An epoch's batches are drawn
    when a step first needs them, one epoch held at a time: `--epochs 1000000000 --max-steps 1`
    draws one epoch, not a billion."""
    import functools
    per_epoch = -(-len(lengths) // cfg.batch_size)  # length_grouped_batches cuts ceil(n / batch) batches

    @functools.lru_cache(maxsize=1)
    def epoch_batches(epoch: int) -> list[list[int]]:
        return data.length_grouped_batches(lengths, cfg.batch_size, cfg.seed, epoch)
    return per_epoch * cfg.epochs, lambda step: epoch_batches(step // per_epoch)[step % per_epoch]


def peak_memory_gb(cuda: bool) -> float:
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# ----------------------------------------------------------------------------
# Command line: `python phaseguard.py train --method phaseguard --task security ...`


def main(argv=None) -> int:
    parser = ArgumentParser(description="PhaseGuard-KL training")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune with rs-LoRA (methods none | kl | phaseguard)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "tiny_model":
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                       help=f"default: {f.default}" + "".join(f" (the {name} preset: {values[f.name]})"
                                                              for name, values in PRESETS.items() if f.name in values))
    p.add_argument("--resume", action="store_true")
    args = vars(parser.parse_args(argv))
    args.pop("command")  # only `train` for now
    resume = args.pop("resume")
    # A file-size limit (ulimit -f) then fails the write with EFBIG, reported below, instead of
    # killing the process without a word.
    if hasattr(signal, "SIGXFSZ"):  # POSIX only
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    cfg = None
    try:
        cfg = resolve_config(args)
        if cfg.preset == "tiny":
            print("[phaseguard] TINY PRESET: a small random model on the CPU. It checks the pipeline; "
                  "its numbers mean nothing.", file=sys.stderr)
        elif cfg.preset == "small":
            print(f"[phaseguard] SMALL PRESET: {cfg.model} on the CPU at reduced sizes (batch {cfg.batch_size}, "
                  f"r = {cfg.lora_r}): not the paper's setting.", file=sys.stderr)
        run = train(cfg, resume=resume)
    except UserError as err:
        return fail(f"error: {err}", 2)
    except OSError as err:  # a read-only or full disk, a file-size limit: the last checkpoint is intact
        where = err.filename or (cfg.out if cfg else "?")
        hint = resume_hint(Path(cfg.out)) if cfg is not None else None
        return fail(f"error: {where}: {err.strerror or err}" + (f" ({hint})" if hint else ""), 2)
    except KeyboardInterrupt:  # Ctrl-C: one line saying what is on disk, no traceback
        hint = resume_hint(Path(cfg.out)) if cfg is not None else None
        return fail("interrupted" + (f": {hint}" if hint else " before training started: the same command starts "
                                     "it afresh"), 130)
    if Dist().main:
        print(f"[phaseguard] done: {run}", file=sys.stderr)
    return 0


def fail(line: str, code: int) -> int:
    """One line on stderr, from rank 0 (under torchrun every rank usually meets the same error).
    Every rank also hands it to torchrun, whose failure summary then shows it instead of a pointer
    to its docs (a rank that fails alone is named there too)."""
    dist = Dist()
    if dist.main:
        print(line, file=sys.stderr)
    if dist.on:
        dist.tell_launcher(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
