"""Sampling for the evaluation: batched generation with the adapters merged (and the base
weights restored exactly afterwards), reference log-probabilities of answers, and the
best-of-N baseline (the paper's Sec. 4.1: Best-of-8, the candidate with the highest reference
log-probability kept)."""
from __future__ import annotations

import contextlib

import torch

import lora
import model_qwen2 as mq
from errors import UserError



@contextlib.contextmanager
def merged(model):
    """Adapters merged into the weights for sampling speed; afterwards the base weights are
    copied back from a CPU copy taken before merging. Unmerging (W + dW - dW) would leave
    W off by one rounding in places (1 ulp in bf16), and best-of-N scores answers under
    that reference, which must be the base model exactly."""
    layers = list(lora.lora_layers(model).values())
    originals = [layer.weight.detach().to("cpu", copy=True) for layer in layers]
    lora.merge(model)
    try:
        yield model
    finally:
        with torch.no_grad():
            for layer, weight in zip(layers, originals):
                layer.weight.copy_(weight)
                layer.merged = False


def generate_all(model, tokenizer, prompts: list[list[int]], *, seed: int, max_new_tokens: int, batch_size: int,
                 temperature: float = 1.0) -> list[list[int]]:
    """Answer ids for every prompt, batched by length; temperature 1, top-p 1 (greedy at 0).
    Callers merge the adapters first (`merged`)."""
    from tqdm import tqdm
    device = model.lm_head.weight.device
    generator = torch.Generator(device).manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in tqdm(range(0, len(order), batch_size), desc=f"sampling {len(prompts)} answers", unit="batch",
                      dynamic_ncols=True, leave=False):
        chunk = order[start:start + batch_size]
        gen = mq.generate(model, [prompts[i] for i in chunk], max_new_tokens, temperature=temperature,
                          top_p=1.0, generator=generator, tokenizer=tokenizer)
        for i, ids in zip(chunk, gen.ids):
            out[i] = ids
    return out


@torch.no_grad()
def mean_logprobs(model, tokenizer, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8) -> list[float]:
    """Mean log-probability per answer token of each (prompt, answer) under `model` as it is
    (wrap in lora.disabled for the reference); -inf for an empty answer."""
    device = model.lm_head.weight.device
    scores = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        T = max(len(p) + len(a) for p, a in chunk)
        ids = torch.full((len(chunk), T), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, (p, a) in enumerate(chunk):  # right padding: the answer starts at len(p)
            ids[b, :len(p) + len(a)] = torch.tensor(p + a)
            mask[b, :len(p) + len(a)] = 1
        hidden = model.hidden_states(ids.to(device), mask.to(device))
        for b, (p, a) in enumerate(chunk):
            if not a:
                scores.append(float("-inf"))
                continue
            logits = model.lm_head(hidden[b, len(p) - 1:len(p) + len(a) - 1]).float()
            logits[:, tokenizer.vocab_size:] = float("-inf")
            logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(a, device=device)[:, None])
            scores.append(logp.mean().item())
    return scores


def sample_candidates(model, tokenizer, prompts: list[list[int]], n: int, *, seed: int, max_new_tokens: int,
                      batch_size: int) -> list[list[int]]:
    """n answers per prompt from the model as it is (callers merge the adapters), grouped by prompt."""
    return generate_all(model, tokenizer, [p for p in prompts for _ in range(n)], seed=seed,
                        max_new_tokens=max_new_tokens, batch_size=batch_size)


def pick_best(model, tokenizer, prompts: list[list[int]], candidates: list[list[int]], n: int) -> list[dict]:
    """Each prompt's n candidates scored by their mean reference log-probability (adapters
    disabled, unmerged model), the highest kept (Sec. 4.1, method 5: Best-of-8)."""
    with lora.disabled(model):
        scores = mean_logprobs(model, tokenizer, [(prompts[i // n], a) for i, a in enumerate(candidates)])
    picks = []
    for q in range(len(prompts)):
        group = scores[q * n:(q + 1) * n]
        best = max(range(n), key=lambda j: group[j])
        picks.append({"ids": candidates[q * n + best], "chosen": best, "ref_logprobs": group})
    return picks


# ----------------------------------------------------------------------------
# Sampling through a vLLM server (make eval SAMPLER=http://HOST:8000/v1)

SAMPLER_KEY_ENV = "PHASEGUARD_SAMPLER_API_KEY"  # Bearer token for the sampler server, if it wants one


def request_seed(seed: int, index: int) -> int:
    """The server-side seed of answer `index` (vLLM's per-request `seed`): distinct per answer,
    fixed by (seed, index), so a rerun asks for the same samples."""
    return (seed * 1_000_003 + index) % (2 ** 31)


class HttpSampler:
    """The evaluation's answers from an OpenAI-compatible server (vLLM) that serves the run's
    adapter as a LoRA module: /v1/completions on token-id prompts, temperature and top-p as in
    process, one request per prompt with its own seed (request_seed), the answer's token ids
    read back (return_tokens_as_token_ids), without the stop token, as model_qwen2.generate
    gives them. The server's random stream is not torch's: sampled answers differ from in-process
    ones (greedy ones are the same), and results.json records which sampler made them."""

    def __init__(self, base_url: str, model: str | None = None, *, adapter_rank: int | None = None,
                 timeout: float = 600.0, deadline: float = 1800.0, workers: int = 8):
        from judge_http import HttpClient
        self.base_url, self.requested, self.workers = base_url.rstrip("/"), model, workers
        self.client = HttpClient(timeout, deadline, retries=5, backoff=1.0, api_key_env=SAMPLER_KEY_ENV)
        self.client.role = "sampler"
        self.model, self.root, self.adapter_rank = model, None, adapter_rank

    def connect(self) -> dict:
        """Reads the server's model list and picks the LoRA module: the one named, else the only
        one. The base model, a name not served, or no module at all is one clear error."""
        try:
            listed = self.client.post(self.base_url + "/models", None, expect="data")["data"]
        except UserError as err:  # vLLM exits at startup when an adapter's rank is above --max-lora-rank
            rank = f" (this run's adapter has r = {self.adapter_rank})" if self.adapter_rank else ""
            raise UserError(f"--sampler: {err}; is the server up? vLLM exits at startup when a --lora-modules "
                            f"adapter's rank is above --max-lora-rank{rank}") from None
        served = {m.get("id"): m for m in listed if isinstance(m, dict)}
        modules = [name for name, m in served.items() if m.get("parent")]
        hint = "start vLLM with --enable-lora --lora-modules NAME=<run>/adapter (--max-lora-rank >= the adapter's r)"
        if self.requested is not None and self.requested not in served:
            raise UserError(f"--sampler {self.base_url}: model {self.requested!r} is not served "
                            f"(served: {', '.join(map(repr, served))}); {hint}")
        if self.requested is not None and self.requested not in modules:
            raise UserError(f"--sampler {self.base_url}: {self.requested!r} is the base model, not a LoRA module "
                            f"(the run's adapter would not be used); {hint}")
        if self.requested is None and len(modules) != 1:
            what = "no LoRA module" if not modules else f"{len(modules)} LoRA modules ({', '.join(modules)})"
            raise UserError(f"--sampler {self.base_url} serves {what}: "
                            + (hint if not modules else "name one with --sampler-model"))
        self.model = self.requested or modules[0]
        self.root = served[self.model].get("root")
        return self.record()

    def record(self) -> dict:
        return {"url": self.base_url, "model": self.model, "adapter_on_server": self.root,
                "seeds": "per answer: (seed * 1000003 + index) mod 2^31 as vLLM's request seed"}

    def generate_all(self, tokenizer, prompts: list[list[int]], *, seed: int, max_new_tokens: int,
                     temperature: float = 1.0, **_) -> list[list[int]]:
        """generate_all's contract (batch_size is the server's business), through the server."""
        from judge_http import parallel
        stops = [tokenizer.im_end_id, tokenizer.eos_id]

        def one(item):
            index, prompt = item
            body = {"model": self.model, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": temperature,
                    "top_p": 1.0, "seed": request_seed(seed, index), "stop_token_ids": stops, "logprobs": 0,
                    "return_tokens_as_token_ids": True}
            choice = self.client.post(self.base_url + "/completions", body)["choices"][0]
            try:
                ids = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
            except (KeyError, TypeError, ValueError, AttributeError):
                raise UserError(f"sampler {self.base_url}: no token ids in the reply (a vLLM server returns them "
                                f"with return_tokens_as_token_ids)") from None
            return ids[:next((k for k, t in enumerate(ids) if t in stops), len(ids))]

        out: list[list[int]] = [[] for _ in prompts]
        for i, ids in parallel(one, list(enumerate(prompts)), self.workers):
            out[i] = ids
        return out
