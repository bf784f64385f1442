"""sampling.HttpSampler against a throwaway vLLM-like server on 127.0.0.1: which LoRA module it
picks from /v1/models, its one-line errors, the request it sends per answer (seed, stops,
temperature) and the token ids it reads back. The real server: tests_vllm/ (make test-vllm)."""
import http.server
import json
import threading

import pytest

import sampling
from errors import UserError


class FakeVllm:
    def __init__(self, models):
        self.models, self.bodies = models, []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.reply({"object": "list", "data": fake.models})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.bodies.append(body)
                ids = [body["seed"] % 1000, 7, 2, 9]  # then a stop id (2) and a token after it
                self.reply({"choices": [{"index": 0, "text": "", "logprobs": {
                    "tokens": [f"token_id:{t}" for t in ids]}}]})

            def reply(self, payload):
                raw = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()


BASE = {"id": "base", "parent": None, "root": "/models/base"}
LORA = {"id": "policy", "parent": "base", "root": "/runs/r/adapter"}


@pytest.fixture
def fake():
    servers = []

    def make(models):
        servers.append(FakeVllm(models))
        return servers[-1]
    yield make
    for s in servers:
        s.httpd.shutdown()
        s.httpd.server_close()


class Tok:
    im_end_id, eos_id = 2, 0


def test_the_one_lora_module_is_picked_and_each_answer_has_its_own_seed(fake):
    server = fake([BASE, LORA])
    sampler = sampling.HttpSampler(server.url)
    record = sampler.connect()
    assert record["model"] == "policy" and record["adapter_on_server"] == "/runs/r/adapter"
    out = sampler.generate_all(Tok(), [[1, 2, 3], [4, 5]], seed=42, max_new_tokens=16, temperature=0.7)
    seeds = [sampling.request_seed(42, i) for i in range(2)]
    assert out == [[s % 1000, 7] for s in seeds]  # read back up to the stop id, without it
    bodies = sorted(server.bodies, key=lambda b: b["seed"])
    assert sorted(seeds) == [b["seed"] for b in bodies] and len(set(seeds)) == 2
    for b in bodies:
        assert (b["model"], b["temperature"], b["top_p"], b["max_tokens"]) == ("policy", 0.7, 1.0, 16)
        assert b["stop_token_ids"] == [2, 0] and b["return_tokens_as_token_ids"] is True


@pytest.mark.parametrize("models,name,why", [
    ([BASE], None, "serves no LoRA module: start vLLM with --enable-lora"),
    ([BASE, LORA, {**LORA, "id": "other"}], None, "2 LoRA modules (policy, other): name one with --sampler-model"),
    ([BASE, LORA], "nosuch", "model 'nosuch' is not served"),
    ([BASE, LORA], "base", "'base' is the base model, not a LoRA module")])
def test_a_server_that_does_not_serve_the_adapter_is_one_line(fake, models, name, why):
    server = fake(models)
    with pytest.raises(UserError) as info:
        sampling.HttpSampler(server.url, name).connect()
    assert why in str(info.value) and server.url in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("url", ["ftp://h/v1", "localhost:8000/v1", "http://h:99999/v1", "http://h/v1?x=1"])
def test_a_malformed_sampler_url_is_one_line_naming_the_flag(url):
    import judge
    with pytest.raises(UserError) as info:
        judge.check_url(url, "--sampler")
    assert str(info.value).startswith(f"--sampler {url!r}") and "\n" not in str(info.value)
