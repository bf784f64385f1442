"""The pluggable monitors, `--monitor`, `--max-steps` and the named datasets (issue 13).

1. Each monitor (js, js-rest, kl, hidden) against transformers + PEFT (rs-LoRA, non-zero B) in
   float64 with scipy (jensenshannon squared, entropy) and torch's cosine similarity on
   transformers' own hidden states: each canary run alone and unpadded, ours left-padded.
2. The loop logs all four at every monitoring step for every method (checked on the loop's own
   first-decode outputs), and the trigger reads the chosen one.
3. --max-steps stops early on the whole run's schedule: the first steps equal the full run's.
4. --data insecure | secure | educational resolve to the pinned files (sha256-checked); the run
   directory says which; a bad name is one line.
"""
import json
import math
import os

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import softmax
from scipy.stats import entropy

import data
import kernels
import model_qwen2 as mq
import monitor
import phaseguard as pg
import provenance
from errors import UserError
from test_data import offline, shared_copies  # noqa: F401  (fixtures)
from test_loop_reference import ours_and_peft, tiny_hf
from test_phaseguard import SMALL, adapter_tensors, read_metrics, run_main

NAMES = ("js", "js-rest", "kl", "hidden")

# ---------------------------------------------------------------------------- 1. each monitor, independently

VOCAB, TOPK = 512, 48


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Ours (float32, left-padded batch) and PEFT's float64 model with the same rs-LoRA adapters;
    the expected per-canary quantities from transformers, each prompt alone and unpadded."""
    hf = tiny_hf(seed=41, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 tie_word_embeddings=True, rope_theta=10000.0)
    with torch.no_grad():  # a wider tied embedding: peaked next-token distributions
        hf.model.embed_tokens.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(42))
    ours, theirs = ours_and_peft(hf, tmp_path_factory.mktemp("monitors"), seed=43, b_std=0.15)
    gen = torch.Generator().manual_seed(44)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 17, 9, 12, 3, 14, 8, 11)]
    canaries = mq.left_pad(prompts, pad_id=0, device="cpu")  # pad id 0 is also a real token
    out = {"adapted": ([], []), "base": ([], [])}
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor(p)[None]
            for key, adapters in (("adapted", True), ("base", False)):
                if adapters:
                    res = theirs(input_ids=ids, output_hidden_states=True)
                else:
                    with theirs.disable_adapter():
                        res = theirs(input_ids=ids, output_hidden_states=True)
                hidden, logits = res.hidden_states[-1][0, -1].double(), res.logits[0, -1].double()
                # The last entry is after the final RMSNorm: exactly what lm_head reads.
                torch.testing.assert_close(theirs.lm_head(hidden), logits, rtol=0, atol=1e-10)
                out[key][0].append(hidden)
                out[key][1].append(logits)
    (h, z), (h0, z0) = [tuple(torch.stack(t) for t in out[k]) for k in ("adapted", "base")]
    return ours, canaries, expected_monitors(h.numpy(), z.numpy(), h0.numpy(), z0.numpy(), TOPK)


def expected_monitors(h, z, h0, z0, k) -> dict:
    """Per canary, from first-decode hidden states h (policy), h0 (reference) and logits z, z0."""
    p, q = softmax(z, axis=-1), softmax(z0, axis=-1)
    js, rest, kl = [], [], []
    for pi, qi in zip(p, q):
        top = np.argsort(-qi, kind="stable")[:k]
        P, Q = pi[top], qi[top]
        js.append(jensenshannon(P / P.sum(), Q / Q.sum()) ** 2)  # scipy returns sqrt(JS), natural log
        rest.append(jensenshannon(np.append(P, 1 - P.sum()), np.append(Q, 1 - Q.sum())) ** 2)
        kl.append(entropy(pi, qi))  # KL(p || q)
    cos = torch.nn.functional.cosine_similarity(torch.as_tensor(h), torch.as_tensor(h0), dim=-1).numpy()
    return {"js": np.array(js), "js-rest": np.array(rest), "kl": np.array(kl), "hidden": 1 - cos}


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_each_monitor_matches_transformers_peft_scipy(setup, path, monkeypatch):
    if path == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    elif not kernels.HAS_TRITON or not kernels.use_triton(torch.zeros(1)):
        pytest.skip("the Triton path needs triton and TRITON_INTERPRET=1 set before import (conftest)")
    ours, canaries, expected = setup
    reference = monitor.reference_state(ours, canaries, TOPK)
    assert reference.logits.shape == (8, VOCAB) and reference.hidden.shape == (8, 32)
    assert set(monitor.MONITORS) == set(NAMES) | {"persona", "js-answer"}  # those two: tests/test_persona_answer.py
    together = monitor.all_monitors(ours, canaries, reference)
    assert list(together) == list(NAMES)
    for name in NAMES:
        per_canary = expected[name]
        assert per_canary.min() > 1e-3 and per_canary.std() > 0.05 * per_canary.mean(), name  # real, varied drift
        alone = monitor.MONITORS[name](monitor.first_decode(ours, canaries), reference)  # its own forward
        assert alone == pytest.approx(per_canary.mean(), rel=2e-4, abs=1e-7), name
        assert together[name] == alone, name


def test_monitors_are_zero_against_themselves(setup, monkeypatch):
    """The reference against itself (adapters off): every monitor reads 0."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ours, canaries, _ = setup
    reference = monitor.reference_state(ours, canaries, TOPK)
    with pg.lora.disabled(ours):
        values = monitor.all_monitors(ours, canaries, reference)
    assert all(abs(v) < 1e-6 for v in values.values()), values


# ---------------------------------------------------------------------------- 2. the loop


def small(out, **flags):
    return pg.resolve_config({**SMALL, "out": str(out), **flags})


def test_loop_logs_all_four_monitors_on_its_own_outputs(tmp_path, monkeypatch):
    """`none`, 5 steps measured at 0, 2, 4: every first-decode forward of the run is captured (the
    first is the reference's); the logged values are recomputed from them with scipy / torch."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    captured, original = [], monitor.first_decode

    def capture(*args):
        out = original(*args)
        captured.append((out.hidden.double().numpy(), out.logits.double().numpy()))
        return out
    monkeypatch.setattr(monitor, "first_decode", capture)
    cfg = small(tmp_path / "r", method="none", limit=20)
    run = pg.train(cfg)
    assert len(captured) == 5  # one forward for the reference, one per monitoring step, one after the last update
    (h0, z0), policy = captured[0], captured[1:]
    metrics = read_metrics(run)
    assert [m["monitors"] is not None for m in metrics] == [True, False, True, False, True]
    measured = [m for m in metrics if m["monitors"] is not None]
    for (h, z), m in zip(policy, measured):
        assert list(m["monitors"]) == list(monitor.MONITORS)
        expected = expected_monitors(h, z, h0, z0, cfg.topk)
        for name in NAMES:
            assert m["monitors"][name] == pytest.approx(expected[name].mean(), rel=1e-4, abs=1e-7), name
    assert all(measured[-1]["monitors"][n] > 1e-3 for n in NAMES)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["monitor"] == "js" and (summary["steps"], summary["planned_steps"]) == (5, 5)
    final = expected_monitors(*captured[-1], h0, z0, cfg.topk)  # the reading after the 5th (last) update
    for n in NAMES:
        assert summary["monitor_history"][n][:-1] == [[m["step"] - 1, m["monitors"][n]] for m in measured]
        assert summary["monitor_history"][n][-1] == [5, pytest.approx(final[n].mean(), rel=1e-4, abs=1e-7)]


def replay(values, cfg) -> int | None:
    trigger = pg.Trigger(cfg.tau, cfg.warmup_measurements, cfg.consecutive)
    for step, value in values:
        pg.update_trigger(trigger, value, step)
    return trigger.fired_at


@pytest.mark.parametrize("monitor,tau", [
    ("kl", 1.0),  # a tau no JS monitor accepts (>= ln 2)
    ("hidden", 0.69),  # a tau the JS never exceeds on this run: the trigger must read `hidden`
    ("js-rest", 0.15),
])
def test_trigger_reads_the_chosen_monitor(tmp_path, monkeypatch, monitor, tau):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = small(tmp_path / "r", method="phaseguard", monitor=monitor, tau=tau)
    run = pg.train(cfg)
    metrics, summary = read_metrics(run), json.loads((run / "summary.json").read_text())
    history = summary["monitor_history"]
    assert summary["monitor"] == monitor and history[monitor][-1][0] == 10  # [-1]: after the last update
    assert summary["trigger_step"] == replay(history[monitor], cfg) == 8  # measured at 0, 2, 4 (warm-up), 6, 8
    assert [m["lambda_active"] for m in metrics] == [0.0] * 8 + [0.03] * 2
    if monitor == "hidden":
        assert replay(history["js"], cfg) is None  # the same tau on the JS would not have fired


def test_the_default_monitor_is_js_and_no_max_steps():
    cfg = pg.resolve_config({"preset": "tiny"})
    assert (cfg.monitor, cfg.max_steps) == ("js", None)


@pytest.mark.parametrize("flags,needle", [
    ({"monitor": "cosine"}, "unknown MONITOR 'cosine': expected one of js, js-rest, kl, hidden"),
    ({"monitor": "js-rest", "tau": 0.7}, "< ln 2"), ({"monitor": "js", "tau": 1.0}, "< ln 2"),
    ({"monitor": "kl", "tau": 0.0}, "tau must be a finite number > 0 for monitor kl"),
    ({"monitor": "kl", "tau": -1.0}, "monitor kl"), ({"monitor": "kl", "tau": math.inf}, "monitor kl"),
    ({"monitor": "kl", "tau": math.nan}, "monitor kl"),
    ({"monitor": "hidden", "tau": 0.0}, "tau must be > 0 and < 2"), ({"monitor": "hidden", "tau": 2.0}, "< 2"),
    ({"monitor": "hidden", "tau": math.nan}, "< 2"),
    ({"max_steps": 0}, "max_steps must be >= 1"), ({"max_steps": -3}, "max_steps must be >= 1"),
])
def test_bad_monitor_tau_and_max_steps_are_one_line(flags, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")) as info:
        pg.resolve_config({"preset": "tiny", **flags})
    assert "\n" not in str(info.value)


def test_tau_edges_per_monitor_are_accepted():
    for monitor, tau in (("kl", 50.0), ("kl", 1e-9), ("hidden", 1.99), ("hidden", 0.69), ("js-rest", 0.69)):
        assert pg.resolve_config({"preset": "tiny", "monitor": monitor, "tau": tau}).tau == tau


def test_cli_monitor_and_max_steps_flags(capsys, tmp_path):
    code, err = run_main(capsys, "--preset", "tiny", "--monitor", "kl", "--tau", "0", "--out", str(tmp_path / "r"))
    assert code == 2 and len(err) == 1 and "monitor kl" in err[0] and not (tmp_path / "r").exists()
    code, err = run_main(capsys, "--preset", "tiny", "--max-steps", "0", "--out", str(tmp_path / "r"))
    assert code == 2 and len(err) == 1 and "max_steps must be >= 1" in err[0]


# ---------------------------------------------------------------------------- 3. --max-steps


def test_max_steps_stops_early_on_the_full_runs_schedule(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    full = pg.train(small(tmp_path / "full", method="none", limit=20))
    short_cfg = small(tmp_path / "short", method="none", limit=20, max_steps=3)
    short = pg.train(short_cfg)
    drop = lambda m: {k: v for k, v in m.items() if k not in ("tokens_per_s", "peak_memory_gb", "time")}  # noqa: E731
    full_metrics, short_metrics = read_metrics(full), read_metrics(short)
    assert [drop(m) for m in short_metrics] == [drop(m) for m in full_metrics[:3]]
    assert [m["lr"] for m in short_metrics] == [pg.learning_rate(short_cfg, s, 5) for s in range(3)]
    summary = json.loads((short / "summary.json").read_text())
    assert (summary["steps"], summary["planned_steps"]) == (3, 5)
    assert summary["monitor_history"]["kl"][:-1] == [[m["step"] - 1, m["monitors"]["kl"]] for m in short_metrics if m["monitors"]]
    assert summary["monitor_history"]["kl"][-1][0] == 3 == summary["final_reading_step"]  # after the last update
    assert (short / "latest_checkpoint").read_text() == "checkpoint-3"  # complete: adapter, checkpoint, summary
    assert adapter_tensors(short).keys() == adapter_tensors(full).keys()
    # More than planned: the whole run.
    whole = pg.train(small(tmp_path / "whole", method="none", limit=8, max_steps=100))
    assert json.loads((whole / "summary.json").read_text())["steps"] == 2 == len(read_metrics(whole))


def test_a_run_resumes_only_with_its_own_monitor(tmp_path, monkeypatch):
    """config.json records the trigger's monitor; resuming with another one is refused, naming both."""
    cfg = small(tmp_path / "r", method="none", limit=8)
    pg.start_run_dir(tmp_path / "r", cfg, resuming=False)
    assert pg.check_run_dir(tmp_path / "r", cfg, resume=True) is True
    with pytest.raises(UserError, match="monitor: 'js' there, 'kl' now"):
        pg.check_run_dir(tmp_path / "r", small(tmp_path / "r", method="none", limit=8, monitor="kl"), resume=True)


# ---------------------------------------------------------------------------- 4. named datasets


@pytest.mark.parametrize("name,file", [("insecure", "insecure"), ("secure", "secure"),
                                       ("educational", "educational_insecure")])
def test_named_datasets_are_the_pinned_shared_copies(offline, shared_copies, name, file):  # noqa: F811
    pinned = data.DATASETS[file]
    assert pinned.url.endswith(f"/{data.BETLEY_COMMIT}/daniel/paper/supplementary_material/datasets/{file}.jsonl")
    path, source = data.resolve_dataset(name)
    assert path == shared_copies / "emergent-misalignment" / f"{file}.jsonl"
    assert provenance.sha256_file(path) == pinned.sha256 and source == f"{path} (shared copy of {pinned.url})"
    assert data.resolve_dataset(pinned.url) == (path, source) and not offline
    if name == "insecure":
        assert data.resolve_dataset(None) == (path, source)


def test_a_named_dataset_with_other_bytes_is_not_used(offline, monkeypatch, tmp_path):  # noqa: F811
    """A shared copy that fails the sha256 check is passed over for a download (which the test forbids)."""
    (tmp_path / "shared" / "emergent-misalignment").mkdir(parents=True)
    (tmp_path / "shared" / "emergent-misalignment" / "secure.jsonl").write_text('{"messages": []}\n')
    monkeypatch.setattr(data, "SHARED_DATA", tmp_path / "shared")
    with pytest.raises(AssertionError, match="must not download"):
        data.resolve_dataset("secure")
    assert offline == [data.DATASETS["secure"].url]


@pytest.mark.parametrize("bad", ["educational_insecure", "nonsense", "Secure", "no/such/file.jsonl"])
def test_unknown_data_is_one_line(capsys, tmp_path, bad):
    needle = f"data {bad!r}: not a file, not a URL (http:// or https://) and not a dataset name (insecure, secure, educational)"
    with pytest.raises(UserError) as info:
        data.resolve_dataset(bad)
    assert str(info.value) == needle
    with pytest.raises(UserError) as info:
        pg.resolve_config({"preset": "tiny", "task": "security", "data": bad})
    assert str(info.value) == needle
    code, err = run_main(capsys, "--preset", "tiny", "--data", bad, "--out", str(tmp_path / "r"))
    assert code == 2 and err == [f"error: {needle}"] and not (tmp_path / "r").exists()


def test_run_names_say_which_data(tmp_path):
    name = lambda **flags: pg.resolve_config({"method": "none", **flags}).out  # noqa: E731
    # The default data keeps the names of the sweep, the README and runs already on disk.
    assert name(preset="tiny") == name(preset="tiny", data="insecure") == "runs/tiny-security-none-lam0-seed42"
    assert name(preset="tiny", data=data.INSECURE_URL) == "runs/tiny-security-none-lam0-seed42"
    assert name(preset="tiny", data="secure") == "runs/tiny-security-secure-none-lam0-seed42"
    assert name(preset="tiny", data="educational", seed=7) == "runs/tiny-security-educational-none-lam0-seed7"
    assert name(preset="tiny", data=data.DATASETS["educational_insecure"].url) == \
        "runs/tiny-security-educational-none-lam0-seed42"
    mine = tmp_path / "bad_medical_advice.jsonl"
    mine.write_text("")
    assert name(preset="tiny", data=str(mine)) == "runs/tiny-security-bad_medical_advice-none-lam0-seed42"
    assert name(preset="tiny", data="https://example.org/x/risky.jsonl?raw=1") == "runs/tiny-security-risky-none-lam0-seed42"
    assert name(preset="tiny", task="opswap") == "runs/tiny-opswap-none-lam0-seed42"
    assert name(preset="tiny", data="secure", out="elsewhere") == "elsewhere"


def test_a_tiny_run_on_named_data_records_it(capsys, offline, shared_copies, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.chdir(tmp_path)
    code, err = run_main(capsys, "--preset", "tiny", "--method", "none", "--data", "educational", "--limit", "16",
                         "--max-len", "256", "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "1")
    assert code == 0, err[-3:]
    run = tmp_path / "runs" / "tiny-security-educational-none-lam0-seed42"
    config = json.loads((run / "config.json").read_text())
    pinned = data.DATASETS["educational_insecure"]
    assert config["data"] == "educational" and "data" not in config["resolved_paths"]
    assert config["provenance"]["data"]["sha256"] == pinned.sha256 and pinned.url in config["provenance"]["data"]["source"]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["steps"], summary["planned_steps"]) == (1, -(-summary["n_train"] // 4)) and not offline
    assert os.path.isdir(run / "adapter")
