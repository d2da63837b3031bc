"""deploy/: Kubernetes manifests validated against the Kubernetes schemas, the dashboard
and alert rules checked against what a live server exports, Prometheus' promtool on
the rules and config, and the compose file and Dockerfiles checked for consistency."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from hotswap.client import Client, NotFound
from hotswap.server.options import parse_options
from peft_fixtures import save_adapter
from ports import free_port
from server_process import ServerProcess
from tools import ROOT, promtool

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


def k8s_docs() -> list[dict]:
    files = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(files) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    return [d for f in files for d in yaml.safe_load_all((K8S / f).read_text()) if d]


def by_kind(kind: str) -> list[dict]:
    return [d for d in k8s_docs() if d["kind"] == kind]


def test_manifests_pass_the_kubernetes_schemas():
    files = [str(p) for p in sorted(K8S.glob("*.yaml")) if p.name not in ("kustomization.yaml", "servicemonitor.yaml")]
    r = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", "1.31.0", *files], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("passed for resource") == len([d for d in k8s_docs() if d["kind"] != "ServiceMonitor"])


def test_the_server_deployment_is_what_ops_need(tmp_path):
    (server,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "hotswap-server"]
    pod = server["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == grpc_port  # native gRPC probes on grpc.health.v1
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600  # model load
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = next(m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    data = next(m for m in c["volumeMounts"] if m["mountPath"] == "/data")
    assert volumes[data["name"]]["persistentVolumeClaim"]["claimName"] == by_kind("PersistentVolumeClaim")[0]["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"]

    # the config file both Deployments read is valid for the real option parser
    config = by_kind("ConfigMap")[0]["data"]["hotswap.toml"]
    toml = tomllib.loads(config)
    path = tmp_path / "hotswap.toml"
    path.write_text(config)
    opts = parse_options(["--config", str(path)], {})
    assert opts.quantization == toml["quantization"] and opts.tuner_workers == 0
    assert pod["terminationGracePeriodSeconds"] > opts.drain_seconds  # SIGTERM drains before the kill

    (tuner,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "hotswap-tuner"]
    tpod = tuner["spec"]["template"]["spec"]
    assert tpod["containers"][0]["command"] == ["hotswap-tuner"]
    assert {v["persistentVolumeClaim"]["claimName"] for v in tpod["volumes"] if "persistentVolumeClaim" in v} == {"hotswap-data"}

    labels = server["spec"]["template"]["metadata"]["labels"]
    (svc,) = by_kind("Service")
    (pdb,) = by_kind("PodDisruptionBudget")
    (sm,) = by_kind("ServiceMonitor")
    for selector in (svc["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "hotswap.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def rule_exprs() -> list[str]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"]
    return [r["expr"] for g in groups for r in g["rules"]]


@pytest.fixture(scope="module")
def live_server(tiny_checkpoints, tmp_path_factory):
    """A real server that has seen traffic: the base, a LoRA adapter (a cold load, then hits)
    and a request for an adapter that does not exist."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32)
    lora = save_adapter(model, "lora", tmp_path_factory.mktemp("deploy-adapter") / "lora")
    with ServerProcess(tiny_checkpoints["llama"], tmp_path_factory.mktemp("deploy-data")) as srv:
        with Client(srv.target) as c:
            c.register_adapter("lora", str(lora))
            traffic(c)
            with pytest.raises(NotFound):
                c.generate("hello", adapter="absent")
        yield srv


def traffic(c: Client) -> None:
    """Base rows, a cold adapter load (unloaded first) and a cache hit."""
    c.unload_adapter("lora")
    for adapter in ("", "lora", "lora"):
        c.generate("hello", adapter=adapter, max_new_tokens=3)


@pytest.fixture(scope="module")
def live_scrape(live_server) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{live_server.metrics_port}/metrics", timeout=10).read().decode()


def test_dashboard_and_rules_use_only_metrics_the_server_exports(live_scrape):
    exported = set(re.findall(r"^(hotswap_[a-z_]+)", live_scrape, re.M))
    used = {m for e in dashboard_exprs() + rule_exprs() for m in re.findall(r"\b(hotswap_[a-z_]+)", e)}
    assert used and used <= exported, sorted(used - exported)
    panels = " ".join(dashboard_exprs())
    for needed in ("hotswap_generation_tokens_total", "hotswap_time_to_first_token_seconds_bucket",
                   "hotswap_time_per_output_token_seconds_bucket", "hotswap_requests_waiting", "hotswap_batch_size",
                   "hotswap_adapters_resident", "hotswap_adapter_cache_hits_total", "hotswap_adapter_load_duration_seconds_bucket",
                   "hotswap_training_jobs"):
        assert needed in panels, needed


def test_promtool_checks_the_rules_and_the_config(tmp_path):
    tool = str(promtool())
    r = subprocess.run([tool, "check", "rules", str(DEPLOY / "prometheus" / "rules.yml")], capture_output=True, text=True)
    assert r.returncode == 0 and "SUCCESS: 8 rules found" in r.stdout, r.stdout + r.stderr
    config = (DEPLOY / "prometheus" / "prometheus.yml").read_text().replace("/etc/prometheus/rules.yml", str(DEPLOY / "prometheus" / "rules.yml"))
    (tmp_path / "prometheus.yml").write_text(config)
    r = subprocess.run([tool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_scrapes_the_server_and_every_dashboard_query_evaluates(live_server, tmp_path):
    """The real Prometheus (from the same Debian package as promtool) with compose's config
    and rules, scraping a live server: the target is up, every rule evaluates, and every
    dashboard query parses and returns a series once traffic has been scraped."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}  # seconds, not minutes, of test
    config["rule_files"] = [str(DEPLOY / "prometheus" / "rules.yml")]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{live_server.metrics_port}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    exe = promtool().parent / "prometheus"
    proc = subprocess.Popen([exe, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def api(path: str, **query) -> dict:
        url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(query)}"
        try:
            body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        except urllib.error.HTTPError as e:  # a query that does not parse: 400 with the reason
            body = json.loads(e.read())
        return body

    def wait(what, ok, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = ok()
                if value:
                    return value
            except (urllib.error.URLError, ConnectionError):
                pass
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, f"Prometheus: {what() if callable(what) else what}"
            time.sleep(0.5)

    try:
        wait("target up", lambda: [t for t in api("targets")["data"]["activeTargets"] if t["health"] == "up"])
        # rate() needs two samples of a counter that moved between them: traffic between scrapes.
        with Client(live_server.target) as c:
            for _ in range(3):
                traffic(c)
                time.sleep(1.5)
        def blank() -> list[str]:  # no series, or NaN: a quantile over a window with no observations
            out = []
            for expr in dashboard_exprs():
                body = api("query", query=expr)
                assert body["status"] == "success", (expr, body)  # parses: fails at once, not after the wait
                if not body["data"]["result"] or any(math.isnan(float(s["value"][1])) for s in body["data"]["result"]):
                    out.append(expr)
            return out
        wait(lambda: f"dashboard queries with no value: {blank()}", lambda: not blank(), timeout=30)

        def rules_evaluated():
            rules = [r for g in api("rules")["data"]["groups"] for r in g["rules"]]
            assert len(rules) == len(rule_exprs())
            assert all(r["health"] != "err" for r in rules), [r for r in rules if r["health"] == "err"]
            return all(r["health"] == "ok" for r in rules)
        wait("every rule evaluated", rules_evaluated)
        recorded = api("query", query="hotswap:generation_tokens:rate1m")["data"]["result"]
        assert recorded and float(recorded[0]["value"][1]) > 0, recorded
    finally:
        proc.terminate()
        proc.wait(30)


def test_compose_and_dockerfiles_are_consistent():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"server", "tuner", "prometheus", "grafana"}
    build = services["server"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    parse_options(services["server"]["command"], {})  # real flags
    assert services["tuner"]["entrypoint"] == ["hotswap-tuner"]
    for svc in ("prometheus", "grafana"):
        for mount in services[svc]["volumes"]:
            assert (DEPLOY / mount.split(":")[0]).exists(), mount
    provisioning = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/hotswap.yaml").read_text())
    assert provisioning["providers"][0]["options"]["path"] in " ".join(services["grafana"]["volumes"])

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (DEPLOY / "docker" / name).read_text()
        assert text.count("\nFROM ") + text.startswith("FROM ") >= 2  # multi-stage
        for src in re.findall(r"^COPY (?!--from)(\S+) ", text, re.M):
            assert (ROOT / src).exists(), (name, src)
        final = text[text.rindex("\nFROM "):]
        assert re.search(r"^USER hotswap$", final, re.M) and "useradd" in final  # non-root
        entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", final, re.M)[1])
        assert entry[0] in scripts
        assert 'VOLUME ["/data", "/cache"]' in final and "HOTSWAP_DATA_DIR=/data" in final


def test_the_rayservice_points_at_our_ray_app_with_real_options():
    import importlib

    from hotswap.server.options import options_from_dict

    doc = yaml.safe_load((DEPLOY / "ray" / "rayservice.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    for func in serve_config["grpc_options"]["grpc_servicer_functions"]:
        module, attr = func.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), attr))
    (app,) = serve_config["applications"]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    args = dict(app["args"])
    for k in ("num_replicas", "adapters_per_replica", "num_cpus", "num_gpus"):
        args.pop(k, None)
    options_from_dict(args)  # every other key is a real server option
    workers = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert all(w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1 for w in workers)
