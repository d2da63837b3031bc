"""The README's quick start, as a new user runs it: the server on the default model
(SmolLM2-135M-Instruct, the README's flags), then every command of the README's
quick-start block, read from the README itself, each checked against what the README
says it prints. A command added to or changed in that block without a check here fails."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server_process import ServerProcess
from test_openai_api import free_port
from tools import ROOT

pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    """The command lines of the fenced block under "### Quick start" (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"^### Quick start\n.*?```sh\n(.*?)```", text, re.S | re.M)
    assert block, "README.md has no '### Quick start' section with a ```sh block"
    return [line.split("  #")[0].strip() for line in block[1].splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def server(default_model_cache, tmp_path_factory):
    data = tmp_path_factory.mktemp("quickstart")
    # the README's run flags (--http-port 8000 here on a free port), on the default model converted once for the session
    with ServerProcess(Path("default"), data, "--model-cache-dir", str(default_model_cache[0]), "--dtype", "auto",
                       "--max-seq-len", "0", "--http-port", str(free_port())) as srv:
        yield srv


def run(server: ServerProcess, line: str) -> subprocess.CompletedProcess:
    argv = shlex.split(line.replace("localhost:8000", f"127.0.0.1:{server.http_port}"))
    if argv[0] == "hotswap":  # global options are accepted after the command too
        argv = [sys.executable, "-m", "hotswap.client.cli", *argv[1:], "--target", server.target]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def check_info(r):
    assert re.search(r"^model_type\s+llama$", r.stdout, re.M) and re.search(r"^has_chat_template\s+True$", r.stdout, re.M)
    assert re.search(r"^quantization_reason  auto: no CUDA device", r.stdout, re.M)  # this CPU machine: none, and why


def check_generate(r):
    # the chat template by default: an instruct model answers instead of ending at EOS at once
    assert len(r.stdout.strip()) > 10, (r.stdout, r.stderr)
    assert re.search(r"\[\d+ tokens, (eos|length), first token", r.stderr)


def check_generate_json(r):
    g = json.loads(r.stdout)
    assert g["text"].strip() and g["generated_tokens"] > 0 and g["finish_reason"] in ("eos", "length", "stop")


def check_table(header: list[str]):
    def check(r):
        assert r.stdout.splitlines()[0].split() == header  # a fresh store: the header alone

    return check


def check_curl(r):
    body = json.loads(r.stdout)
    assert body["object"] == "chat.completion" and body["model"] == "SmolLM2-135M-Instruct"
    assert body["choices"][0]["message"]["content"].strip() and body["usage"]["completion_tokens"] > 0


CHECKS = {
    "hotswap info": check_info,
    'hotswap generate "Who are you?"': check_generate,
    'hotswap generate "Hi" --chat --temperature 0.7 --seed 1 --json': check_generate_json,
    "hotswap adapters list": check_table(["ID", "PEFT_TYPE", "RANK", "VIRTUAL", "SIZE", "RESIDENCY", "PINNED", "CREATED"]),
    "hotswap jobs list": check_table(["ID", "NAME", "METHOD", "STATE", "STEP", "ADAPTER", "CREATED"]),
    "curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' -d "
    "'{\"model\": \"SmolLM2-135M-Instruct\", \"messages\": [{\"role\": \"user\", \"content\": \"Who are you?\"}], \"max_tokens\": 32}'":
        check_curl,
}


def test_the_readme_quick_start_prints_what_it_says(server):
    commands = readme_commands()
    assert commands == list(CHECKS), "the README's quick start and this test's checks differ"
    # The banner's lines reach the log one by one after "hotswap: serving" (what the fixture waits for).
    deadline = time.monotonic() + 30
    while not any(line.strip().startswith("try:") for line in server.log().splitlines()) and time.monotonic() < deadline:
        time.sleep(0.05)
    out = server.log()
    # start-up: a few clear lines ending with where it listens and a command to try; no bitsandbytes alarm
    assert "kernels-community" not in out
    assert re.search(r"hotswap: loading SmolLM2-135M-Instruct, no quantization \(auto: no CUDA device", out)
    banner = out[out.index("hotswap: serving"):].splitlines()
    assert banner[0].startswith("hotswap: serving SmolLM2-135M-Instruct on cpu") and banner[-1].strip().startswith("try:")
    assert any(f"OpenAI API  http://localhost:{server.http_port}/v1" in line for line in banner)
    for line in commands:
        r = run(server, line)
        assert r.returncode == 0, (line, r.stdout, r.stderr)
        CHECKS[line](r)
