"""The judge's HTTP backend (judge.py holds the estimator, the local backend, the cache and
judge_all): an OpenAI-compatible server, scored by the expectation over 0..100 from its prompt
log-probabilities (mode "logprobs", vLLM's /v1/completions with echo) or, as the named fallback,
by the integer of a greedy reply (mode "greedy"); retries, per-request timeout and deadline."""
from __future__ import annotations

import http.client
import json
import math
import os
import queue
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Iterator

import torch

import model_qwen2 as mq
from judge import (API_KEY_ENV, DEFAULT_DEADLINE, DEFAULT_JUDGE, DEFAULT_TIMEOUT, NUMBERS, Judgment, check_mode,
                   first_turn, judgments_from_probs)
from model_qwen2 import UserError

def parse_score(text: str) -> float | None:
    """The first number in the reply (ASCII digits, sign and decimals read: "85", "72.5", "-1") if
    it lies in 0..100; a number outside it ("101", "-1", "100.5"), garbage or a refusal gives None,
    never a clipped or truncated score."""
    match = re.search(r"-?[0-9]+(?:\.[0-9]+)?", text or "")
    if match is None:
        return None
    value = float(match.group()) + 0.0  # + 0.0: "-0" is 0.0
    return value if 0 <= value <= 100 else None


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


class HttpJudge:
    """An OpenAI-compatible server. mode "logprobs" (default): the exact expectation from the
    server's prompt log-probabilities of the 101 candidate replies (vLLM /v1/completions,
    echo); mode "greedy": the first integer of the greedy chat reply. See the module doc."""

    def __init__(self, base_url: str, model: str = DEFAULT_JUDGE, *, mode: str = "logprobs", tokenizer=None,
                 timeout: float = DEFAULT_TIMEOUT, deadline: float = DEFAULT_DEADLINE, retries: int = 5,
                 backoff: float = 1.0, workers: int | None = None, max_tokens: int = 16, reply_tokens: int = 32,
                 api_key_env: str = API_KEY_ENV):
        self.mode = check_mode(mode)
        if not (timeout > 0 and deadline > 0):
            raise UserError(f"judge timeout {timeout} and deadline {deadline}: both must be > 0 seconds")
        self.base_url = base_url.rstrip("/")
        # The endpoint of the mode: what the error lines name.
        self.url = self.base_url + ("/completions" if mode == "logprobs" else "/chat/completions")
        self.model, self.timeout, self.deadline = model, float(timeout), float(deadline)
        self.retries, self.backoff = retries, backoff
        # A logprobs request already holds 101 sequences for the server to batch.
        self.workers = workers or (2 if mode == "logprobs" else 8)
        self.max_tokens, self.reply_tokens, self.api_key_env = max_tokens, reply_tokens, api_key_env
        self._tokenizer, self._tokenizer_lock = tokenizer, threading.Lock()
        self.tokenizer_name = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else model
        self._candidates: list[list[int]] | None = None
        # One model gives one answer (greedy decoding, or the exact probabilities), wherever it
        # is served: the id names the model and the mode, not the URL, so a cache survives a
        # server moving.
        self.id = f"http-{mode}:{model}"

    # ---- transport: one JSON POST, retried within the deadline

    def request(self, url: str, body: dict, timeout: float) -> dict:
        headers = {"Content-Type": "application/json"}
        if os.environ.get(self.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        req = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = one_line(err.read()[:400].decode(errors="replace"))
            if err.code >= 500 or err.code == 429:
                raise TransientError(f"HTTP {err.code} {detail}") from None
            hint = (f" (the API key is read from {self.api_key_env}: is it set, and the server's?)"
                    if err.code in (401, 403) else "")
            raise UserError(f"judge server {url} answered HTTP {err.code}: {detail}{hint}") from None
        except http.client.HTTPException as err:  # IncompleteRead, BadStatusLine: a reply cut short
            raise TransientError(f"{type(err).__name__}: {one_line(err)}") from None
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as err:
            reason = getattr(err, "reason", err)
            raise TransientError(f"{type(reason).__name__}: {one_line(reason)}") from None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or not isinstance(data["choices"], list) or not data["choices"]:
                raise ValueError
            return data
        except (ValueError, KeyError, TypeError):
            raise TransientError(f"not an OpenAI-compatible reply: {raw[:120]!r}") from None

    def post(self, url: str, body: dict) -> dict:
        """Retries transient failures with exponential backoff (backoff, 2 backoff, ...), each
        try within `timeout` and all of them within `deadline`, then one clear error naming
        the URL, the tries and the last failure."""
        start, tries = time.monotonic(), 0
        while True:
            tries += 1
            remaining = self.deadline - (time.monotonic() - start)
            try:
                return self.request(url, body, timeout=max(min(self.timeout, remaining), 1e-3))
            except TransientError as err:
                last = err
            elapsed = time.monotonic() - start
            wait = self.backoff * 2 ** (tries - 1)
            if tries > self.retries or elapsed + wait >= self.deadline:
                raise UserError(f"judge server {url} failed {tries} time{'s' * (tries > 1)} in {elapsed:.1f} s "
                                f"(timeout {self.timeout:g} s per request, deadline {self.deadline:g} s), "
                                f"last: {last}") from None
            time.sleep(wait)

    # ---- greedy mode

    def chat(self, conversation: list[dict]) -> str:
        body = {"model": self.model, "messages": conversation, "temperature": 0, "max_tokens": self.max_tokens}
        data = self.post(self.url, body)
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

    def number_probs(self, conversation: list[dict]) -> torch.Tensor:
        """[101] float64 P(n) from one request of the 101 candidates, echoed with logprobs:
        log P(n) = sum of the echoed log-probabilities of candidate n's tokens."""
        tok, tails = self.tokenizer, self.candidates()
        prompt = tok.encode_chat(conversation, add_generation_prompt=True)[0]
        body = {"model": self.model, "prompt": [prompt + tail for tail in tails], "max_tokens": 1,
                "temperature": 0, "echo": True, "logprobs": 1}
        data = self.post(self.url, body)
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
            logp.append(math.fsum(span))
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

    def generate(self, conversation: list[dict]) -> str:
        """The judge's greedy reply (the raw text kept for an unscored judgment)."""
        prompt = self.tokenizer.encode_chat(conversation, add_generation_prompt=True)[0]
        data = self.post(self.url, {"model": self.model, "prompt": prompt, "max_tokens": self.reply_tokens,
                                    "temperature": 0})
        try:
            return data["choices"][0]["text"] or ""
        except (KeyError, IndexError, TypeError):
            raise UserError(f"judge server {self.url}: not a completions reply: {one_line(data, 120)}") from None

    # ---- the judge interface

    def ask(self, conversation: list[dict], reply: bool = True) -> Judgment:
        """One judgment; with reply=True an unscored logprobs judgment also gets the greedy reply."""
        if self.mode == "greedy":
            text = self.chat(conversation)
            return Judgment(parse_score(text), text)
        judgment = judgments_from_probs(self.number_probs(conversation)[None])[0]
        if judgment.score is None and reply:
            judgment = judgment._replace(reply=self.generate(conversation))
        return judgment

    def judgments(self, conversations: list[list[dict]]) -> Iterator[tuple[int, Judgment]]:
        # Concurrent requests (the server batches them); each judgment is handed back as it comes.
        if self.mode == "logprobs":
            self.candidates()  # the tokenizer loaded (or its error raised) once, before any thread
        yield from parallel(self.ask, conversations, self.workers)

    def score_one(self, prompt: str) -> float | None:
        return self.ask(first_turn(prompt), reply=False).score

    def score(self, prompts: list[str]) -> list[float | None]:
        if self.mode == "logprobs":
            self.candidates()
        scores: list[float | None] = [None] * len(prompts)
        for i, s in parallel(self.score_one, prompts, self.workers):
            scores[i] = s
        return scores
