"""The OpenAI-compatible HTTP API of a real `hotswap-server` (tiny llama, loopback), driven by
the official `openai` client and by plain `curl`: plain and streamed chat and text
completions matching the gRPC path token for token, adapters as models, /v1/models,
errors in OpenAI's shape with their HTTP status, bearer auth, a full queue, cancelled
streams freeing their rows, and 503 while starting and while draining."""
from __future__ import annotations

import json
import re
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from hotswap.client import Client
from peft_fixtures import save_adapter
from server_process import ServerProcess

TOKEN = "s3cret-token"
NEW = 8
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who are you?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, token: str | None = TOKEN) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tiny_checkpoints, tmp_path_factory):
    """One server for the module. Started with its registry locked, so it sits in "starting"
    while the fixture records what the HTTP API answers then; a small batch and queue (2 + 2)
    so a full queue is cheap to reach."""
    root = tmp_path_factory.mktemp("openai")
    lora = save_adapter(AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32), "lora_mlp", root / "lora")
    data = root / "data"
    data.mkdir()
    lock = sqlite3.connect(data / "registry.sqlite", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    srv = ServerProcess(tiny_checkpoints["llama"], data, "--http-port", str(free_port()), "--auth-token", TOKEN,
                        "--max-batch-size", "2", "--max-queue", "2", "--max-message-mb", "1", "--drain-notice-seconds", "2")
    srv.start(wait_serving=False)
    try:
        base = f"http://127.0.0.1:{srv.http_port}"
        srv.starting = {path: get(base + path) for path in ("/health", "/v1/models")}
        lock.execute("ROLLBACK")
        lock.close()
        srv.wait_serving()
        srv.base = base
        with Client(srv.target, token=TOKEN) as c:
            srv.adapter = c.register_adapter("lora", str(lora)).id
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    with openai.OpenAI(base_url=f"{server.base}/v1", api_key=TOKEN, max_retries=0, timeout=120) as client:
        yield client


def test_503_while_starting_in_openai_shape(server):
    for path, (status, body) in server.starting.items():
        assert status == 503, path
        assert "starting" in body["error"]["message"] and body["error"]["code"] == "unavailable"


def test_chat_and_text_completions_match_grpc(server, oai):
    with Client(server.target, token=TOKEN) as c:
        for model, adapter in (("llama", ""), ("lora", server.adapter), (server.adapter, server.adapter)):
            want = c.generate(messages=MESSAGES, adapter=adapter, max_new_tokens=NEW, ignore_eos=True)
            got = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=NEW, temperature=0,
                                              extra_body={"ignore_eos": True})
            assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant", model
            assert got.choices[0].finish_reason == "length" and got.model == model
            assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, NEW)
            want = c.generate("the quick brown fox", adapter=adapter, max_new_tokens=NEW, ignore_eos=True)
            got = oai.completions.create(model=model, prompt="the quick brown fox", max_tokens=NEW, temperature=0,
                                         extra_body={"ignore_eos": True})
            assert got.choices[0].text == want.text and got.usage.total_tokens == want.prompt_tokens + NEW
        # lora_scale (an extension, sent in extra_body) as gRPC's; refused for the base, naming the field
        want = c.generate(messages=MESSAGES, adapter="lora", lora_scale=0.5, max_new_tokens=NEW, ignore_eos=True)
        got = oai.chat.completions.create(model="lora", messages=MESSAGES, max_tokens=NEW, temperature=0,
                                          extra_body={"ignore_eos": True, "lora_scale": 0.5})
        assert got.choices[0].message.content == want.text
        assert want.token_ids != c.generate(messages=MESSAGES, adapter="lora", max_new_tokens=NEW, ignore_eos=True).token_ids
        with pytest.raises(openai.BadRequestError) as e:
            oai.completions.create(model="llama", prompt="hi", max_tokens=2, extra_body={"lora_scale": 0.5})
        assert _error(e)["param"] == "lora_scale" and "adapter" in _error(e)["message"]
        # the adapter changes the answer (else the comparison above would prove little)
        assert c.generate(messages=MESSAGES, max_new_tokens=NEW, ignore_eos=True).token_ids != \
            c.generate(messages=MESSAGES, adapter=server.adapter, max_new_tokens=NEW, ignore_eos=True).token_ids
    # n choices, seeded: reproducible, and each choice its own draw (each is a row: 2 fit --max-queue 2)
    kw = dict(model="lora", prompt="hello world", n=2, max_tokens=NEW, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    a, b = oai.completions.create(**kw), oai.completions.create(**kw)
    assert [ch.index for ch in a.choices] == [0, 1] and [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    assert a.choices[0].text != a.choices[1].text and a.usage.completion_tokens == 2 * NEW
    # several prompts: one choice each, in order, each as if sent alone
    two = oai.completions.create(model="llama", prompt=["hello world", "once upon"], max_tokens=NEW, temperature=0)
    assert [ch.text for ch in two.choices] == [oai.completions.create(model="llama", prompt=p, max_tokens=NEW, temperature=0).choices[0].text
                                               for p in ("hello world", "once upon")]


def test_streaming_with_usage_and_logprobs(server, oai):
    whole = oai.chat.completions.create(model="lora", messages=MESSAGES, max_tokens=NEW, temperature=0, logprobs=True, top_logprobs=2,
                                        extra_body={"ignore_eos": True})
    chunks = list(oai.chat.completions.create(model="lora", messages=MESSAGES, max_tokens=NEW, temperature=0, logprobs=True,
                                              top_logprobs=2, stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole.choices[0].message.content
    streamed_lps = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed_lps] == [(t.token, t.logprob) for t in whole.choices[0].logprobs.content]
    assert len(streamed_lps) == NEW and all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in streamed_lps)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == NEW
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    # n streamed choices interleave; each, put back together, is the choice a whole response gives (seeded)
    kw = dict(model="lora", messages=MESSAGES, max_tokens=NEW, temperature=1.0, seed=3, n=2, extra_body={"ignore_eos": True})
    texts = ["", ""]
    for ch in oai.chat.completions.create(stream=True, **kw):
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in oai.chat.completions.create(**kw).choices]
    text = "".join(ch.choices[0].text for ch in oai.completions.create(model="llama", prompt="hello", max_tokens=NEW, temperature=0,
                                                                        stream=True, extra_body={"ignore_eos": True}))
    assert text == oai.completions.create(model="llama", prompt="hello", max_tokens=NEW, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text


def test_models_lists_the_base_and_every_adapter(server, oai):
    models = {m.id: m for m in oai.models.list()}
    assert set(models) == {"llama", server.adapter}
    assert models[server.adapter].parent == "llama" and models[server.adapter].root == "llama"
    assert oai.models.retrieve(server.adapter).id == server.adapter
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope@1")


def _error(exc_info) -> dict:
    return exc_info.value.body if "message" in exc_info.value.body else exc_info.value.body["error"]


def test_errors_name_the_field_with_openai_status(server, oai):
    cases = [
        (openai.NotFoundError, dict(model="no-such-adapter"), "model"),
        (openai.BadRequestError, dict(temperature=-1), "temperature"),
        (openai.BadRequestError, dict(max_tokens=5000), "max_tokens"),  # past what the 4096-token context leaves
        (openai.BadRequestError, dict(stop=[f"s{i}" for i in range(20)]), "stop"),
        (openai.BadRequestError, dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
        (openai.BadRequestError, dict(presence_penalty=0.5), "presence_penalty"),
        (openai.BadRequestError, dict(extra_body={"frobnicate": 1}), "frobnicate"),
        (openai.BadRequestError, dict(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role"),
        (openai.BadRequestError, dict(messages=[{"role": "user", "content": "x" * 140_000}]), "messages"),  # refused untokenised
    ]
    for exc, kw, param in cases:
        args = dict(model="llama", messages=MESSAGES, max_tokens=4) | kw
        with pytest.raises(exc) as e:
            oai.chat.completions.create(**args)
        err = _error(e)
        assert err["param"] == param and param in err["message"], (kw, err)
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=f"{server.base}/v1", api_key="wrong", max_retries=0).models.list()
    assert _error(e)["code"] == "unauthenticated"
    # the server is still serving after all that
    assert oai.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=2).usage.completion_tokens <= 2


def test_a_hostile_sampling_value_fails_neither_the_batch_nor_itself(server, oai):
    """top_k past int64 failed the engine step, and with it every row of the batch (500 for all);
    the largest seed with n = 2 gave the second choice a seed torch refuses (500)."""
    victim = oai.completions.create(model="llama", prompt="victim", max_tokens=400, temperature=0, stream=True,
                                    extra_body={"ignore_eos": True})
    try:
        chunks = iter(victim)
        next(ch for ch in chunks if ch.choices and ch.choices[0].text)  # the victim is running
        for top_k in (2**63, 2**100):
            out = oai.completions.create(model="llama", prompt="hi", max_tokens=2, temperature=1.0, extra_body={"top_k": top_k, "ignore_eos": True})
            assert out.usage.completion_tokens == 2
        for _ in range(5):  # the victim's stream goes on (an error event would raise here)
            assert next(chunks).choices[0].finish_reason is None
    finally:
        victim.close()
    out = oai.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=2, temperature=1.0, seed=2**64 - 1, n=2)
    assert len(out.choices) == 2


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=60, check=True)


def test_curl(server, tmp_path):
    url, auth = f"{server.base}/v1/chat/completions", f"Authorization: Bearer {TOKEN}"
    body = json.dumps({"model": "lora", "messages": MESSAGES, "max_tokens": NEW, "temperature": 0, "ignore_eos": True})
    whole = json.loads(curl(url, "-H", auth, "-H", "Content-Type: application/json", "-d", body).stdout)
    assert whole["object"] == "chat.completion" and whole["usage"]["completion_tokens"] == NEW
    lines = curl("-N", url, "-H", auth, "-d", body[:-1] + ', "stream": true}').stdout.splitlines()
    events = [line.removeprefix("data: ") for line in lines if line]
    assert all(line.startswith("data: ") for line in lines if line) and events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]) == whole["choices"][0]["message"]["content"]
    out = curl("-w", "\n%{http_code}", url, "-d", body).stdout  # no token
    assert out.endswith("\n401") and json.loads(out.rsplit("\n", 1)[0])["error"]["param"] == "authorization"
    out = curl("-w", "\n%{http_code}", url, "-H", auth, "-d", '{"model": "llama", "messages": [').stdout
    assert out.endswith("\n400") and "not valid JSON" in json.loads(out.rsplit("\n", 1)[0])["error"]["message"]
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"model": "llama", "prompt": "x" * (2 << 20)}))  # past --max-message-mb 1
    out = curl("-w", "\n%{http_code}", f"{server.base}/v1/completions", "-H", auth, "--data-binary", f"@{big}").stdout
    assert out.endswith("\n413")


def scrape(server) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m[1]) if m else 0.0


def test_full_queue_is_429_and_cancelled_streams_free_their_rows(server, oai):
    cancelled = 'hotswap_requests_finished_total{finish_reason="cancelled"}'
    before = metric(scrape(server), cancelled)
    long = dict(model="llama", messages=MESSAGES, max_tokens=4000, temperature=0, stream=True, extra_body={"ignore_eos": True})
    streams = []
    try:
        for _ in range(2):  # the whole batch (--max-batch-size 2): running once a token arrives
            s = oai.chat.completions.create(**long)
            next(ch for ch in s if ch.choices and ch.choices[0].delta.content)
            streams.append(s)
        streams += [oai.chat.completions.create(**long) for _ in range(2)]  # the whole queue (--max-queue 2)
        with pytest.raises(openai.RateLimitError) as e:
            oai.chat.completions.create(**long)
        assert "queue is full" in _error(e)["message"] and e.value.response.headers["retry-after"]
    finally:
        for s in streams:
            s.close()  # the client disconnects: each row is cancelled, not left to run 4000 tokens
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = scrape(server)
        if metric(text, cancelled) - before == 4 and metric(text, "hotswap_requests_running") == 0:
            break
        time.sleep(0.2)
    assert metric(text, cancelled) - before == 4 and metric(text, "hotswap_requests_running") == 0
    assert metric(text, "hotswap_requests_waiting") == 0
    # not streamed either: a client that hangs up mid-generation has its row cancelled, not run to the end
    body = json.dumps({"model": "llama", "messages": MESSAGES, "max_tokens": 4000, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 30
        while metric(scrape(server), "hotswap_requests_running") == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    deadline = time.monotonic() + 30
    while metric(scrape(server), cancelled) - before < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    text = scrape(server)
    assert metric(text, cancelled) - before == 5 and metric(text, "hotswap_requests_running") == 0


def test_503_while_draining_then_exit_0(server):
    """Last: SIGTERM; during --drain-notice-seconds the API answers 503, then the process exits 0."""
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    status, body = get(f"{server.base}/v1/models")
    assert status == 503 and "draining" in body["error"]["message"]
    assert server.proc.wait(60) == 0
