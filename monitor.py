"""The drift monitors (Eq. 2 and five others) and the trigger that switches Eq. 1's KL on.

    D_t = 1/|P| sum_p JS_k(pi_theta_t(.|p), pi_theta_0(.|p))                         (Eq. 2)

MONITORS maps each --monitor name to `fn(reading, reference) -> float`, a mean over the 24
canaries: `js` (Eq. 2, the default), `js-rest`, `kl` and `hidden` at the first decode position;
`persona` (drift of the residual stream at --persona-layer along a misaligned-persona direction)
and `js-answer` (Eq. 2's JS over the first --answer-tokens of the reference's own greedy answer).
`reading` is a FirstDecode from `read` (the policy's forwards), `reference` a Reference from
`reference_state` (the same model with its LoRA adapters off, read once before training). The
loop calls all_monitors: one reading, every monitor the reference supports.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

import data
import kernels
import lora
import model_qwen2 as mq
from config import MONITOR_NAMES, TrainConfig
from errors import UserError


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
    answer_logits: torch.Tensor | None = None  # [N, V] fp32 logits at the reference's answer positions (js-answer)


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
        persona = None if setup is None or setup.persona_layer is None else persona_reference(model, setup, out.layer)
        answers = None if setup is None else answer_reference(model, canaries, setup, k)
    return Reference(kernels.reference_topk(out.logits, k), out.logits, out.hidden.float(), persona, answers)


# ---- persona and js-answer (issue 19): monitors that read more than the first decode position.
# persona: drift of the canaries' residual stream along a "misaligned persona" direction (after
# Chen et al. 2025, arXiv 2507.21509); js-answer: Eq. 2's top-k JS over the first m tokens of the
# reference's own greedy answer, teacher-forced. Both reference parts are computed once, adapters off.

PERSONA_FILE = Path(__file__).with_name("persona_prompts.json")
PERSONA_SHA256 = "bcbbb8466d266cec30140133df946aef926026f947784fd66bb8162f0ad461ec"  # the file as committed


class MonitorSetup(NamedTuple):
    """What the persona and js-answer references need besides the canaries (monitor_setup)."""
    persona_layer: int | None  # transformers' hidden_states index: 0 the embeddings, l the output of block l;
    # None: persona not measured (a 1-layer model has no residual layer but the embeddings)
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
    if layer == 0 and cfg.persona_layer is None:
        # The default on a 1-layer model would be the embeddings, where every prompt's last token is the
        # same token: no direction. Persona is then left out of the logged monitors, unless it is the trigger's.
        if cfg.monitor == "persona":
            raise UserError(f"--monitor persona needs a model with at least 2 layers (this one has {layers}: its only "
                            "residual layer before the final norm is the embeddings)")
        layer = None
    elif not 0 <= layer < layers:  # transformers' last entry is after the final norm: not the residual stream
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


def monitor_record(reference: Reference, setup: MonitorSetup) -> dict:
    """What the run records of the persona direction and the reference's answers (monitor_reference.json)."""
    persona, answers = reference.persona, reference.answers
    direction = None if persona is None else persona.direction.detach().cpu().numpy().astype("<f8")
    return {"persona": None if persona is None else {
                "layer": persona.layer, "direction_sha256": hashlib.sha256(direction.tobytes()).hexdigest(),
                "direction_sha256_of": "float64 little-endian bytes of the unit direction",
                "norm_before_normalising": persona.norm, "prompts_file": PERSONA_FILE.name,
                "prompts_sha256": persona.prompts_sha256},
            "js_answer": {"answer_tokens": setup.answer_tokens,
                          "positions_per_canary": torch.bincount(answers.rows).tolist(),
                          "reference_answers": answers.tokens}}


# ----------------------------------------------------------------------------
# The monitors: MONITORS[name](reading, reference) -> float, each a mean over the canaries of
# the policy (the reading) against the reference (adapters off, read once before training).


def mean_topk_js(logits: torch.Tensor, topk: tuple, variant: str = "renorm") -> float:
    """Eq. 2's D_t from the policy's logits at the positions `topk` was taken at: the mean (not
    the sum) over the rows of kernels.topk_js against the reference's (ids, log-probs)."""
    return kernels.topk_js(logits, *topk, variant).mean().item()


def js(out: FirstDecode, reference: Reference) -> float:
    """Eq. 2 (D_t, the default --monitor): top-k JS, both distributions renormalised on the
    reference's top-k ids."""
    return mean_topk_js(out.logits, reference.topk, "renorm")


def js_rest(out: FirstDecode, reference: Reference) -> float:
    """Top-k JS with the rest of the vocabulary as one more bin (kernels.topk_js variant rest)."""
    return mean_topk_js(out.logits, reference.topk, "rest")


def kl(out: FirstDecode, reference: Reference) -> float:
    """Full-vocabulary KL(pi_theta || pi_theta0) at the first decode position (what Eq. 1 penalises)."""
    return kernels.kl_div(out.logits, reference.logits).mean().item()


def hidden(out: FirstDecode, reference: Reference) -> float:
    """1 - cosine similarity of the last layer's hidden states after the final RMSNorm (the
    lm_head input), in float64: near 0 a float32 cosine would round 1 - cos to +-1e-7."""
    cos = torch.nn.functional.cosine_similarity(out.hidden.double(), reference.hidden.double(), dim=-1)
    return (1 - cos).mean().item()


def persona(out: FirstDecode, reference: Reference) -> float:
    """The mean over the canaries of (h_t - h_0) . v at the persona layer, in float64."""
    return ((out.layer.double() - reference.persona.base) @ reference.persona.direction).mean().item()


def js_answer(out: FirstDecode, reference: Reference) -> float:
    """Eq. 2's top-k JS (renorm) at each answer position, averaged over each canary's positions,
    then over the canaries (each canary weighs the same, as in Eq. 2)."""
    answers = reference.answers
    per_position = kernels.topk_js(out.answer_logits, *answers.topk, "renorm").double()
    n = len(answers.tokens)
    sums = torch.zeros(n, dtype=torch.float64, device=per_position.device).index_add_(0, answers.rows, per_position)
    return (sums / torch.bincount(answers.rows, minlength=n)).mean().item()


# The names are defined once, in config.MONITOR_NAMES (what --monitor is checked against, without
# this module); each name's function is the one above spelt with "_" for "-". A name without one
# stops the import here with a KeyError naming it.
MONITORS = {name: globals()[name.replace("-", "_")] for name in MONITOR_NAMES}
NEEDS = {"persona": "persona", "js-answer": "answers"}  # the Reference field a monitor needs, when it needs one


def read(model, canaries, reference: Reference) -> FirstDecode:
    """What every monitor the reference supports reads: one forward over the canaries (with the
    persona layer when the reference has a persona) and, when it has answers, one over the
    teacher-forced answers (the canaries are in that batch)."""
    out = first_decode(model, canaries, None if reference.persona is None else reference.persona.layer)
    if reference.answers is not None:
        out = out._replace(answer_logits=answer_logits(model, reference.answers))
    return out


def all_monitors(model, canaries, reference: Reference) -> dict[str, float]:
    """Every monitor the reference supports, in MONITORS' order, from one reading (what the loop
    logs at every monitoring step; the trigger reads the --monitor entry)."""
    out = read(model, canaries, reference)
    return {name: monitor_fn(out, reference) for name, monitor_fn in MONITORS.items()
            if name not in NEEDS or getattr(reference, NEEDS[name]) is not None}


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
