"""The files under deploy/ that no test can run for real here (no Docker engine, no cluster).

They must at least parse, name files that exist, run the command line the test suite
runs, carry sidecar configs the sidecar accepts, and point their health checks at the
admin listener's /health; the health-check commands themselves run against a real sidecar.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import pytest
import yaml

import tests.conftest
from tests.conftest import REPO, SidecarProcess, make_config, start_sidecar
from tests.integration.httpclient import request
from tests.integration.sidecars import running_sidecar

DEPLOY: Final = REPO / "deploy"
IMAGE_CONFIG: Final = "/etc/media-sidecar/sidecar.yaml"
TEMPLATE_PLACEHOLDER: Final = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


def load_yaml(path: Path) -> list[Any]:
    """Every document of a YAML file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def suite_argv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The argv conftest.start_sidecar runs: every sidecar process of the suite starts so."""
    seen: list[list[str]] = []

    class Recorder:
        def __init__(self, args: list[str], **_: Any) -> None:
            seen.append(list(args))

    monkeypatch.setattr(tests.conftest.subprocess, "Popen", Recorder)
    start_sidecar("{}", tmp_path)
    assert len(seen) == 1
    return seen[0]


def same_command(argv: list[str], tested: list[str], config: str) -> None:
    """`argv` is `tested` with its own Python and `config` as the config path."""
    assert Path(argv[0]).name == "python", argv
    assert argv[1:-1] == tested[1:-1], (argv, tested)
    assert argv[-1] == config and tested[-2] == "--config", (argv, tested)


# ---------------------------------------------------------------------------- YAML


YAML_FILES: Final = sorted(
    str(p.relative_to(DEPLOY)) for p in [*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")]
)


def test_every_yaml_file_is_found() -> None:
    """Guard the parametrization below: an empty list would test nothing."""
    assert {"docker-compose.yml", "sidecar.yaml", "k8s/deployment.yaml"} <= set(YAML_FILES)


@pytest.mark.parametrize("name", YAML_FILES)
def test_yaml_parses(name: str) -> None:
    docs = load_yaml(DEPLOY / name)
    assert docs and all(isinstance(d, dict) for d in docs), name


def configmap_config(tmp_path: Path) -> Path:
    """The sidecar YAML embedded in the Kubernetes ConfigMap, written to a file."""
    (cm,) = load_yaml(DEPLOY / "k8s" / "configmap.yaml")
    assert cm["kind"] == "ConfigMap"
    path = tmp_path / "configmap-sidecar.yaml"
    path.write_text(cm["data"]["sidecar.yaml"])
    return path


@pytest.mark.parametrize("source", ["sidecar.yaml", "compose/sidecar.yaml", "k8s ConfigMap"])
def test_shipped_sidecar_configs_pass_check_config(source: str, tmp_path: Path) -> None:
    """No invented keys: the sidecar itself validates every config we ship."""
    path = configmap_config(tmp_path) if source == "k8s ConfigMap" else DEPLOY / source
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(path), "--check-config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------- Dockerfile


def dockerfile(path: Path = DEPLOY / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def instruction(name: str, path: Path = DEPLOY / "Dockerfile") -> list[str]:
    return [rest for word, rest in dockerfile(path) if word == name]


def copy_sources(path: Path) -> Iterator[str]:
    """The build-context sources of every COPY (not those from another stage)."""
    for args in instruction("COPY", path):
        if "--from=" not in args:
            yield from [p for p in shlex.split(args) if not p.startswith("--")][:-1]


def test_dockerfile_runs_the_tested_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not instruction("ENTRYPOINT"), "CMD alone holds the command line"
    (cmd,) = instruction("CMD")
    same_command(json.loads(cmd), suite_argv(tmp_path, monkeypatch), IMAGE_CONFIG)


def test_dockerfile_copies_files_that_exist_and_runs_unprivileged() -> None:
    froms = instruction("FROM")
    assert froms and all(re.fullmatch(r"python:3\.1[1-9]-slim( AS \w+)?", f) for f in froms)
    for src in copy_sources(DEPLOY / "Dockerfile"):  # built from the repository root
        assert (REPO / src).exists(), f"COPY {src}: no such file in the repository"
    backend = DEPLOY / "example-backend" / "Dockerfile"
    for src in copy_sources(backend):  # built from its own directory (docker-compose.yml)
        assert (backend.parent / src).exists(), f"example-backend: COPY {src} missing"
    assert f"deploy/sidecar.yaml {IMAGE_CONFIG}" in instruction("COPY")
    (user,) = instruction("USER")
    assert user not in ("root", "0") and not user.startswith("0:"), user


def healthcheck_argv() -> list[str]:
    (check,) = instruction("HEALTHCHECK")
    argv = json.loads(check[check.index("CMD") + 3 :])
    assert isinstance(argv, list)
    return argv


def admin_url(argv: list[str]) -> str:
    (url,) = {u for a in argv for u in re.findall(r"http://[^'\"\s]+", a)}
    return url


def test_healthcheck_asks_the_admin_health_of_the_image_config() -> None:
    admin = yaml.safe_load((DEPLOY / "sidecar.yaml").read_text())["admin"]
    url = urlsplit(admin_url(healthcheck_argv()))
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", admin["port"], "/health")
    assert admin["host"] in ("127.0.0.1", "0.0.0.0")


def test_readme_names_files_that_exist() -> None:
    """The walkthrough's file names (`k8s/`, `nginx/....template`) are real."""
    text = (DEPLOY / "README.md").read_text()
    names = set(re.findall(r"`((?:deploy/)?[\w.-]+(?:/[\w.-]+)*(?:/|\.\w+))`", text))
    names = {n for n in names if "/" in n or n.endswith((".yml", ".yaml", ".service"))}
    assert len(names) > 8, names
    for name in sorted(names):  # relative to deploy/, or to the repository root
        assert (DEPLOY / name).exists() or (REPO / name).exists(), f"README names {name}: missing"


# ---------------------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    (doc,) = load_yaml(DEPLOY / "docker-compose.yml")
    assert isinstance(doc, dict)
    return doc


def host_volumes(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(host path, container path) of the bind mounts (sources starting with '.')."""
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            yield source, target


def test_compose_references_exist() -> None:
    doc = compose()
    services = doc["services"]
    assert {"nginx", "sidecar", "backend", "s3", "postgres"} <= set(services)
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            build = {"context": build} if isinstance(build, str) else build
            context = DEPLOY / build["context"]
            assert context.is_dir(), f"{name}: build context {build['context']} missing"
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        for source, _ in host_volumes(service):
            assert (DEPLOY / source).exists(), f"{name}: volume source {source} missing"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith(("/", ".")):
                assert source in (doc.get("volumes") or {}), f"{name}: volume {source}"
        assert set(service.get("depends_on", [])) <= set(services), name


def test_compose_wires_nginx_to_the_sidecar_and_the_backend() -> None:
    services = compose()["services"]
    template = DEPLOY / "nginx" / "media-sidecar.conf.template"
    nginx = services["nginx"]
    mounted = dict(host_volumes(nginx))
    assert mounted["./nginx/media-sidecar.conf.template"].startswith("/etc/nginx/templates/")
    env = nginx["environment"]
    assert set(TEMPLATE_PLACEHOLDER.findall(template.read_text())) <= set(env)
    sidecar_yaml = {v: k for k, v in host_volumes(services["sidecar"])}[IMAGE_CONFIG]
    config = yaml.safe_load((DEPLOY / sidecar_yaml).read_text())
    assert env["SIDECAR_UPSTREAM"] == f"sidecar:{config['server']['port']}"
    assert env["BACKEND_UPSTREAM"] == f"backend:{services['backend']['environment']['PORT']}"
    assert services["nginx"]["depends_on"]["sidecar"]["condition"] == "service_healthy"
    # Every *_env variable the sidecar config names is set in the container.
    named = {v for s in config["storages"].values() for k, v in s.items() if k.endswith("_env")}
    assert named <= set(services["sidecar"]["environment"]), named
    # The S3 storage points at the compose S3 service.
    endpoints = {s.get("endpoint_url") for s in config["storages"].values()} - {None}
    assert {urlsplit(e).hostname for e in endpoints} <= set(services)
    grace = int(str(services["sidecar"]["stop_grace_period"]).removesuffix("s"))
    assert grace > parse_seconds(config["server"]["shutdown_timeout"])


def parse_seconds(value: str | int) -> float:
    """`30s` / `1m` / 30 as seconds (enough of the sidecar's duration syntax for these files)."""
    text = str(value)
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit):
            return float(text.removesuffix(unit)) * units[unit]
    return float(text)


# ---------------------------------------------------------------------------- Kubernetes


def k8s_objects() -> dict[str, dict[str, Any]]:
    """Every object under deploy/k8s by kind/name."""
    objects = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in load_yaml(path):
            if doc.get("kind") != "Kustomization":
                objects[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return objects


def test_kustomization_lists_files_that_exist() -> None:
    (kustomization,) = load_yaml(DEPLOY / "k8s" / "kustomization.yaml")
    listed = set(kustomization["resources"])
    assert all((DEPLOY / "k8s" / name).is_file() for name in listed), listed
    present = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present, "every manifest is applied by `kubectl apply -k`"


def sidecar_container() -> tuple[dict[str, Any], dict[str, Any]]:
    """The Deployment's pod spec and its media-sidecar container."""
    pod = k8s_objects()["Deployment/media-app"]["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "media-sidecar"]
    assert len(pod["containers"]) >= 2, "the sidecar runs beside an app container"
    return pod, container


def test_k8s_probes_use_the_admin_port_and_health(tmp_path: Path) -> None:
    pod, container = sidecar_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = yaml.safe_load(configmap_config(tmp_path).read_text())
    assert ports["admin"] == config["admin"]["port"] and config["admin"]["host"] == "0.0.0.0"
    assert ports["media"] == config["server"]["port"]
    ready = container["readinessProbe"]["httpGet"]
    assert (ready["path"], ready["port"]) == ("/health", "admin")
    url = urlsplit(admin_url(container["livenessProbe"]["exec"]["command"]))
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", ports["admin"], "/health")
    # preStop pause + drain must fit in the grace period.
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = parse_seconds(config["server"]["shutdown_timeout"])
    assert pod["terminationGracePeriodSeconds"] > pause + drain


def test_k8s_mounts_the_configmap_where_the_image_reads_it() -> None:
    pod, container = sidecar_container()
    assert "command" not in container and "args" not in container, "the image's CMD runs"
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    cm_name = volume["configMap"]["name"]
    assert f"ConfigMap/{cm_name}" in k8s_objects()
    (item,) = volume["configMap"]["items"]
    assert f"{mount['mountPath']}/{item['path']}" == IMAGE_CONFIG
    cm = k8s_objects()[f"ConfigMap/{cm_name}"]
    assert item["key"] in cm["data"]
    token_env = yaml.safe_load(cm["data"][item["key"]])["admin"]["token_env"]
    assert token_env in {e["name"] for e in container["env"]}


def test_k8s_service_and_ingress_route_media_to_the_sidecar(tmp_path: Path) -> None:
    """Every route prefix of the ConfigMap reaches the sidecar's media port, unbuffered."""
    objects = k8s_objects()
    pod, container = sidecar_container()
    assert container["securityContext"]["runAsNonRoot"] is True
    service = objects["Service/media-app"]
    pod_ports = {p["name"] for c in pod["containers"] for p in c["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= pod_ports
    to_media = {p["name"] for p in service["spec"]["ports"] if p["targetPort"] == "media"}
    media_paths = set()
    for name, obj in objects.items():
        if not name.startswith("Ingress/"):
            continue
        for rule in obj["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == "media-app", name
                if backend["port"]["name"] in to_media:
                    annotations = obj["metadata"]["annotations"]
                    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
                    media_paths.add(path["path"])
    config = yaml.safe_load(configmap_config(tmp_path).read_text())
    assert {r["prefix"] for r in config["routes"]} <= media_paths


# ---------------------------------------------------------------------------- systemd


def test_systemd_unit_runs_the_tested_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # case-sensitive keys
    unit.read_string((DEPLOY / "systemd" / "media-sidecar.service").read_text())
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    same_command(shlex.split(service["ExecStart"]), suite_argv(tmp_path, monkeypatch), IMAGE_CONFIG)
    assert service["User"] not in ("root", "0")
    assert service["ExecReload"].endswith("-HUP $MAINPID")
    drain = parse_seconds(
        yaml.safe_load((DEPLOY / "sidecar.yaml").read_text())["server"]["shutdown_timeout"]
    )
    assert parse_seconds(service["TimeoutStopSec"]) > drain
    assert service["RestartPreventExitStatus"] == "2"


# ---------------------------------------------------------------------------- health checks, run


@pytest.fixture
def sidecar_with_dead_s3(tmp_path: Path, media_root: Path) -> Iterator[SidecarProcess]:
    """A real sidecar whose S3 storage refuses connections: /health answers 503."""
    dead = socket.socket()  # bound, never listening: connections are refused at once
    dead.bind(("127.0.0.1", 0))
    try:
        config = make_config(media_root, f"http://127.0.0.1:{dead.getsockname()[1]}")
        config["storages"]["uploads"].update(connect_timeout="1s", max_attempts=1)
        with running_sidecar(config, tmp_path) as sidecar:
            yield sidecar
    finally:
        dead.close()


@pytest.fixture
def healthy_sidecar(tmp_path: Path, media_root: Path) -> Iterator[SidecarProcess]:
    """A real sidecar with a disk storage only: /health answers 200."""
    config = make_config(
        media_root,
        "http://unused.invalid",
        storages={"local": {"type": "disk", "root": str(media_root)}},
        routes=[{"prefix": "/media/", "storage": "local"}],
    )
    with running_sidecar(config, tmp_path) as sidecar:
        yield sidecar


def run_check(argv: list[str], admin_port: int) -> int:
    """Run a health-check command with its URL pointed at `admin_port`; its exit status."""
    url = admin_url(argv)
    parts = urlsplit(url)
    moved = url.replace(parts.netloc, f"127.0.0.1:{admin_port}")
    argv = [sys.executable if a == "python" else a.replace(url, moved) for a in argv]
    return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode


def liveness_argv() -> list[str]:
    return list(sidecar_container()[1]["livenessProbe"]["exec"]["command"])


def test_health_checks_pass_on_a_healthy_sidecar(healthy_sidecar: SidecarProcess) -> None:
    assert request(healthy_sidecar.admin_port, "GET", "/health").status == 200
    assert run_check(healthcheck_argv(), healthy_sidecar.admin_port) == 0
    assert run_check(liveness_argv(), healthy_sidecar.admin_port) == 0


def test_a_503_fails_docker_health_but_not_k8s_liveness(
    sidecar_with_dead_s3: SidecarProcess,
) -> None:
    """S3 down: Docker marks the container unhealthy, Kubernetes does not restart it."""
    assert request(sidecar_with_dead_s3.admin_port, "GET", "/health").status == 503
    assert run_check(healthcheck_argv(), sidecar_with_dead_s3.admin_port) != 0
    assert run_check(liveness_argv(), sidecar_with_dead_s3.admin_port) == 0


def test_health_checks_fail_when_nothing_answers() -> None:
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert run_check(healthcheck_argv(), port) != 0
        assert run_check(liveness_argv(), port) != 0
