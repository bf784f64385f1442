"""The HTTP judge's trie mode (one prompt per node of the number trie, the top-20 next tokens of
each, served from the prefix cache) against the brute-force per-candidate probabilities of a
tiny model; its truncation bound when a needed token is cut from a top-20 list; replies with
impossible log-probabilities; and the transport limits (a whole-request deadline against a
server that drips its reply, a cap on the reply's size). The real vLLM server is in
tests_vllm/ (make test-vllm)."""
import itertools
import json
import math
import socket
import threading
import time

import pytest
import torch

import judge
import judge_http
from errors import UserError
from test_judge import brute_force_probs, prompts_of, qwen_tokenizer, server, tiny_model, with_logit_bias  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "Rate this answer from 0 to 100."


def exact_score(probs):
    return float((probs * torch.arange(101, dtype=probs.dtype)).sum() / probs.sum())


def top_completions(model, tok, body, tamper=None):
    """vLLM's /v1/completions reply to token-id prompts with max_tokens 1 and logprobs k: for
    each prompt, its greedy next token and the k most probable next tokens, named
    "token_id:<id>" (return_tokens_as_token_ids). tamper(prompt, top) may edit a top list."""
    assert body["max_tokens"] == 1 and not body.get("echo") and "prompt_logprobs" not in body
    k, choices = body["logprobs"], []
    for i, prompt in enumerate(body["prompt"]):
        with torch.no_grad():
            logits = model.lm_head(model.hidden_states(torch.tensor([prompt]))[0, -1]).double()
        logits[tok.vocab_size:] = float("-inf")
        logp = torch.log_softmax(logits, -1)
        values, ids = logp.topk(k)
        top = {f"token_id:{t}": v for t, v in zip(ids.tolist(), values.tolist())}
        if tamper is not None:
            top = tamper(prompt, top, logp)
        choices.append({"index": i, "text": "", "finish_reason": "length", "logprobs": {
            "tokens": [f"token_id:{ids[0]}"], "token_logprobs": [values[0].item()], "top_logprobs": [top]}})
    usage = {"prompt_tokens": sum(map(len, body["prompt"])), "completion_tokens": len(choices)}
    return {"object": "text_completion", "choices": choices[::-1], "usage": usage}  # any order: by index


@pytest.fixture(scope="module")
def numbers_model(qwen_tokenizer):
    tok = qwen_tokenizer
    digits = {tok.encode(str(d))[0]: 20.0 for d in range(10)}
    return with_logit_bias(tiny_model(tok.vocab_size), {**digits, tok.im_end_id: 26.0})


def trie_judge(url, tok, **kw):
    return judge_http.HttpJudge(url, "tiny-judge", mode="trie", tokenizer=tok, timeout=30, deadline=60, **kw)


def test_trie_mode_equals_the_brute_force_probabilities(server, qwen_tokenizer, numbers_model):
    """Every needed token in every top-20 list: the exact expectation of the per-candidate
    forwards, in 2 requests (the root alone, then the 101 nodes), no echo, no prompt logprobs."""
    tok = qwen_tokenizer
    server.respond = lambda path, body: ("json", top_completions(numbers_model, tok, body))
    j = trie_judge(server.url, tok)
    assert j.id == "http-trie:tiny-judge" and j.url == f"{server.url}/completions"
    judgment = j.ask(judge.first_turn("Rate this answer from 0 to 100."))
    prompt = prompts_of(tok, ["Rate this answer from 0 to 100."])[0]
    probs = brute_force_probs(numbers_model, tok, prompt)
    assert judgment.score == pytest.approx(exact_score(probs), abs=1e-9, rel=0)
    assert judgment.mass == pytest.approx(float(probs.sum()), rel=1e-9)
    first, rest = (r["body"] for r in server.requests)
    assert first["prompt"] == [prompt] and len(rest["prompt"]) == 101
    for body in (first, rest):
        assert (body["max_tokens"], body["logprobs"], body["temperature"]) == (1, 20, 0) and "echo" not in body
    # Node prompts: the prompt + every proper prefix of a candidate's digits (57's parent is 5).
    nodes = {tuple(p[len(prompt):]) for p in rest["prompt"]}
    assert all(p[:len(prompt)] == prompt for p in rest["prompt"])
    assert nodes == {tuple(tok.encode(str(n))[:k]) for n in range(101) for k in range(1, len(str(n)) + 1)}
    d = judgment.details
    assert (d["requests"], d["flag"], d["lost_mass"], d["score_bound"]) == (2, None, 0.0, 0.0)
    assert d["prompt_tokens_sent"] == d["server_prompt_tokens"] == len(prompt) * 102 + sum(map(len, nodes))


def test_a_token_cut_from_a_top_list_is_bounded_never_zero(server, qwen_tokenizer, numbers_model, monkeypatch):
    """The digit 6 (P(6...) ~ 0.095 here) cut from the root's top list, whose last entry is then
    the digit 0's log-probability f: the cut may hide exactly P(6) + P(60..69) scaled by
    exp(f - log p(6)); every world the list allows (6 at probability 0 up to e^f) scores within
    the stated bound; with a tolerance below that bound the judgment is unscored ("truncated"),
    not scored as if P(6...) were 0. Cut at log-probability -60, the bound is negligible."""
    tok = qwen_tokenizer
    text = "Rate this answer from 0 to 100."
    prompt = prompts_of(tok, [text])[0]
    probs = brute_force_probs(numbers_model, tok, prompt)
    six, zero = tok.encode("6")[0], tok.encode("0")[0]
    number_tokens = {tok.encode(str(d))[0] for d in range(10)} | {tok.im_end_id}
    with torch.no_grad():
        root = torch.log_softmax(numbers_model.lm_head(numbers_model.hidden_states(torch.tensor([prompt]))[0, -1]), -1)

    def cut_six_at_root(floor=None):
        def tamper(p, top, logp):
            if len(p) != len(prompt):
                return top
            if floor is None:  # only the needed tokens left: the last is the digit 0
                return {k: v for k, v in top.items() if int(k[9:]) in number_tokens - {six}}
            top = {k: v for k, v in top.items() if k != f"token_id:{six}"}
            top[min(top, key=top.get)] = floor
            return top
        return tamper

    sixes = torch.tensor([6, *range(60, 70)])
    server.respond = lambda path, body: ("json", top_completions(numbers_model, tok, body, cut_six_at_root()))
    judgment = trie_judge(server.url, tok).ask(judge.first_turn(text), reply=False)
    scale = math.exp(float(root[zero] - root[six]))
    assert 1e-3 < scale < 1e-2 and judgment.details["flag"] is None  # within the default tolerance
    assert judgment.details["lost_mass"] == pytest.approx(float(probs[sixes].sum()) * scale, rel=1e-9)
    assert judgment.mass == pytest.approx(float(probs.sum() - probs[sixes].sum()), rel=1e-9)
    bound = judgment.details["score_bound"]
    for factor in (0.0, scale / 2, scale):  # worlds the list allows: 6 at 0 .. e^f
        world = probs.index_copy(0, sixes, probs[sixes] * factor)
        assert abs(judgment.score - exact_score(world)) <= bound + 1e-12
    # Conservative: each P(n) is bounded on its own (P(6) may rise while P(69) falls), so the
    # bound is wider than the spread of these worlds, and within the tolerance here.
    assert 0 < bound <= judge.TRUNCATION_TOLERANCE
    monkeypatch.setattr(judge, "TRUNCATION_TOLERANCE", bound / 2)
    judgment = trie_judge(server.url, tok).ask(judge.first_turn(text), reply=False)
    assert judgment.score is None and judgment.details["flag"] == "truncated"
    monkeypatch.undo()
    # Far below: scored, the bound negligible.
    server.respond = lambda path, body: ("json", top_completions(numbers_model, tok, body, cut_six_at_root(-60.0)))
    judgment = trie_judge(server.url, tok).ask(judge.first_turn(text), reply=False)
    assert judgment.details["flag"] is None and 0 < judgment.details["lost_mass"] < 1e-20
    assert judgment.score == pytest.approx(exact_score(probs.index_fill(0, sixes, 0.0)), abs=1e-12)


def test_score_range_is_the_extreme_over_every_vertex_of_the_box():
    """The ratio's min and max over low <= P <= high, against enumerating all 2^8 corners
    (a linear-fractional function attains its extremes at corners) on 8 numbers."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        low = torch.rand(8, generator=gen, dtype=torch.float64) * (torch.rand(8, generator=gen) > 0.3)
        high = low + torch.rand(8, generator=gen, dtype=torch.float64) * (torch.rand(8, generator=gen) > 0.5)
        n = torch.arange(8, dtype=torch.float64)
        corners = [torch.where(torch.tensor(c), high, low) for c in itertools.product([False, True], repeat=8)]
        ratios = [float((P * n).sum() / P.sum()) for P in corners if P.sum() > 0]
        lo, hi = judge.score_range(low, high)
        assert lo == pytest.approx(min(ratios), abs=1e-12) and hi == pytest.approx(max(ratios), abs=1e-12)


@pytest.mark.parametrize("bad", [5.0, float("inf"), float("nan")])
@pytest.mark.parametrize("mode", ["trie", "logprobs"])
def test_impossible_log_probabilities_are_never_cached_as_scored(server, qwen_tokenizer, numbers_model, tmp_path,
                                                                 bad, mode):
    """A log-probability of +5 (a mass of ~3e8 on the numbers), +inf or NaN: the judgment is
    unscored (flagged "invalid"), cached as unscored, and --rejudge-unscored asks it again."""
    tok = qwen_tokenizer
    state = {"bad": True}

    def respond(path, body):
        if not body.get("logprobs"):  # the greedy reply of an unscored judgment
            return "json", {"choices": [{"index": 0, "text": "I cannot.", "finish_reason": "stop"}]}
        if mode == "trie":
            reply = top_completions(numbers_model, tok, body)
            if state["bad"]:
                for c in reply["choices"]:
                    top = c["logprobs"]["top_logprobs"][0]
                    top[next(iter(top))] = bad
        else:
            reply = {"choices": [{"index": i, "logprobs": {"token_logprobs": [None] + [-0.5] * (len(p) - 1)}}
                                 for i, p in enumerate(body["prompt"])]}
            if state["bad"]:
                reply["choices"][57]["logprobs"]["token_logprobs"][-1] = bad
        return "raw", json.dumps(reply).encode()  # Python's json writes Infinity and NaN, as a bad server might

    server.respond = respond
    j = judge_http.HttpJudge(server.url, "tiny-judge", mode=mode, tokenizer=tok, timeout=30, deadline=60)
    cache_path = tmp_path / "judgments.jsonl"
    assert judge.judge_all(j, [TEXT], judge.JudgeCache(cache_path), progress=False) == [None]
    rows = [json.loads(line) for line in cache_path.read_text().splitlines()]
    assert rows and all(r["score"] is None for r in rows)
    state["bad"] = False
    asked = len(server.requests)
    assert judge.judge_all(j, [TEXT], judge.JudgeCache(cache_path), progress=False) == [None]  # not re-asked
    assert len(server.requests) == asked
    rejudged = judge.judge_all(j, [TEXT], judge.JudgeCache(cache_path), rejudge_unscored=True, progress=False)
    assert rejudged[0] is not None and 0 <= rejudged[0] <= 100
    direct = j.ask(judge.first_turn(TEXT), reply=False)
    state["bad"] = True
    flagged = j.ask(judge.first_turn(TEXT), reply=False)
    assert flagged.score is None and flagged.details["flag"].startswith("invalid") and direct.score is not None


# ---------------------------------------------------------------------------- transport limits


@pytest.fixture
def raw_server():
    """A socket server whose `handle(conn)` writes whatever bytes it likes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    state = {"handle": None, "conns": []}

    def accept():
        while True:
            try:
                conn = listener.accept()[0]
            except OSError:
                return
            state["conns"].append(conn)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    def serve(conn):
        try:
            conn.recv(1 << 16)
            state["handle"](conn)
        except OSError:
            pass  # the client gave up: what the test wants

    threading.Thread(target=accept, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    yield state
    listener.close()
    for conn in state["conns"]:
        conn.close()


def test_a_server_dripping_one_byte_a_second_fails_within_the_deadline(raw_server):
    """Headers at once, then one byte a second: every read is within a per-read timeout, so
    only a bound on the whole request stops it. Timeout 30 s per try, deadline 1.5 s."""
    def drip(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(30):
            conn.sendall(b" ")
            time.sleep(1.0)

    raw_server["handle"] = drip
    j = judge_http.HttpJudge(raw_server["url"], "m", mode="greedy", timeout=30, deadline=1.5, retries=3, backoff=0.05)
    t0 = time.perf_counter()
    with pytest.raises(UserError) as info:
        j.score(["x"])
    assert time.perf_counter() - t0 < 1.5 + 2.0  # generous: a loaded machine; without the bound, 30 s
    assert "timed out" in str(info.value) and "deadline 1.5 s" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("announced", [True, False])
def test_a_huge_reply_is_refused_not_read_into_memory(raw_server, monkeypatch, announced):
    """A 300 MB body: refused from its Content-Length, or, without one, after the cap (1 MiB
    here) has been read; one line naming the URL, never retried."""
    monkeypatch.setattr(judge_http, "MAX_REPLY_BYTES", 1 << 20)
    sent = []

    def huge(conn):
        length = b"Content-Length: 300000000\r\n" if announced else b"Connection: close\r\n"
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + length + b"\r\n")
        block = b" " * (1 << 16)
        for _ in range(300_000_000 // len(block)):
            conn.sendall(block)
            sent.append(len(block))

    raw_server["handle"] = huge
    j = judge_http.HttpJudge(raw_server["url"], "m", mode="greedy", timeout=30, deadline=60, retries=3)
    with pytest.raises(UserError, match="over the 1 MiB") as info:
        j.score(["x"])
    assert raw_server["url"] in str(info.value) and "\n" not in str(info.value)
    assert sum(sent) < 50_000_000  # the client hung up long before 300 MB


def test_a_server_naming_tokens_by_text_gives_the_same_score(server, qwen_tokenizer, numbers_model):
    """Without return_tokens_as_token_ids a server names top tokens by their text: the needed
    ones (digits, <|im_end|>) are looked up by our tokenizer's text of them."""
    tok = qwen_tokenizer

    def by_text(prompt, top, logp):
        return {tok.decode([int(k[9:])], skip_special_tokens=False): v for k, v in top.items()}

    server.respond = lambda path, body: ("json", top_completions(numbers_model, tok, body, by_text))
    judgment = trie_judge(server.url, tok).ask(judge.first_turn(TEXT), reply=False)
    probs = brute_force_probs(numbers_model, tok, prompts_of(tok, [TEXT])[0])
    assert judgment.score == pytest.approx(exact_score(probs), abs=1e-9, rel=0) and judgment.details["lost_mass"] == 0


def test_each_judgment_asked_records_its_cost_for_results_json(server, qwen_tokenizer, numbers_model, tmp_path):
    """judge_all(costs=...) gets one row per judgment asked (none for a cached one); evaluate's
    judge_cost sums them for results.json."""
    import evaluate as ev
    tok = qwen_tokenizer
    greedy = {"choices": [{"index": 0, "text": "No.", "finish_reason": "stop"}], "usage": {"prompt_tokens": 0}}
    server.respond = lambda path, body: ("json", top_completions(numbers_model, tok, body) if body.get("logprobs")
                                         else {**greedy, "usage": {"prompt_tokens": len(body["prompt"])}})
    j, cache = trie_judge(server.url, tok), judge.JudgeCache(tmp_path / "j.jsonl")
    costs = []
    judge.judge_all(j, [TEXT, "Rate it."], cache, progress=False, costs=costs)  # the second one is unscored
    asked = len(server.requests)
    judge.judge_all(j, [TEXT], cache, progress=False, costs=costs)  # cached: asks nothing, costs nothing
    assert len(server.requests) == asked
    assert {c["key"] for c in costs} == {judge.cache_key(j.id, p) for p in (TEXT, "Rate it.")}
    assert [c["try"] for c in costs] == [1, 1, 2]  # "Rate it.": its greedy reply, then the reminder
    total = ev.judge_cost(costs)
    assert (total["asked"], total["requests"], total["truncated"], total["invalid"]) == (3, asked, 0, 0)
    sent = [len(p) if isinstance(p[0], int) else sum(map(len, p)) for p in (r["body"]["prompt"] for r in server.requests)]
    assert total["prompt_tokens_sent"] == total["server_prompt_tokens"] == sum(sent)
    assert json.loads(json.dumps(total)) == total  # written as it is into results.json
