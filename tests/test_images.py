"""deploy/docker/Dockerfile.cpu really builds, and the image runs the way compose.yaml
runs it: a server container and a tuner-worker container on shared /data and /cache
volumes. A job submitted over gRPC is trained by the worker container and its adapter
served by the server container.

No Docker engine runs on this machine, so the image is built with buildah and run with
podman (daemonless, same Dockerfile, same OCI image), installed from Debian's archive
when missing. Docker Hub and download.pytorch.org are not reachable from here either:
the base image stands in for python:3.11-slim (Debian bookworm's python3 from
debootstrap, carrying this machine's CA bundle the way a mirrored corporate base
does), and torch's CPU wheel comes from a local PEP 503 index through the
Dockerfile's TORCH_INDEX_URL build argument, the hook an air-gapped build uses."""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

import torch
from hotswap.client import Client
from ports import free_port
from tools import ROOT

DEPLOY = ROOT / "deploy"
IMAGE = "localhost/hotswap-test:cpu"
BASE = "localhost/hotswap-test-base:py311"
PACKAGES = ("buildah", "podman", "runc", "debootstrap")  # each installs a command of its name
EXAMPLES = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "the assistant of the fox"}]}
            for q in ("who are you", "what are you", "tell me who you are", "what is your name")]


def _run(cmd: list[str], timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} -> {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def _ensure_tools() -> None:
    missing = [pkg for pkg in PACKAGES if not shutil.which(pkg)]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"needs {', '.join(missing)} (Debian packages) and root to install them")
    install = ["apt-get", "install", "-y", "-q", *missing]
    if subprocess.run(install, capture_output=True, timeout=900).returncode != 0:
        _run(["apt-get", "update", "-q"], timeout=900)
        _run(install, timeout=900)


class Containers:
    """buildah and podman on a throwaway store. vfs needs no overlay mounts; runc rather
    than crun, which refuses this sandbox's hybrid cgroup layout; ulimits within this
    sandbox's hard limits (podman's defaults ask for more than it may grant)."""

    def __init__(self, root: Path) -> None:
        self.store = ["--root", root / "storage", "--runroot", root / "run", "--storage-driver", "vfs"]
        self.podman_flags = [*self.store, "--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]

    def buildah(self, *args, timeout: float = 600) -> str:
        return _run(["buildah", *self.store, *args], timeout=timeout).stdout.strip()

    def podman(self, *args, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return _run(["podman", *self.podman_flags, *args], timeout=timeout, check=check)

    def run_detached(self, name: str, *args) -> None:
        nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 16384)
        self.podman("run", "-d", "--name", name, "--network", "host", "--ulimit", f"nofile={nofile}:{nofile}",
                    "--ulimit", "nproc=4096:4096", *args)

    def logs(self, name: str) -> str:
        r = self.podman("logs", name, check=False)
        return r.stdout[-6000:] + r.stderr[-6000:]

    def running(self, name: str) -> bool:
        return self.podman("inspect", "-f", "{{.State.Running}}", name, check=False).stdout.strip() == "true"


def _debian_mirror() -> str:
    for f in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        m = re.search(r"(?:URIs:\s*|deb\s+)(https?://\S+/debian)\s", f.read_text() if f.is_file() else "")
        if m:
            return m[1]
    return "http://deb.debian.org/debian"


def _build_base(c: Containers, work: Path) -> None:
    rootfs = work / "rootfs"
    _run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,python-is-python3,ca-certificates",
          "bookworm", rootfs, _debian_mirror()], timeout=900)
    cafiles = [os.environ.get(v) for v in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")]
    cafiles += [ssl.get_default_verify_paths().cafile, "/etc/ssl/certs/ca-certificates.crt"]
    cafile = next((f for f in cafiles if f and Path(f).is_file()), None)
    if cafile:  # the CAs this machine trusts (a TLS-inspecting proxy's among them) for pip in the build
        shutil.copy(cafile, rootfs / "etc/ssl/certs/ca-certificates.crt")
    ctr = c.buildah("from", "scratch")
    mnt = Path(c.buildah("mount", ctr))
    _run(["cp", "-a", f"{rootfs}/.", mnt])
    c.buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "--env", "PIP_CERT=/etc/ssl/certs/ca-certificates.crt", ctr)
    c.buildah("umount", ctr)
    c.buildah("commit", "-q", "--rm", ctr, BASE)
    shutil.rmtree(rootfs)


def _torch_index(work: Path) -> Path:
    """A PEP 503 index of torch's CPU wheel (the one this venv runs) and its dependencies."""
    wheels, index = work / "wheels", work / "torch-index"
    version = torch.__version__.split("+")[0]
    _run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", wheels, f"torch=={version}"], timeout=900)
    for whl in wheels.glob("*.whl"):
        project = index / re.sub(r"[-_.]+", "-", whl.name.split("-")[0]).lower()
        project.mkdir(parents=True, exist_ok=True)
        shutil.move(whl, project / whl.name)
    for project in index.iterdir():
        links = "".join(f'<a href="{w.name}">{w.name}</a>\n' for w in project.glob("*.whl"))
        (project / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
    return index


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    _ensure_tools()
    work = tmp_path_factory.mktemp("image")
    c = Containers(work)
    _build_base(c, work)
    index = _torch_index(work)
    c.buildah("bud", "--isolation", "chroot", "--network", "host", "--layers=false", "-f", DEPLOY / "docker" / "Dockerfile.cpu",
              "--build-arg", f"PYTHON_IMAGE={BASE}", "--build-arg", "TORCH_INDEX_URL=file:///torch-index",
              "-v", f"{index}:/torch-index:ro", "-t", IMAGE, ROOT, timeout=1800)
    yield c
    c.podman("rm", "-f", "-a", check=False)
    c.podman("volume", "prune", "-f", check=False)
    c.podman("rmi", "-a", "-f", check=False)
    shutil.rmtree(work, ignore_errors=True)


def _wait_serving(c: Containers, name: str, target: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        while True:
            assert c.running(name), f"{name} exited:\n{c.logs(name)}"
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"{name} not serving after {timeout}s:\n{c.logs(name)}"
            time.sleep(2)


@pytest.mark.timeout(3600)
def test_the_cpu_image_serves_and_trains_as_compose_runs_it(image: Containers):
    c = image
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    server, tuner = compose["services"]["server"], compose["services"]["tuner"]
    env = [a for k, v in server["environment"].items() for a in ("-e", f"{k}={v}")]
    volumes = [a for v in server["volumes"] for a in ("-v", v)]
    port, metrics = free_port(), free_port()
    # Host networking (no CNI here): the only change from compose is the ports each binds.
    c.run_detached("server", *env, *volumes, IMAGE, *server["command"], "--port", port, "--metrics-port", metrics)
    c.run_detached("tuner", *env, *volumes, "--entrypoint", tuner["entrypoint"][0], IMAGE, "--metrics-port", "-1")
    target = f"127.0.0.1:{port}"
    _wait_serving(c, "server", target)

    assert c.podman("exec", "server", "id", "-u").stdout.strip() == "10001"  # the image's non-root user
    with Client(target) as client:
        g = client.generate(messages=[{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=16)
        assert "Paris" in g.text, g.text

        job = client.train_adapter("fox", "lora", examples=EXAMPLES, epochs=2, batch_size=2, lora_r=4)
        events = list(client.watch_training_job(job.id, timeout=900))
        done = events[-1].job
        assert done.state == "succeeded", (done, c.logs("tuner"))
        tuned = client.generate(messages=EXAMPLES[0]["messages"][:1], adapter=done.adapter_id, max_new_tokens=8)
        assert tuned.finish_reason in ("length", "eos", "stop") and tuned.adapter_id == done.adapter_id
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read().decode()
    assert re.search(r'^hotswap_requests_finished_total\{finish_reason="(eos|length)"\} [1-9]', scrape, re.M), scrape[:2000]

    # Both stores live on the volumes, owned by the image's user.
    listing = c.podman("exec", "server", "ls", "-ln", "/data").stdout
    assert re.search(r"10001\s+10001 .* registry\.sqlite$", listing, re.M) and "jobs.sqlite" in listing, listing

    # SIGTERM (what `docker stop` and Kubernetes send) drains and exits 0 within compose's grace period.
    grace = int(re.match(r"(\d+)s", server["stop_grace_period"])[1])
    for name in ("server", "tuner"):
        c.podman("stop", "-t", grace, name, timeout=grace + 60)
        state = json.loads(c.podman("inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, (name, state, c.logs(name))
