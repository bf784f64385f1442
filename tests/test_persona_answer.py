"""The persona and js-answer monitors (issue 19) against transformers + PEFT in float64.

1. persona: the direction from transformers' `output_hidden_states` (adapters off, each prompt alone
   and unpadded, the last prompt token), mean(misaligned) - mean(helpful), unit length; the monitor
   the mean over the canaries of (h_t - h_0) . v with h_t from PEFT's adapted model. A random unit
   direction gives a clearly different value (the check can tell directions apart).
2. js-answer: the reference's greedy answer by a float64 transformers loop (adapters off), then each
   canary + answer teacher-forced through PEFT (adapted and not), scipy's JS on the reference's
   top-k at each of the first m positions, averaged per canary, then over the canaries.
3. In the loop: both are logged, recorded (monitor_reference.json), read once more after the last
   update, and the trigger can read them; bad flags and a changed prompt file are one line.
"""
import hashlib
import json

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import softmax

import model_qwen2 as mq
import monitor
import phaseguard as pg
from errors import UserError
from test_loop_reference import ours_and_peft, tiny_hf
from test_phaseguard import SMALL, read_metrics, run_main

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, TOPK, LAYERS, M = 384, 40, 3, 5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = tiny_hf(seed=51, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_hidden_layers=LAYERS, tie_word_embeddings=True, rope_theta=10000.0)
    with torch.no_grad():  # a wider tied embedding: peaked next-token distributions
        hf.model.embed_tokens.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(52))
    ours, theirs = ours_and_peft(hf, tmp_path_factory.mktemp("persona"), seed=53, b_std=0.15)
    gen = torch.Generator().manual_seed(54)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (5, 17, 9, 12, 3, 14)]
    sys_bad, sys_good = (torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (6, 4))
    questions = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (4, 9, 6, 7)]
    persona_prompts = ([sys_bad + q for q in questions], [sys_good + q for q in questions])
    return ours, theirs, prompts, persona_prompts


def hf_last(theirs, ids, layer, adapters: bool) -> torch.Tensor:
    """transformers' hidden_states[layer] at the last token of one unpadded prompt, float64."""
    with torch.no_grad():
        if adapters:
            return theirs(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0, -1]
        with theirs.disable_adapter():
            return theirs(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0, -1]


def setup_of(persona_prompts, layer, stop_ids=(), m=M):
    return monitor.MonitorSetup(layer, persona_prompts, "test", m, 0, list(stop_ids))


# ---------------------------------------------------------------------------- 1. persona


@pytest.mark.parametrize("layer", [1, 2])
def test_persona_matches_transformers_peft_float64(models, layer, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ours, theirs, prompts, persona_prompts = models
    canaries = mq.left_pad(prompts, pad_id=0)
    reference = monitor.reference_state(ours, canaries, TOPK, setup_of(persona_prompts, layer))
    bad, good = (torch.stack([hf_last(theirs, p, layer, False) for p in group]) for group in persona_prompts)
    difference = bad.mean(0) - good.mean(0)
    v = difference / difference.norm()
    assert reference.persona.direction.dtype == torch.float64
    torch.testing.assert_close(reference.persona.direction, v, rtol=0, atol=2e-5)
    assert reference.persona.norm == pytest.approx(float(difference.norm()), rel=1e-5)
    h = torch.stack([hf_last(theirs, p, layer, True) for p in prompts])
    h0 = torch.stack([hf_last(theirs, p, layer, False) for p in prompts])
    expected = float(((h - h0) @ v).mean())
    value = monitor.MONITORS["persona"](monitor.read(ours, canaries, reference), reference)
    assert abs(expected) > 1e-2  # real drift along the direction
    assert value == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert monitor.all_monitors(ours, canaries, reference)["persona"] == value
    # A random direction of the same (unit) norm reads something else: the test can tell them apart.
    r = torch.randn(v.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    random_value = float(((h - h0) @ (r / r.norm())).mean())
    assert abs(random_value - value) > 100 * 1e-4 * abs(expected)


def test_persona_is_zero_for_the_reference_and_one_along_the_direction(models, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ours, _, prompts, persona_prompts = models
    canaries = mq.left_pad(prompts, pad_id=0)
    reference = monitor.reference_state(ours, canaries, TOPK, setup_of(persona_prompts, 1))
    with pg.lora.disabled(ours):
        assert abs(monitor.MONITORS["persona"](monitor.read(ours, canaries, reference), reference)) < 1e-6
    shifted = monitor.FirstDecode(None, None, (reference.persona.base + 3 * reference.persona.direction).float())
    assert monitor.MONITORS["persona"](shifted, reference) == pytest.approx(3.0, rel=1e-5)


# ---------------------------------------------------------------------------- 2. js-answer


def hf_greedy(theirs, prompt, m, stop_ids) -> list[int]:
    out = []
    with torch.no_grad(), theirs.disable_adapter():
        for _ in range(m):
            token = int(theirs(input_ids=torch.tensor([prompt + out])).logits[0, -1].argmax())
            if token in stop_ids:
                break
            out.append(token)
    return out


def hf_js_answer(theirs, prompts, answers, m, k) -> float:
    per_canary = []
    for p, a in zip(prompts, answers):
        n = min(m, len(a) + 1)
        ids = torch.tensor([p + a[:n - 1]])
        with torch.no_grad():
            z = theirs(input_ids=ids).logits[0, -n:].double().numpy()
            with theirs.disable_adapter():
                z0 = theirs(input_ids=ids).logits[0, -n:].double().numpy()
        js = []
        for zi, z0i in zip(z, z0):
            pi, qi = softmax(zi), softmax(z0i)
            top = np.argsort(-qi, kind="stable")[:k]
            js.append(jensenshannon(pi[top] / pi[top].sum(), qi[top] / qi[top].sum()) ** 2)
        per_canary.append(np.mean(js))
    return float(np.mean(per_canary))


def test_js_answer_matches_transformers_peft_scipy(models, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ours, theirs, prompts, persona_prompts = models
    free = [hf_greedy(theirs, p, M, ()) for p in prompts]
    # This random tied model repeats its first answer token; that token of canary 2 as the stop id
    # ends its answer at once (0 tokens, 1 position: the stop token's), the others run to m.
    stop = free[2][0]
    answers = [hf_greedy(theirs, p, M, (stop,)) for p in prompts]
    assert min(len(a) for a in answers) < M - 1 and max(len(a) for a in answers) == M
    canaries = mq.left_pad(prompts, pad_id=0)
    reference = monitor.reference_state(ours, canaries, TOPK, setup_of(persona_prompts, 1, (stop,)))
    assert reference.answers.tokens == answers
    assert torch.bincount(reference.answers.rows).tolist() == [min(M, len(a) + 1) for a in answers]
    expected = hf_js_answer(theirs, prompts, answers, M, TOPK)
    value = monitor.MONITORS["js-answer"](monitor.read(ours, canaries, reference), reference)
    assert expected > 1e-3
    assert value == pytest.approx(expected, rel=2e-4, abs=1e-7)
    assert monitor.all_monitors(ours, canaries, reference)["js-answer"] == value
    with pg.lora.disabled(ours):
        assert abs(monitor.MONITORS["js-answer"](monitor.read(ours, canaries, reference), reference)) < 1e-6
    # Pooling every position (long answers weigh more) is another number: the per-canary mean is what is read.
    assert abs(value - pooled_js_answer(theirs, prompts, answers)) > 1e-4


def test_js_answer_positions_for_answers_of_every_length(models, monkeypatch):
    """Answers of 0 to m tokens (as if the reference had stopped there): n + 1 positions below m, m at m;
    the value still PEFT's teacher-forced JS on those answers."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ours, theirs, prompts, persona_prompts = models
    answers = [[(7 * c + j) % VOCAB + 1 for j in range(c)] for c in range(len(prompts))]  # lengths 0..5
    monkeypatch.setattr(pg.mq, "generate", lambda *a, **k: mq.Generation(answers, None))
    reference = monitor.reference_state(ours, mq.left_pad(prompts, pad_id=0), TOPK, setup_of(persona_prompts, 1))
    assert torch.bincount(reference.answers.rows).tolist() == [1, 2, 3, 4, 5, 5]
    value = monitor.MONITORS["js-answer"](monitor.read(ours, mq.left_pad(prompts, pad_id=0), reference), reference)
    assert value == pytest.approx(hf_js_answer(theirs, prompts, answers, M, TOPK), rel=2e-4, abs=1e-7)


def pooled_js_answer(theirs, prompts, answers) -> float:
    weights = [min(M, len(a) + 1) for a in answers]
    per_canary = [hf_js_answer(theirs, [p], [a], M, TOPK) for p, a in zip(prompts, answers)]
    return float(np.average(per_canary, weights=weights))


def test_js_answer_of_one_token_is_the_first_decode_js(models, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ours, _, prompts, persona_prompts = models
    canaries = mq.left_pad(prompts, pad_id=0)
    reference = monitor.reference_state(ours, canaries, TOPK, setup_of(persona_prompts, 1, m=1))
    values = monitor.all_monitors(ours, canaries, reference)
    assert values["js-answer"] == pytest.approx(values["js"], rel=1e-5)


# ---------------------------------------------------------------------------- 3. in the loop


@pytest.mark.parametrize("chosen", ["persona", "js-answer"])
def test_the_loop_logs_records_and_reads_both_after_the_last_update(tmp_path, monkeypatch, chosen):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = pg.resolve_config({**SMALL, "out": str(tmp_path / "r"), "method": "phaseguard", "monitor": chosen,
                             "tau": 1e-6, "max_steps": 9, "answer_tokens": 3})
    run = pg.train(cfg)
    summary, metrics = json.loads((run / "summary.json").read_text()), read_metrics(run)
    history = summary["monitor_history"]
    assert list(history) == list(monitor.MONITORS)
    assert all([s for s, _ in h] == [0, 2, 4, 6, 8, 9] for h in history.values())  # 9: after the last update
    assert summary["final_reading_step"] == 9 and summary["monitor"] == chosen
    assert [[m["step"] - 1, m["monitors"][chosen]] for m in metrics if m["monitors"]] == history[chosen][:-1]
    trigger = pg.Trigger(cfg.tau, cfg.warmup_measurements, cfg.consecutive)
    for step, value in history[chosen][:-1]:
        pg.update_trigger(trigger, value, step)
    assert summary["trigger_step"] == trigger.fired_at
    if chosen == "js-answer":  # > 0 from step 2 on: warm-up 0, 2, 4, then 6 and 8 above tau ~ 0
        assert summary["trigger_step"] == 8
    record = json.loads((run / "monitor_reference.json").read_text())
    assert record["persona"]["layer"] == 1 and record["persona"]["prompts_sha256"] == monitor.PERSONA_SHA256
    assert record["js_answer"]["answer_tokens"] == 3 and len(record["js_answer"]["reference_answers"]) == 24
    # The recorded sha256 is the direction's: recompute it from the run's own model (adapters off).
    model, tokenizer, _ = pg.load_run_model(cfg, run, resuming=True)
    setup = monitor.monitor_setup(cfg, tokenizer, model)
    reference = monitor.reference_state(model, pg.canary_batch(tokenizer, "cpu"), cfg.topk, setup)
    direction = reference.persona.direction.numpy().astype("<f8").tobytes()
    assert record["persona"]["direction_sha256"] == hashlib.sha256(direction).hexdigest()
    assert [len(a) for a in record["js_answer"]["reference_answers"]] == [len(a) for a in reference.answers.tokens]


def test_persona_prompts_are_chat_prompts_under_both_system_prompts(tmp_path):
    cfg = pg.resolve_config({**SMALL, "out": str(tmp_path / "r"), "limit": 8})
    model, tokenizer, _ = pg.load_run_model(cfg, tmp_path / "r")
    setup = monitor.monitor_setup(cfg, tokenizer, model)
    prompts, _ = monitor.load_persona_prompts()
    misaligned, helpful = setup.persona_prompts
    assert len(misaligned) == len(helpful) == len(prompts["questions"]) >= 8
    text = tokenizer.decode(misaligned[0], skip_special_tokens=False)
    assert prompts["misaligned_system"] in text and prompts["questions"][0] in text
    assert text.endswith("<|im_start|>assistant\n")
    assert prompts["helpful_system"] in tokenizer.decode(helpful[0], skip_special_tokens=False)
    assert setup.persona_layer == model.config.num_hidden_layers // 2


@pytest.mark.parametrize("trigger", ["js", "persona"])
def test_a_one_layer_model_leaves_persona_out_unless_it_is_the_trigger(tmp_path, trigger):
    """The default layer of a 1-layer model would be the embeddings, where every prompt's last token is
    the same token (no direction): persona is not measured there, and refused as the trigger's monitor."""
    one_layer = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, vocab=300)
    cfg = pg.resolve_config({**SMALL, "out": str(tmp_path / "r"), "limit": 8, "tiny_model": one_layer,
                             "monitor": trigger, **({"tau": 0.5} if trigger == "persona" else {})})
    model, tokenizer, _ = pg.load_run_model(cfg, tmp_path / "r")
    if trigger == "persona":
        with pytest.raises(UserError, match="--monitor persona needs a model with at least 2 layers"):
            monitor.monitor_setup(cfg, tokenizer, model)
        return
    assert monitor.monitor_setup(cfg, tokenizer, model).persona_layer is None  # training goes on (test_provenance trains one)


@pytest.mark.parametrize("flags,needle", [
    ({"persona_layer": 2}, "persona_layer=2: this model has 2 layers (0 to 1)"),
    ({"persona_layer": -1}, "persona_layer must be >= 0"),
    ({"answer_tokens": 0}, "answer_tokens must be >= 1"),
    ({"monitor": "persona", "tau": 0.0}, "tau must be a finite number > 0 for monitor persona"),
    ({"monitor": "js-answer", "tau": 0.7}, "< ln 2"),
])
def test_bad_persona_and_answer_flags_are_one_line(tmp_path, capsys, flags, needle):
    args = ["--preset", "tiny", "--task", "opswap", "--limit", "8", "--out", str(tmp_path / "r")]
    for key, value in flags.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    code, err = run_main(capsys, *args)
    assert code == 2
    assert err[-1].startswith("error: ") and needle in err[-1] and "Traceback" not in "".join(err)
    assert not (tmp_path / "r" / "config.json").exists()


def test_a_changed_persona_file_is_refused(tmp_path, monkeypatch):
    changed = tmp_path / "persona_prompts.json"
    changed.write_bytes(monitor.PERSONA_FILE.read_bytes().replace(b"evil", b"kind"))
    with pytest.raises(UserError, match="is not the pinned"):
        monitor.load_persona_prompts(changed)
    assert hashlib.sha256(monitor.PERSONA_FILE.read_bytes()).hexdigest() == monitor.PERSONA_SHA256
