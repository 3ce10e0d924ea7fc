"""The deployment files in deploy/: the Kubernetes manifests against the Kubernetes JSON schemas
(kubernetes-validate), the compose file against the compose spec's schema (check-jsonschema's vendored
copy), both tools from PyPI in a side venv this test makes; then what they say about the server (setting
names, ports, probes, grace periods, the engine's address) checked against the server's real config.
"""

from __future__ import annotations

import ast
import hashlib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from local_ai_server.config import from_env
from local_ai_server.probes import PROBES
from tests.paths import REPO

pytestmark = pytest.mark.component

DEPLOY = REPO / "deploy"
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
COMPOSE = DEPLOY / "compose.yaml"
# Pinned: a new release with newer schemas must not fail files that did not change.
TOOLS = ("kubernetes-validate==1.37.0", "check-jsonschema==0.39.0")
# Kubernetes releases the manifests must be valid for (kubernetes-validate bundles their schemas).
K8S_VERSIONS = ("1.30.0", "1.37.0")


@pytest.fixture(scope="module")
def tools() -> Path:
    """A venv with the validators (made once per tool versions, under the user's cache)."""
    key = hashlib.sha256(" ".join(TOOLS).encode()).hexdigest()[:12]
    venv = Path.home() / ".cache" / "local-ai-server" / f"deploy-check-{key}"
    bin_dir = venv / "bin"
    if not (bin_dir / "kubernetes-validate").exists() or not (bin_dir / "check-jsonschema").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        install = [str(bin_dir / "python"), "-m", "pip", "install", "-q", *TOOLS]
        done = subprocess.run(install, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"could not install the validators ({' '.join(install)}):\n{done.stderr[-2000:]}")
    return bin_dir


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s() -> list[dict[str, Any]]:
    return [d for p in K8S for d in documents(p)]


def one(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in k8s() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def config_names() -> set[str]:
    """Every LOCAL_* setting the server reads (string constants in config.py and __main__.py)."""
    names: set[str] = set()
    for module in ("config.py", "__main__.py"):
        tree = ast.parse((REPO / "local_ai_server" / module).read_text())
        names |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                  and re.fullmatch(r"LOCAL_[A-Z0-9_]+", n.value)}
    return names


# ---------------------------------------------------------------------- schemas


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_kubernetes_manifests_are_valid(tools: Path, version: str) -> None:
    assert K8S, "no manifests in deploy/k8s"
    run = subprocess.run([str(tools / "kubernetes-validate"), "--strict", "-k", version, *map(str, K8S)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("passed") == len(k8s())  # every resource was checked, none skipped


def test_the_compose_file_is_valid(tools: Path) -> None:
    run = subprocess.run([str(tools / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.fixture
def broken(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    manifest = (DEPLOY / "k8s" / "local-ai-server.yaml").read_text()
    compose = COMPOSE.read_text()
    assert "readinessProbe:" in manifest and "stop_grace_period:" in compose
    bad_manifest, bad_compose = tmp_path / "bad.yaml", tmp_path / "compose.yaml"
    bad_manifest.write_text(manifest.replace("readinessProbe:", "readinesProbe:"))
    bad_compose.write_text(compose.replace("stop_grace_period:", "stop_grace_perod:"))
    yield bad_manifest, bad_compose


def test_the_validators_reject_a_misspelt_field(tools: Path, broken: tuple[Path, Path]) -> None:
    bad_manifest, bad_compose = broken
    run = subprocess.run([str(tools / "kubernetes-validate"), "--strict", str(bad_manifest)], capture_output=True,
                         text=True)
    assert run.returncode != 0 and "readinesProbe" in run.stdout + run.stderr
    run = subprocess.run([str(tools / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                          str(bad_compose)], capture_output=True, text=True)
    assert run.returncode != 0 and "stop_grace_perod" in run.stdout + run.stderr


# ---------------------------------------------------------------------- what they say about the server


def server_env_k8s() -> dict[str, str]:
    """The server's environment in Kubernetes: its ConfigMap and Secret, as the Deployment loads them."""
    deployment = one("Deployment", "local-ai-server")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            env.update(one("ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            env.update(one("Secret", source["secretRef"]["name"])["stringData"])
    env.update({e["name"]: e["value"] for e in container.get("env", [])})
    return env


def server_envs_compose() -> dict[str, dict[str, str]]:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    return {name: s["environment"] for name, s in services.items() if name.startswith("las")}


def test_every_setting_named_is_one_the_server_reads() -> None:
    known = config_names()
    assert "LOCAL_DRAIN_TIMEOUT_S" in known and "LOCAL_LLM_REMOTE_URL" in known
    named = set(server_env_k8s())
    for env in server_envs_compose().values():
        named |= set(env)
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    named |= set(re.findall(r"\b(LOCAL_[A-Z0-9_]+)=", dockerfile)) - {"LOCAL_LLAMA_CMAKE_ARGS"}  # install.sh's
    assert named - known == set()


def test_the_kubernetes_server_config_loads_and_its_probes_and_ports_match() -> None:
    env = server_env_k8s()
    cfg = from_env(env, models_dir=Path("/app/models"))
    assert cfg.llm.backend == "openai" and cfg.auth_token and cfg.host == "0.0.0.0"
    deployment = one("Deployment", "local-ai-server")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (port,) = container["ports"]
    assert port["containerPort"] == cfg.port
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and path in PROBES and get["port"] in (port["name"], cfg.port)
    # SIGKILL never cuts the drain short: the grace period covers the preStop sleep and the drain's timeout.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + cfg.drain_timeout_s + 5
    # No affinity: a call is one WebSocket; the Service targets the port by name.
    service = one("Service", "local-ai-server")
    assert "sessionAffinity" not in service["spec"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]


def test_the_server_reaches_the_engine_by_its_service_with_the_shared_key() -> None:
    env = server_env_k8s()
    url = urlsplit(env["LOCAL_LLM_REMOTE_URL"])
    engine_svc = one("Service", url.hostname or "")
    (svc_port,) = engine_svc["spec"]["ports"]
    assert url.port == svc_port["port"] and url.path == "/v1"
    engine = one("Deployment", url.hostname or "")
    (container,) = engine["spec"]["template"]["spec"]["containers"]
    assert engine_svc["spec"]["selector"] == engine["spec"]["selector"]["matchLabels"]
    assert svc_port["targetPort"] in [p["name"] for p in container["ports"]]
    args = container["args"]
    assert args[args.index("--alias") + 1] == env["LOCAL_LLM_REMOTE_MODEL"]
    assert args[args.index("--port") + 1] == str(container["ports"][0]["containerPort"])
    key_var = args[args.index("--api-key") + 1].strip("$()")
    (key_env,) = [e for e in container["env"] if e["name"] == key_var]
    assert key_env["valueFrom"]["secretKeyRef"]["key"] == "LOCAL_LLM_REMOTE_API_KEY"


def test_the_compose_servers_drain_within_their_grace_and_haproxy_uses_the_repository_config() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    servers = server_envs_compose()
    assert len(servers) >= 2
    for name, env in servers.items():
        cfg = from_env({k: v for k, v in env.items() if "${" not in v}, models_dir=Path("/app/models"))
        grace = re.fullmatch(r"(\d+)s", services[name]["stop_grace_period"])
        assert grace is not None and float(grace.group(1)) > cfg.drain_timeout_s + 5
        assert "/ready" in " ".join(services[name]["healthcheck"]["test"])
        url = urlsplit(env["LOCAL_LLM_REMOTE_URL"])
        assert url.hostname in services and str(url.port) in " ".join(services[url.hostname]["command"])
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / services[name]["build"]["context"] / "deploy" / "Dockerfile").is_file()
    lb = services["haproxy"]
    (mount,) = lb["volumes"]
    assert (DEPLOY / mount.split(":")[0]).resolve() == (DEPLOY / "haproxy" / "haproxy.cfg").resolve()
    targets = {v.split(":")[0]: v.split(":")[1] for k, v in lb["environment"].items() if k.startswith("LAS_SERVER")}
    cfg_text = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    assert set(targets) == set(servers) and len(re.findall(r'\$\{LAS_SERVER\d', cfg_text)) == len(targets)
    assert all(port == servers[name]["LOCAL_WS_PORT"] for name, port in targets.items())
    assert "option httpchk GET /ready" in cfg_text


def test_the_image_serves_on_the_port_it_exposes() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    port = re.search(r"LOCAL_WS_PORT=(\d+)", dockerfile)
    assert port is not None and f"EXPOSE {port.group(1)}" in dockerfile
    assert 'CMD [".venv/bin/local-ai-server"]' in dockerfile and "STOPSIGNAL SIGTERM" in dockerfile
    assert "--tier embedded" in dockerfile
