"""deploy/: the docker-compose file and the Kubernetes manifests, parsed and cross-checked.

Docker and kubectl are not run here (the machine has neither); what can be
checked without them is: every file parses, the gateways' TOML config is a
valid tether config, and the pieces refer to each other correctly (volumes,
secret keys, ports, the headless Service).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tether.config import parse_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SECRET_FILES = ("tls_cert", "tls_key", "tls_ca", "key_file", "redis_password_file")


def gateway_config(text: str, tmp: Path) -> Any:
    """parse_config of a deploy config, its secret files replaced by files that exist."""
    data = tomllib.loads(text)
    for key in SECRET_FILES:
        if key in data["cluster"]:
            path = tmp / key
            path.write_text("a-secret-of-the-right-length-0123456789")
            data["cluster"][key] = str(path)
    return parse_config(data, source="deploy")


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for p in sorted(DEPLOY.glob("k8s/*.yaml")) for d in documents(p)
            if d["kind"] == kind]


def test_compose_runs_three_gateways_and_redis(tmp_path: Path) -> None:
    compose = documents(DEPLOY / "docker-compose.yml")[0]
    services = compose["services"]
    gateways = [name for name in services if name != "redis"]
    assert sorted(gateways) == ["n1", "n2", "n3"]
    for name in gateways:
        service = {**compose["x-gateway"], **services[name]}
        assert service["hostname"] == name  # the node id
        mounts = {v.split(":")[1] for v in service["volumes"]}
        assert {"/etc/tether/tether.toml", "/etc/tether/secrets", "/run/tether"} <= mounts
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    config = gateway_config((DEPLOY / "compose/tether.toml").read_text(), tmp_path)
    assert config.cluster is not None
    assert config.cluster.redis == "redis://redis:6379/0"
    assert config.cluster.link_listen.port == 7341 and config.cluster.tls
    assert config.drain_timeout < 30  # within compose's stop_grace_period
    assert (DEPLOY / "Dockerfile").read_text().count("[cluster]") == 1


def test_kubernetes_manifests_fit_together(tmp_path: Path) -> None:
    (daemonset,) = by_kind("DaemonSet")
    (configmap,) = by_kind("ConfigMap")
    (secret,) = by_kind("Secret")
    services = {s["metadata"]["name"]: s for s in by_kind("Service")}
    assert {"tether-nodes", "tether-redis"} <= set(services)
    # One namespace for all of it.
    namespaces = {d["metadata"].get("namespace") for p in DEPLOY.glob("k8s/*.yaml")
                  for d in documents(p) if d["kind"] != "Namespace"}
    assert namespaces == {"tether"}
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    # The sandboxes' way in: the host's /run/tether, where the config listens.
    assert volumes[mounts["/run/tether"]]["hostPath"]["path"] == "/run/tether"
    config = gateway_config(configmap["data"]["tether.toml"], tmp_path)
    assert any(e.is_unix and e.path.startswith("/run/tether/") for e in config.listen)
    assert config.cluster is not None
    # Every secret file the config names is a key of the Secret mounted there.
    assert volumes[mounts["/etc/tether/secrets"]]["secret"]["secretName"] == (
        secret["metadata"]["name"])
    data = tomllib.loads(configmap["data"]["tether.toml"])["cluster"]
    for key in SECRET_FILES:
        if key in data:
            assert data[key].startswith("/etc/tether/secrets/")
            assert Path(data[key]).name in secret["stringData"], key
    # Node links: the headless Service and the container port agree with link_listen.
    nodes = services["tether-nodes"]["spec"]
    assert nodes["clusterIP"] == "None"
    assert nodes["selector"] == daemonset["spec"]["selector"]["matchLabels"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["link"] == config.cluster.link_listen.port == nodes["ports"][0]["port"]
    assert config.admin_listen is not None and ports["admin"] == config.admin_listen.port
    probes = (container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"])
    assert [p["path"] for p in probes] == ["/readyz", "/healthz"]
    assert pod["terminationGracePeriodSeconds"] > config.drain_timeout
    # Redis: the URL's host is the Service.
    assert "tether-redis.tether.svc" in config.cluster.redis


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.y*ml")), ids=lambda p: p.name)
def test_every_yaml_file_parses(path: Path) -> None:
    assert documents(path)
