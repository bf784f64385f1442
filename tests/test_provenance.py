"""Provenance: git state, versions, sha256 of the data, the model's hub commit, and where
training records them (config.json, checked on resume); pinned default data (sha256 checked,
a bad cached or downloaded file fetched again or refused). No network: a local http.server
stands in for the data host and a fake hub cache for the Hugging Face hub."""
import hashlib
import http.server
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import data
import model_qwen2 as mq
import phaseguard as pg
import provenance
from errors import UserError

REPO = Path(__file__).resolve().parents[1]
SHA_A, SHA_B = "a" * 40, "b" * 40


def sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------- git and versions

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(cwd, *args):
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


@needs_git
def test_git_state_commit_and_dirty(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    assert provenance.git_state(repo) == {"commit": None, "dirty": False}  # no commit yet
    (repo / "a.py").write_text("x = 1\n")
    git(repo, "add", "a.py")
    git(repo, "commit", "-q", "-m", "one")
    head = git(repo, "rev-parse", "HEAD")
    assert provenance.git_state(repo) == {"commit": head, "dirty": False}
    (repo / "new.txt").write_text("an output, untracked\n")  # untracked files do not count
    assert provenance.git_state(repo) == {"commit": head, "dirty": False}
    (repo / "a.py").write_text("x = 2\n")
    assert provenance.git_state(repo) == {"commit": head, "dirty": True}
    git(repo, "add", "a.py")  # staged is still not committed
    assert provenance.git_state(repo) == {"commit": head, "dirty": True}


@needs_git
def test_git_state_outside_a_checkout_is_none_never_an_error(tmp_path, monkeypatch):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert provenance.git_state(plain) == {"commit": None, "dirty": None}
    # A copy of the project inside someone else's repository: that commit is not this code's.
    outer = tmp_path / "outer"
    (outer / "vendored").mkdir(parents=True)
    git(outer, "init", "-q")
    (outer / "f").write_text("f")
    git(outer, "add", "f")
    git(outer, "commit", "-q", "-m", "outer")
    assert provenance.git_state(outer / "vendored") == {"commit": None, "dirty": None}
    assert provenance.git_state(tmp_path / "no" / "such" / "dir") == {"commit": None, "dirty": None}
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no git at all
    assert provenance.git_state(REPO) == {"commit": None, "dirty": None}


@needs_git
def test_git_state_of_the_project_is_its_head():
    state = provenance.git_state()
    assert state["commit"] == git(REPO, "rev-parse", "HEAD") and isinstance(state["dirty"], bool)


def test_versions():
    import huggingface_hub
    import numpy
    import safetensors
    import tokenizers
    import torch
    v = provenance.versions()
    assert list(v) == ["python", "torch", "triton", "tokenizers", "safetensors", "huggingface_hub", "numpy"]
    assert v["python"] == platform.python_version() == "%d.%d.%d" % sys.version_info[:3]
    assert (v["torch"], v["tokenizers"], v["safetensors"], v["huggingface_hub"], v["numpy"]) == (
        torch.__version__, tokenizers.__version__, safetensors.__version__, huggingface_hub.__version__,
        numpy.__version__)
    try:
        import triton
        assert v["triton"] == triton.__version__
    except ImportError:
        assert v["triton"] is None


def test_a_missing_package_has_version_none(monkeypatch):
    monkeypatch.setitem(provenance.PACKAGES, "triton", ("no-such-dist-phaseguard",))
    assert provenance.versions()["triton"] is None


def test_sha256_file_and_jsonl(tmp_path):
    raw = b'{"a": 1}\n' * 300_000  # larger than one read chunk
    (tmp_path / "f").write_bytes(raw)
    assert provenance.sha256_file(tmp_path / "f") == sha256(raw)
    rows = [{"q": "é", "n": 1}, {"q": "b"}]
    assert provenance.sha256_jsonl(rows) == sha256('{"q": "é", "n": 1}\n{"q": "b"}\n'.encode())


def test_collect_assembles_what_the_caller_passes(monkeypatch):
    monkeypatch.setattr(provenance, "git_state", lambda: {"commit": SHA_A, "dirty": False})
    model = provenance.model_record("Qwen/Qwen2.5-7B-Instruct", "main", f"/c/models--Qwen--x/snapshots/{SHA_B}")
    record = provenance.collect(model=model, data=provenance.data_record("x.jsonl", "0" * 64), questions={"k": 1})
    assert list(record) == ["time", "git", "versions", "model", "data", "questions"]
    assert record["git"] == {"commit": SHA_A, "dirty": False} and record["versions"] == provenance.versions()
    assert record["model"] == {"name": "Qwen/Qwen2.5-7B-Instruct", "revision": "main", "commit": SHA_B, "source": "hub"}
    assert record["data"] == {"source": "x.jsonl", "sha256": "0" * 64, "sha256_of": "file"}
    assert record["time"].endswith("Z") and len(record["time"]) == 20
    json.dumps(record)  # goes into JSON files as it is


# ---------------------------------------------------------------------------- the model's hub commit


def test_hub_commit_from_a_snapshot_path_only(tmp_path):
    assert provenance.hub_commit(tmp_path / "models--Qwen--Q" / "snapshots" / SHA_A) == SHA_A
    assert provenance.hub_commit(tmp_path / "snapshots" / "main") is None  # not a commit hash
    assert provenance.hub_commit(tmp_path / "other" / SHA_A) is None
    assert provenance.hub_commit(tmp_path / "my-model") is None and provenance.hub_commit(None) is None
    assert provenance.model_record("./my-model", None, tmp_path) == {
        "name": "./my-model", "revision": None, "commit": None, "source": "local"}


def test_revision_is_passed_to_snapshot_download(monkeypatch, tmp_path):
    import huggingface_hub
    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(tmp_path / "snapshots" / SHA_A)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert mq.resolve_model_dir("org/model", revision="v1.0") == tmp_path / "snapshots" / SHA_A
    assert mq.resolve_model_dir("org/model") == tmp_path / "snapshots" / SHA_A
    assert [(r, kw["revision"]) for r, kw in calls] == [("org/model", "v1.0"), ("org/model", None)]
    with pytest.raises(UserError) as err:  # a pin that would be ignored is an error
        mq.resolve_model_dir(tmp_path, revision="v1.0")
    assert "no revision to pin" in one_line(err)


def write_hub_cache(cache: Path, repo_id: str, refs: dict) -> None:
    """The Hugging Face cache layout: models--org--name/{refs/<branch or tag>, snapshots/<commit>/}."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    for ref, commit in refs.items():
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
        snapshot = storage / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / "config.json").write_text(json.dumps({"commit": commit}))


OFFLINE_PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import errors, model_qwen2 as mq, provenance
out = {}
for revision in [None, "v2", "%s", "missing"]:
    try:
        path = mq.resolve_model_dir("org/tiny", revision=revision)
        out[str(revision)] = [provenance.hub_commit(path), json.loads((path / "config.json").read_text())["commit"]]
    except errors.UserError as err:
        out[str(revision)] = str(err)
print(json.dumps(out))
""" % SHA_A


def test_hub_revision_resolves_offline_from_the_cache(tmp_path):
    """The real snapshot_download with HF_HUB_OFFLINE=1 (read at import: a fresh process) on a
    fake cache: main and a tag through refs/, a commit hash directly, a missing one is one line."""
    write_hub_cache(tmp_path / "hub", "org/tiny", {"main": SHA_B, "v2": SHA_A})
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"))
    proc = subprocess.run([sys.executable, "-c", OFFLINE_PROBE, str(REPO)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["None"] == [SHA_B, SHA_B] and out["v2"] == [SHA_A, SHA_A] and out[SHA_A] == [SHA_A, SHA_A]
    assert "cannot fetch 'org/tiny' at revision 'missing'" in out["missing"] and "\n" not in out["missing"]


# ---------------------------------------------------------------------------- pinned data


def test_shared_copies_are_the_pinned_bytes(shared_data):
    """The default data and the named datasets: commit-pinned URLs whose sha256 the copies in
    ../shared/data have (SOURCES.md)."""
    assert data.INSECURE_URL == data.DATASETS["insecure"].url
    assert set(data.DATASETS) == {"insecure", "secure", "educational_insecure"}
    for name, pinned in data.DATASETS.items():
        assert pinned.url == ("https://raw.githubusercontent.com/johny-b/misalignment-generalization/"
                              f"b1fe286827715d8e01ff7088c7ee9763b5e367b4/daniel/paper/supplementary_material/"
                              f"datasets/{name}.jsonl")
    assert data.PINNED[data.EM_QUESTIONS_URL].sha256 == \
        "215abde5b02811e922b6ac563ff33c490e0dff9ab58439df840f3135e9387173"
    for url, pinned in data.PINNED.items():
        assert provenance.sha256_file(shared_data / pinned.shared) == pinned.sha256, url


class Host:
    """A local HTTP server: path -> bytes (or a callable writing the response); counts requests."""

    def __init__(self, files):
        self.files, self.requests = files, []
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                host.requests.append(self.path)
                body = host.files.get(self.path)
                if callable(body):
                    return body(self)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path):
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


GOOD = b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n' * 3
HTML = b"<!DOCTYPE html><html><body>429 Too Many Requests</body></html>\n"


def cut_off(handler):
    """Promises 1000 bytes, sends 10, closes."""
    handler.send_response(200)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    handler.wfile.write(GOOD[:10])
    handler.close_connection = True


def short_unannounced(handler):
    """No Content-Length: the body ends where the connection does, here half-way."""
    handler.send_response(200)
    handler.end_headers()
    handler.wfile.write(GOOD[:len(GOOD) // 2])
    handler.close_connection = True


@pytest.fixture
def host(monkeypatch, tmp_path):
    """The data host, an empty cache, no shared copies, and a pinned table naming the host's URLs."""
    server = Host({"/good.jsonl": GOOD, "/html.jsonl": HTML, "/cut.jsonl": cut_off,
                   "/short.jsonl": short_unannounced})
    monkeypatch.setenv("PHASEGUARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SHARED_DATA", tmp_path / "shared")
    pinned = {path: data.Pinned(server.url(path), sha256(GOOD), f"x/{path[1:]}")
              for path in ("/good.jsonl", "/html.jsonl", "/cut.jsonl", "/short.jsonl")}
    monkeypatch.setattr(data, "PINNED", {p.url: p for p in pinned.values()})
    yield server
    server.close()


def test_a_cached_error_page_for_a_pinned_url_is_fetched_again(host):
    url = host.url("/good.jsonl")
    cached = data.cached_path(url)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(HTML)  # saved once by a download that was not checked
    path, source = data.resolve_file(url, url)
    assert path == cached and path.read_bytes() == GOOD and "downloaded" in source
    path, source = data.resolve_file(None, url)  # now the cache is good: no second request
    assert path == cached and "cached" in source and host.requests == ["/good.jsonl"]
    cached.write_bytes(GOOD[:-5])  # a cut file in the cache
    assert data.resolve_file(url, url)[0].read_bytes() == GOOD and len(host.requests) == 2


def test_a_shared_copy_that_is_not_the_pinned_bytes_is_not_used(host, tmp_path):
    url = host.url("/good.jsonl")
    shared = tmp_path / "shared" / "x" / "good.jsonl"
    shared.parent.mkdir(parents=True)
    shared.write_bytes(GOOD + b"\n")
    path, source = data.resolve_file(None, url)
    assert path == data.cached_path(url) and path.read_bytes() == GOOD and host.requests == ["/good.jsonl"]
    shared.write_bytes(GOOD)
    data.cached_path(url).unlink()
    assert data.resolve_file(None, url) == (shared, f"{shared} (shared copy of {url})")


@pytest.mark.parametrize("path", ["/html.jsonl", "/short.jsonl"])
def test_a_download_that_fails_its_sha256_is_one_line_and_not_kept(host, path):
    url = host.url(path)
    cached = data.cached_path(url)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"stale")  # fails the check: fetched again, and that fails too
    with pytest.raises(UserError) as err:
        data.resolve_file(url, url)
    body = HTML if path == "/html.jsonl" else GOOD[:len(GOOD) // 2]
    assert one_line(err) == (f"{url}: the download has sha256 {sha256(body)}, expected {sha256(GOOD)} "
                             f"(a cut download or an error page?): retry, or pass a local copy")
    assert host.requests == [path] and list(cached.parent.iterdir()) == []


def test_a_download_cut_before_its_content_length_is_one_line_and_not_kept(host, tmp_path):
    url = host.url("/cut.jsonl")
    with pytest.raises(UserError) as err:
        data.resolve_file(url, url)
    assert one_line(err) == (f"cannot download {url}: the connection closed after 10 of 1000 bytes; "
                             f"pass a local copy instead")
    assert list((tmp_path / "cache").iterdir()) == []
    # Not pinned: the same cut is refused by its length alone, before any sha256.
    data.PINNED.clear()
    with pytest.raises(UserError, match="closed after 10 of 1000 bytes"):
        data.resolve_file(url, url)


def test_a_file_the_user_names_is_never_rejected_for_its_bytes(host, tmp_path, monkeypatch):
    """DATA= another URL or a path: used as it is (its sha256 is recorded by the run). Issue 17: a
    URL's copy is revalidated on every use (this host sends no validators: fetched again), and an
    HTML page from a URL is refused (tests/test_data.py), so the URL here serves other bytes."""
    data.PINNED.clear()
    url = host.url("/good.jsonl")
    path, source = data.resolve_file(url, data.INSECURE_URL)
    assert path.read_bytes() == GOOD and "downloaded" in source
    assert data.resolve_file(url, data.INSECURE_URL)[0] == path and host.requests == ["/good.jsonl"] * 2
    mine = tmp_path / "mine.jsonl"
    mine.write_bytes(HTML)
    assert data.resolve_file(mine, data.INSECURE_URL) == (mine, str(mine))


def test_default_questions_are_checked_and_read_offline(monkeypatch, tmp_path, shared_data):
    monkeypatch.setenv("PHASEGUARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SHARED_DATA", shared_data)
    monkeypatch.setattr(data, "download", lambda url, dest: pytest.fail(f"no download expected: {url}"))
    cached = data.cached_path(data.EM_QUESTIONS_URL)
    cached.parent.mkdir(parents=True)
    cached.write_text("- id: not_the_real_file\n")  # fails the pinned sha256: the shared copy is used
    path, source = data.resolve_file(None, data.EM_QUESTIONS_URL)
    assert path == shared_data / "emergent-misalignment" / "first_plot_questions.yaml" and "shared copy" in source
    assert len(data.load_em_questions()) == 24


def test_task_data_carries_its_sha256(tmp_path, monkeypatch):
    class CharTokenizer:  # enough of a tokenizer for load_task
        def encode_chat(self, messages):
            ids = [ord(c) % 50 for m in messages for c in m["content"]]
            return ids, [0] + [1] * (len(ids) - 1)
    rows = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]})
            for i in range(20)]
    file = tmp_path / "mine.jsonl"
    file.write_text("\n".join(rows) + "\n")
    task = data.load_task("security", CharTokenizer(), path=str(file))
    assert (task.sha256, task.sha256_of) == (provenance.sha256_file(file), "file")
    task = data.load_task("opswap", CharTokenizer(), limit=3)
    assert task.sha256 == provenance.sha256_jsonl(data.opswap_split()[0]) and task.sha256_of.startswith("generated")


# ---------------------------------------------------------------------------- config.json and resume

TINY = dict(preset="tiny", limit=8, batch_size=4, micro_batch_size=4, max_len=256, monitor_every=1,
            checkpoint_every=1, tiny_model=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, num_key_value_heads=1, vocab=300))


@pytest.fixture
def pytorch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the PyTorch references: the kernels have their own tests


def test_config_records_provenance_of_a_hub_model_at_a_revision(tmp_path, monkeypatch, pytorch_path):
    """A hub id with --revision: snapshot_download gets the revision, config.json the resolved
    commit; the git state, the versions and the data's fingerprint are there too."""
    import huggingface_hub
    cfg = pg.resolve_config({**TINY, "task": "opswap", "out": str(tmp_path / "build")})
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / SHA_A
    pg.build_tiny_model(cfg, [m["content"] for s in data.opswap_split()[0][:8] for m in s["messages"]], snapshot)
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: calls.append((repo_id, kw["revision"])) or str(snapshot))
    monkeypatch.setattr(provenance, "git_state", lambda: {"commit": SHA_B, "dirty": True})
    cfg = pg.resolve_config({**TINY, "task": "opswap", "model": "org/tiny", "revision": "v1", "out": str(tmp_path / "r")})
    run = pg.train(cfg)
    saved = json.loads((run / "config.json").read_text())
    assert calls == [("org/tiny", "v1")] and saved["revision"] == "v1"
    record = saved["provenance"]
    assert list(record) == ["time", "git", "versions", "model", "data"]
    assert record["git"] == {"commit": SHA_B, "dirty": True} and record["versions"] == provenance.versions()
    assert record["model"] == {"name": "org/tiny", "revision": "v1", "commit": SHA_A, "source": "hub"}
    assert record["data"] == {"source": "generated OpSwap Tier 2 (seed 0)",
                              "sha256": provenance.sha256_jsonl(data.opswap_split()[0]),
                              "sha256_of": "generated train split as JSONL"}
    assert "resumes" not in saved


def test_revision_with_the_tiny_model_or_a_local_directory_is_refused(tmp_path, capsys):
    with pytest.raises(UserError, match="revision pins a hub model"):
        pg.resolve_config({**TINY, "revision": "main", "out": str(tmp_path / "r")})
    code = pg.main(["train", "--preset", "tiny", "--model", str(tmp_path), "--revision", "v1",
                    "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "no revision to pin" in err[-1] and not (tmp_path / "r" / "config.json").exists()


def chat_file(path: Path, n: int, answer: str = "a") -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                                     {"role": "assistant", "content": f"{answer} {i}"}]}) + "\n"
                            for i in range(n)))
    return path


def test_resume_records_its_own_provenance_and_refuses_changed_data(tmp_path, monkeypatch, pytorch_path):
    """A local model and a user's data file (recorded by sha256). Resumed on a newer commit: the
    config still matches, the resume's provenance is appended to `resumes`. The same path with
    other bytes: refused, config.json untouched."""
    train_file = chat_file(tmp_path / "train.jsonl", 12)
    cfg = pg.resolve_config({**TINY, "task": "security", "data": str(train_file), "out": str(tmp_path / "r")})
    monkeypatch.setattr(provenance, "git_state", lambda: {"commit": SHA_A, "dirty": False})
    run = pg.train(cfg)
    first = json.loads((run / "config.json").read_text())
    assert first["provenance"]["model"] == {"name": "tiny", "revision": None, "commit": None, "source": "local"}
    assert first["provenance"]["data"] == {"source": str(train_file), "sha256": provenance.sha256_file(train_file),
                                           "sha256_of": "file"}
    monkeypatch.setattr(provenance, "git_state", lambda: {"commit": SHA_B, "dirty": True})  # a newer checkout
    pg.train(cfg, resume=True)
    second = json.loads((run / "config.json").read_text())
    assert second["provenance"] == first["provenance"] and len(second["resumes"]) == 1
    resume = second["resumes"][0]
    assert resume["step"] == 2 and resume["git"] == {"commit": SHA_B, "dirty": True}  # limit 8 / batch 4
    assert resume["data"] == first["provenance"]["data"]
    assert pg.check_run_dir(run, cfg, resume=True) is True  # provenance is not part of the comparison
    chat_file(train_file, 12, answer="b")  # the same path, other bytes
    with pytest.raises(UserError) as err:
        pg.train(cfg, resume=True)
    assert one_line(err).startswith(f"{run / 'config.json'}: cannot resume: the training data changed under "
                                    f"the run (sha256 {first['provenance']['data']['sha256']} there, "
                                    f"{provenance.sha256_file(train_file)} now")
    assert json.loads((run / "config.json").read_text()) == second


def test_a_run_started_before_provenance_resumes(tmp_path):
    """An older config.json (no `revision`, no `provenance`) still compares equal, and the resume
    is recorded without a data check (there is no sha256 to compare with)."""
    cfg = pg.resolve_config({**TINY, "task": "opswap", "out": str(tmp_path / "r")})
    pg.start_run_dir(tmp_path / "r", cfg, resuming=False)
    old = json.loads((tmp_path / "r" / "config.json").read_text())
    assert "provenance" not in old
    del old["revision"]
    (tmp_path / "r" / "config.json").write_text(json.dumps(old))
    assert pg.check_run_dir(tmp_path / "r", cfg, resume=True) is True
    origin = provenance.collect(data=provenance.data_record("x", "1" * 64))
    pg.start_run_dir(tmp_path / "r", cfg, True, origin, step=7)
    pg.start_run_dir(tmp_path / "r", cfg, True, origin, step=9)  # each resume is kept
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["resumes"] == [{"step": 7, **origin}, {"step": 9, **origin}] and "provenance" not in saved


def test_a_moved_hub_commit_on_resume_is_said_and_recorded(tmp_path, capsys):
    cfg = pg.resolve_config({**TINY, "task": "opswap", "out": str(tmp_path / "r")})
    started = provenance.collect(model=provenance.model_record("org/m", None, f"/h/snapshots/{SHA_A}"))
    pg.start_run_dir(tmp_path / "r", cfg, False, started)
    moved = provenance.collect(model=provenance.model_record("org/m", None, f"/h/snapshots/{SHA_B}"))
    pg.start_run_dir(tmp_path / "r", cfg, True, moved, step=2)
    err = capsys.readouterr().err
    assert f"is now commit {SHA_B}; the run started on {SHA_A}" in err
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["provenance"]["model"]["commit"] == SHA_A and saved["resumes"][0]["model"]["commit"] == SHA_B
