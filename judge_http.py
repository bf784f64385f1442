"""The judge's HTTP backend (judge.py holds the estimator, the local backend, the cache and
judge_all): an OpenAI-compatible server, scored by the expectation over 0..100 from its prompt
log-probabilities (mode "logprobs", vLLM's /v1/completions with echo: the prompt prefilled once
per candidate), from its top-20 next tokens at each node of the number trie (mode "trie": one
prefill, the rest from vLLM's prefix cache, with a bound on what the top-20 cut may hide) or,
as the named fallback, by the integer of a greedy reply (mode "greedy"). HttpClient, the
transport (also the sampler's): each try bounded as a whole, retries within a deadline, replies
capped in size; replies with impossible log-probabilities are unscored, never cached as scored."""
from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import queue
import re
import socket
import threading
import time
import urllib.parse
from typing import Iterator

import torch

import model_qwen2 as mq
from judge import (API_KEY_ENV, DEFAULT_DEADLINE, DEFAULT_JUDGE, DEFAULT_MODE, DEFAULT_TIMEOUT, NUMBERS, TOP_LOGPROBS, Judgment,
                   LazyJudge, LocalJudge, ancestors_or_self, check_local, check_mode, first_turn, judge_id,
                   judgment_from_bounds, judgments_from_probs, number_trie, parse_spec)
from errors import UserError

# The largest reply body read: an echo reply of 101 candidates of a 2,000-token prompt is ~20 MB.
MAX_REPLY_BYTES = 64 << 20

def parse_score(text: str) -> float | None:
    """The first number in the reply (ASCII digits, sign and decimals read: "85", "72.5", "-1") if
    it lies in 0..100; a number outside it ("101", "-1", "100.5"), garbage or a refusal gives None,
    never a clipped or truncated score."""
    match = re.search(r"-?[0-9]+(?:\.[0-9]+)?", text or "")
    if match is None:
        return None
    value = float(match.group()) + 0.0  # + 0.0: "-0" is 0.0
    return value if 0 <= value <= 100 else None


# A server's log-probability may round a little above 0 (fp32 log-softmax of a certain token).
LOGPROB_SLACK = 1e-4


class InvalidReply(Exception):
    """A reply whose numbers cannot be log-probabilities: the judgment is unscored, not cached as scored."""


def checked_logprob(value, url: str) -> float:
    """A log-probability from a server: a number <= 0 (up to LOGPROB_SLACK; -inf is probability 0).
    NaN, +inf or a positive value would make a mass above 1 or a NaN score."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value > LOGPROB_SLACK:
        raise InvalidReply(f"judge server {url} sent log-probability {value!r}")
    return min(float(value), 0.0)


class TransientError(Exception):
    """A failure worth retrying: refused connection, timeout, HTTP 5xx or 429, broken reply."""


def one_line(text: str, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


def parallel(fn, items: list, workers: int) -> Iterator[tuple[int, object]]:
    """(index, fn(item)) as each is done, from up to `workers` daemon threads. The first
    exception is raised here at once: the threads still waiting on a server are abandoned
    (daemon threads never hold up the exit, unlike a ThreadPoolExecutor's)."""
    if not items:
        return
    tasks: queue.SimpleQueue = queue.SimpleQueue()
    for i, item in enumerate(items):
        tasks.put((i, item))
    results: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def work():
        while not stop.is_set():
            try:
                i, item = tasks.get_nowait()
            except queue.Empty:
                return
            try:
                results.put((i, fn(item), None))
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                results.put((i, None, err))
                return

    for _ in range(max(1, min(workers, len(items)))):
        threading.Thread(target=work, daemon=True).start()
    try:
        for _ in range(len(items)):
            i, value, err = results.get()
            if err is not None:
                raise err
            yield i, value
    finally:
        stop.set()


class HttpClient:
    """JSON POSTs to an OpenAI-compatible server: each try bounded as a whole by `timeout`,
    transient failures retried with backoff within `deadline`, replies capped in size; every
    failure one UserError line naming the role ("judge", "sampler"), the URL and the limits."""
    role = "server"

    def __init__(self, timeout: float, deadline: float, retries: int, backoff: float, api_key_env: str):
        if not (timeout > 0 and deadline > 0):
            raise UserError(f"{self.role} timeout {timeout} and deadline {deadline}: both must be > 0 seconds")
        self.timeout, self.deadline, self.retries, self.backoff = float(timeout), float(deadline), retries, backoff
        self.api_key_env = api_key_env

    # ---- transport: one JSON POST, retried within the deadline

    def request(self, url: str, body: dict | None, timeout: float, expect: str = "choices") -> dict:
        """One try (a POST of `body`, or a GET when it is None): the whole exchange (connect,
        headers, body) within `timeout` seconds, a reply body of at most MAX_REPLY_BYTES (a
        larger one is refused before it is read), holding a non-empty list `expect`."""
        headers = {"Content-Type": "application/json"}
        if os.environ.get(self.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        status, raw = self.exchange(url, None if body is None else json.dumps(body).encode(), headers, timeout)
        if status != 200:
            detail = one_line(raw[:400].decode(errors="replace"))
            if status >= 500 or status == 429:
                raise TransientError(f"HTTP {status} {detail}")
            hint = (f" (the API key is read from {self.api_key_env}: is it set, and the server's?)"
                    if status in (401, 403) else "")
            raise UserError(f"{self.role} server {url} answered HTTP {status}: {detail}{hint}")
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or not isinstance(data[expect], list) or not data[expect]:
                raise ValueError
            return data
        except (ValueError, KeyError, TypeError):
            raise TransientError(f"not an OpenAI-compatible reply: {raw[:120]!r}") from None

    def exchange(self, url: str, payload: bytes | None, headers: dict, timeout: float) -> tuple[int, bytes]:
        """(HTTP status, body). A watchdog shuts the socket at `timeout`, so a server that sends
        its headers and then one byte a second cannot hold a try past it (a socket timeout alone
        bounds each read, not their sum); the body is read in pieces and capped."""
        parts = urllib.parse.urlsplit(url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.hostname, parts.port, timeout=timeout)
        expired = threading.Event()

        def expire():
            expired.set()
            with contextlib.suppress(OSError, AttributeError):
                conn.sock.shutdown(socket.SHUT_RDWR)

        watchdog = threading.Timer(timeout, expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            conn.request("GET" if payload is None else "POST", path or "/", payload, headers)
            response = conn.getresponse()
            size = response.getheader("Content-Length")
            if size and size.isdigit() and int(size) > MAX_REPLY_BYTES:
                raise self.too_large(url, f"announced {int(size)} bytes")
            chunks, total = [], 0
            while chunk := response.read1(1 << 16):
                total += len(chunk)
                if total > MAX_REPLY_BYTES:
                    raise self.too_large(url, f"more than {total} bytes")
                chunks.append(chunk)
            if expired.is_set():
                raise socket.timeout("deadline")
            if response.length:  # the server hung up before the announced Content-Length
                raise http.client.IncompleteRead(b"".join(chunks), response.length)
            return response.status, b"".join(chunks)
        except http.client.HTTPException as err:  # IncompleteRead, BadStatusLine: a reply cut short
            if expired.is_set():
                raise TransientError(f"timed out after {timeout:.3g} s (the whole request)") from None
            raise TransientError(f"{type(err).__name__}: {one_line(err)}") from None
        except (ConnectionError, socket.timeout, TimeoutError, OSError) as err:
            if expired.is_set() or isinstance(err, (socket.timeout, TimeoutError)):
                raise TransientError(f"timed out after {timeout:.3g} s (the whole request)") from None
            raise TransientError(f"{type(err).__name__}: {one_line(err)}") from None
        finally:
            watchdog.cancel()
            conn.close()

    def too_large(self, url: str, what: str) -> UserError:
        return UserError(f"{self.role} server {url}: a reply of {what}, over the {MAX_REPLY_BYTES >> 20} MiB this client "
                         f"reads (MAX_REPLY_BYTES in judge_http.py); is it an OpenAI-compatible server?")

    def post(self, url: str, body: dict | None, expect: str = "choices") -> dict:
        """Retries transient failures with exponential backoff (backoff, 2 backoff, ...), each
        try within `timeout` and all of them within `deadline`, then one clear error naming
        the URL, the tries and the last failure."""
        start, tries = time.monotonic(), 0
        while True:
            tries += 1
            remaining = self.deadline - (time.monotonic() - start)
            try:
                return self.request(url, body, max(min(self.timeout, remaining), 1e-3), expect)
            except TransientError as err:
                last = err
            elapsed = time.monotonic() - start
            wait = self.backoff * 2 ** (tries - 1)
            if tries > self.retries or elapsed + wait >= self.deadline:
                raise UserError(f"{self.role} server {url} failed {tries} time{'s' * (tries > 1)} in {elapsed:.1f} s "
                                f"(timeout {self.timeout:g} s per request, deadline {self.deadline:g} s), "
                                f"last: {last}") from None
            time.sleep(wait)


class HttpJudge(HttpClient):
    """An OpenAI-compatible server. mode "logprobs" (default): the exact expectation from the
    server's prompt log-probabilities of the 101 candidate replies (vLLM /v1/completions,
    echo); mode "trie": the same expectation from the top-20 next tokens at each node of the
    number trie (one prefill of the prompt); mode "greedy": the first integer of the greedy chat
    reply. See the module doc."""
    role = "judge"

    def __init__(self, base_url: str, model: str = DEFAULT_JUDGE, *, mode: str = DEFAULT_MODE, tokenizer=None,
                 timeout: float = DEFAULT_TIMEOUT, deadline: float = DEFAULT_DEADLINE, retries: int = 5,
                 backoff: float = 1.0, workers: int | None = None, max_tokens: int = 16, reply_tokens: int = 32,
                 api_key_env: str = API_KEY_ENV):
        self.mode = check_mode(mode)
        super().__init__(timeout, deadline, retries, backoff, api_key_env)
        self.base_url = base_url.rstrip("/")
        # The endpoint of the mode: what the error lines name.
        self.url = self.base_url + ("/chat/completions" if mode == "greedy" else "/completions")
        self.model = model
        # A logprobs request already holds 101 sequences for the server to batch.
        self.workers = workers or (2 if mode != "greedy" else 8)
        self.max_tokens, self.reply_tokens = max_tokens, reply_tokens
        self._tokenizer, self._tokenizer_lock = tokenizer, threading.Lock()
        self.tokenizer_name = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else model
        self._candidates: list[list[int]] | None = None
        self._trie, self._trie_paths = None, None
        # One model gives one answer (greedy decoding, or the exact probabilities), wherever it
        # is served: the id names the model and the mode, not the URL, so a cache survives a
        # server moving.
        self.id = f"http-{mode}:{model}"

    # ---- greedy mode

    def chat(self, conversation: list[dict]) -> str:
        body = {"model": self.model, "messages": conversation, "temperature": 0, "max_tokens": self.max_tokens}
        return self.chat_reply(self.post(self.url, body))

    def chat_reply(self, data: dict) -> str:
        try:
            return data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise UserError(f"judge server {self.url}: not a chat-completions reply: {one_line(data, 120)}") from None

    # ---- logprobs mode

    @property
    def tokenizer(self):
        """The judge's tokenizer (loaded on first use): it splits prompt from candidate."""
        with self._tokenizer_lock:
            if self._tokenizer is None or isinstance(self._tokenizer, (str, os.PathLike)):
                try:
                    self._tokenizer = mq.load_tokenizer(self.tokenizer_name)
                except UserError as err:
                    raise UserError(f"the judge's tokenizer {str(self.tokenizer_name)!r} (the served model's own, "
                                    f"to split prompt from candidate tokens): {err}") from None
            return self._tokenizer

    def candidates(self) -> list[list[int]]:
        """Candidate n: the tokens of str(n), then <|im_end|>."""
        if self._candidates is None:
            tok = self.tokenizer
            self._candidates = [tok.encode(str(n)) + [tok.im_end_id] for n in NUMBERS]
        return self._candidates

    def number_probs(self, conversation: list[dict], details: dict | None = None) -> torch.Tensor:
        """[101] float64 P(n) from one request of the 101 candidates, echoed with logprobs:
        log P(n) = sum of the echoed log-probabilities of candidate n's tokens. The server
        recomputes the whole prompt for each candidate (vLLM skips its prefix cache when prompt
        log-probabilities are asked for): mode "trie" reads the same numbers at one prefill."""
        tok, tails = self.tokenizer, self.candidates()
        prompt = tok.encode_chat(conversation, add_generation_prompt=True)[0]
        body = {"model": self.model, "prompt": [prompt + tail for tail in tails], "max_tokens": 1,
                "temperature": 0, "echo": True, "logprobs": 1}
        data = self.post_counted(body, details)
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
        no_logprobs = (f"judge server {self.url} returned no prompt log-probabilities for echo=true, logprobs=1 "
                       f"(vLLM serves them; for a server without them use judge mode 'greedy')")
        if len(choices) != len(tails):
            raise UserError(f"judge server {self.url}: {len(choices)} choices for {len(tails)} prompts")
        P, logp = len(prompt), []
        for n, (choice, tail) in enumerate(zip(choices, tails)):
            try:
                echoed = choice["logprobs"]["token_logprobs"]
                span = echoed[P:P + len(tail)]
                if len(span) != len(tail) or not all(isinstance(x, (int, float)) for x in span):
                    raise TypeError
            except (KeyError, IndexError, TypeError):
                raise UserError(no_logprobs) from None
            self.check_tokens(choice["logprobs"].get("tokens"), P, tail[:-1])
            logp.append(math.fsum(checked_logprob(x, self.url) for x in span))
        return torch.tensor(logp, dtype=torch.float64).exp()

    def check_tokens(self, tokens, start: int, ids: list[int]):
        """The digits the server echoes must be our tokenizer's: another tokenizer would give
        another split of prompt and candidate, and a meaningless score."""
        if not isinstance(tokens, list) or len(tokens) < start + len(ids):
            return
        for k, token_id in enumerate(ids):
            theirs, ours = tokens[start + k], self.tokenizer.decode([token_id], skip_special_tokens=False)
            if isinstance(theirs, str) and theirs not in (ours, f"token_id:{token_id}"):
                raise UserError(f"judge server {self.url}: token id {token_id} is {theirs!r} on the server but "
                                f"{ours!r} in the judge tokenizer {str(self.tokenizer_name)!r}: pass the served "
                                f"model's tokenizer")

    def generate(self, conversation: list[dict], details: dict | None = None) -> str:
        """The judge's greedy reply (the raw text kept for an unscored judgment)."""
        prompt = self.tokenizer.encode_chat(conversation, add_generation_prompt=True)[0]
        data = self.post_counted({"model": self.model, "prompt": prompt, "max_tokens": self.reply_tokens,
                                  "temperature": 0}, details)
        try:
            return data["choices"][0]["text"] or ""
        except (KeyError, IndexError, TypeError):
            raise UserError(f"judge server {self.url}: not a completions reply: {one_line(data, 120)}") from None

    # ---- the cost of a judgment

    def post_counted(self, body: dict, details: dict | None) -> dict:
        """post() to the mode's endpoint, adding to `details` the request, the prompt tokens sent
        and the prompt tokens the server reports in its usage block (None where not reported). Not
        its cached tokens: for a list of prompts vLLM 0.32 reports the first prompt's only (its
        /metrics counters, read by tests_vllm, are right)."""
        data = self.post(self.url, body)
        if details is not None:
            prompts = body.get("prompt")  # token ids (a chat request's messages are counted by the server only)
            prompts = prompts if prompts and isinstance(prompts[0], list) else [prompts or []]
            usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
            details["requests"] = details.get("requests", 0) + 1
            details["prompt_tokens_sent"] = details.get("prompt_tokens_sent", 0) + sum(map(len, prompts))
            if "messages" in body:
                details["prompt_tokens_sent"] = None
            value = usage.get("prompt_tokens")
            known = isinstance(value, int) and details.get("server_prompt_tokens", 0) is not None
            details["server_prompt_tokens"] = details.get("server_prompt_tokens", 0) + value if known else None
        return data

    # ---- trie mode: the per-node next-token log-probabilities, one prefill of the prompt

    def trie_paths(self) -> list[list[int]]:
        """The contexts whose next token is needed: the root (the prompt alone), then each node
        of the number trie (the prompt + the tokens down to that node)."""
        if self._trie_paths is None:
            trie, paths = number_trie(self.tokenizer), [[]]
            for token, parent in zip(trie.tokens, trie.parents):
                paths.append(paths[parent + 1] + [token])
            self._trie, self._trie_paths = trie, paths
        return self._trie_paths

    def node_logprobs(self, prompts: list[list[int]], details: dict | None) -> list[dict]:
        """The top-k next tokens after each prompt, as {token id: log-probability}."""
        body = {"model": self.model, "prompt": prompts, "max_tokens": 1, "temperature": 0,
                "logprobs": TOP_LOGPROBS, "return_tokens_as_token_ids": True}
        data = self.post_counted(body, details)
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
        if len(choices) != len(prompts):
            raise UserError(f"judge server {self.url}: {len(choices)} choices for {len(prompts)} prompts")
        return [self.top_of(choice) for choice in choices]

    def top_of(self, choice) -> dict[int, float]:
        try:
            top = choice["logprobs"]["top_logprobs"][0]
            if not isinstance(top, dict) or not top:
                raise TypeError
        except (KeyError, IndexError, TypeError):
            raise UserError(f"judge server {self.url} returned no top log-probabilities for logprobs="
                            f"{TOP_LOGPROBS} (vLLM serves them; for a server without them use judge mode "
                            f"'greedy')") from None
        ids = {}
        for name, value in top.items():
            if isinstance(name, str) and name.startswith("token_id:") and name[9:].isdigit():
                token_id = int(name[9:])
            else:  # a server that names tokens by their text: only the ones we need are looked up
                token_id = self.needed_by_text().get(name, -1 - len(ids))
            ids[token_id] = checked_logprob(value, self.url)
        return ids

    def needed_by_text(self) -> dict[str, int]:
        """The tokens trie mode reads, by their text (for a server that names tokens so)."""
        self.trie_paths()
        tok = self.tokenizer
        return {tok.decode([t], skip_special_tokens=False): t for t in {*self._trie.tokens, tok.im_end_id}}

    def trie_bounds(self, conversation: list[dict], details: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper bounds [101] on P(n), from the top-k lists at the trie's nodes. The
        root goes first, alone: its prefill puts the prompt in the server's prefix cache, which
        the 101 node prompts (sent together) then read. A needed token missing from a top-k list
        is bounded by 0 and the k-th probability of that list."""
        paths = self.trie_paths()
        trie, im_end = self._trie, self.tokenizer.im_end_id
        prompt = self.tokenizer.encode_chat(conversation, add_generation_prompt=True)[0]
        tops = self.node_logprobs([prompt], details) + self.node_logprobs([prompt + p for p in paths[1:]], details)

        def edge(node: int, token: int) -> tuple[float, float]:  # node 0: the root, j + 1: trie node j
            top = tops[node]
            if token in top:
                return top[token], top[token]
            return -math.inf, min(top.values())

        steps = [edge(parent + 1, token) for token, parent in zip(trie.tokens, trie.parents)]
        ends = [edge(leaf + 1, im_end) for leaf in trie.leaves]
        low, high = torch.tensor(steps, dtype=torch.float64).T  # [M] each: log P(node's token | its context)
        down = ancestors_or_self(trie).double()  # path sums; -inf * 0 would be NaN, so mask instead
        path_low = torch.where(down.bool(), low[None, :], 0.0).sum(-1)
        path_high = high @ down.T
        leaves = torch.tensor(trie.leaves)
        end_low, end_high = torch.tensor(ends, dtype=torch.float64).T
        return (path_low[leaves] + end_low).exp(), (path_high[leaves] + end_high).exp()

    # ---- the judge interface

    def ask(self, conversation: list[dict], reply: bool = True) -> Judgment:
        """One judgment with its cost (and, in trie mode, its truncation bound) in `details`;
        with reply=True an unscored log-probability judgment also gets the greedy reply. A reply
        with an impossible log-probability (NaN, infinite, above 0) is unscored, flagged
        "invalid", and never cached as scored."""
        details: dict = {"mode": self.mode}
        if self.mode == "greedy":
            body = {"model": self.model, "messages": conversation, "temperature": 0, "max_tokens": self.max_tokens}
            text = self.chat_reply(self.post_counted(body, details))
            return Judgment(parse_score(text), text, None, details)
        try:
            if self.mode == "trie":
                judgment = judgment_from_bounds(*self.trie_bounds(conversation, details), details)
            else:
                judgment = judgments_from_probs(self.number_probs(conversation, details)[None])[0]
                judgment = judgment._replace(details={**details, "flag": None})
        except InvalidReply as err:
            details["flag"] = f"invalid: {err}"
            judgment = Judgment(None, None, None, details)
        if judgment.score is None and reply:
            judgment = judgment._replace(reply=self.generate(conversation, details))
        return judgment

    def judgments(self, conversations: list[list[dict]]) -> Iterator[tuple[int, Judgment]]:
        # Concurrent requests (the server batches them); each judgment is handed back as it comes.
        if self.mode != "greedy":
            self.candidates(), self.trie_paths()  # the tokenizer loaded (or its error raised) once, before any thread
        yield from parallel(self.ask, conversations, self.workers)

    def score_one(self, prompt: str) -> float | None:
        return self.ask(first_turn(prompt), reply=False).score

    def score(self, prompts: list[str]) -> list[float | None]:
        if self.mode != "greedy":
            self.candidates(), self.trie_paths()
        scores: list[float | None] = [None] * len(prompts)
        for i, s in parallel(self.score_one, prompts, self.workers):
            scores[i] = s
        return scores


def make_judge(spec: str, *, model_name: str | None = None, device: str = "cpu", batch_size: int = 4,
               mode: str = DEFAULT_MODE, tokenizer: str | None = None, timeout: float = DEFAULT_TIMEOUT,
               deadline: float = DEFAULT_DEADLINE, workers: int | None = None):
    """A judge from its spec: 'local:<dir or hub id>' (judge.LocalJudge, loaded at the first prompt) or 'http(s)://host:port/v1' (an OpenAI-compatible base URL).
    HTTP only: mode ('trie' by default, 'logprobs' for servers that do not cache, or the 'greedy' fallback), tokenizer (the judge's tokenizer.json,
    model dir or hub id; default model_name), timeout and deadline (seconds), workers."""
    kind, target = parse_spec(spec, model_name)
    id = judge_id(spec, model_name, mode)
    if kind == "http":
        return HttpJudge(target, model_name or DEFAULT_JUDGE, mode=mode, tokenizer=tokenizer, timeout=timeout,
                         deadline=deadline, workers=workers)
    if tokenizer:
        raise UserError("--judge-tokenizer is for an HTTP judge; a local judge uses its own tokenizer")
    return LazyJudge(id, lambda: LocalJudge.load(target, device, batch_size), lambda: check_local(target))
