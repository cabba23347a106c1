"""The deployment files agree with each other and with the package.

No Docker or Kubernetes here: these read the files as text, so that the copies and lists
that must stay in step (the nginx template in the ConfigMap, the replicas nginx hashes
over, the folders the image copies) cannot drift apart unnoticed.
"""

from __future__ import annotations

import re

import tomllib

from .nginx import ROOT, TEMPLATE

DOCKER = ROOT / "docker"
PLACEHOLDERS = sorted(set(re.findall(r"\$\{(LOSSD_\w+)\}", TEMPLATE.read_text())))


def block_scalar(text: str, key: str) -> str:
    """The value of the YAML literal block `key: |` in `text` (clip chomping)."""
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == f"{key}: |")
    body = lines[start + 1 :]
    indent = len(body[0]) - len(body[0].lstrip(" "))
    value = []
    for line in body:
        if line.strip() and len(line) - len(line.lstrip(" ")) < indent:
            break
        value.append(line[indent:] if line.strip() else "\n")
    return "".join(value).rstrip("\n") + "\n"


def test_the_template_has_the_documented_placeholders() -> None:
    assert PLACEHOLDERS == ["LOSSD_LISTEN", "LOSSD_RESOLVER", "LOSSD_UPSTREAM_SERVERS"]


def test_the_k8s_configmap_holds_the_template_verbatim() -> None:
    configmap = (DOCKER / "k8s" / "nginx-configmap.yaml").read_text()
    assert block_scalar(configmap, "lossd.conf.template") == TEMPLATE.read_text(), (
        "docker/k8s/nginx-configmap.yaml differs from docker/nginx/lossd.conf.template: "
        "run docker/k8s/update-configmap.sh"
    )


def test_compose_renders_the_template_for_each_replica() -> None:
    compose = (DOCKER / "compose.yaml").read_text()
    assert "./nginx/lossd.conf.template:/etc/nginx/templates/lossd.conf.template:ro" in compose
    for name in PLACEHOLDERS:
        assert re.search(rf"^\s+{name}:", compose, re.MULTILINE), name
    replicas = set(re.findall(r"^  (lossd-\d+):$", compose, re.MULTILINE))
    routed = set(re.findall(r"server (lossd-\d+):50051 max_fails=0", compose))
    assert len(replicas) >= 2
    assert routed == replicas, "every replica service, and only those, in nginx's upstream"
    for replica in replicas:  # each its own state
        assert f"- {replica}-state:/var/lib/lossd" in compose


def test_k8s_nginx_hashes_over_every_statefulset_replica() -> None:
    nginx = (DOCKER / "k8s" / "nginx.yaml").read_text()
    for name in PLACEHOLDERS:
        assert f"- name: {name}" in nginx, name
    lossd = (DOCKER / "k8s" / "lossd.yaml").read_text()
    [replicas] = re.findall(r"^  replicas: (\d+)$", lossd, re.MULTILINE)
    routed = re.findall(r"server lossd-(\d+)\.lossd\.\$\(NAMESPACE\)\.svc", nginx)
    assert routed == [str(i) for i in range(int(replicas))]
    assert "clusterIP: None" in lossd and "grpc:" in lossd  # headless; gRPC probes


def test_the_image_copies_every_package_folder() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {
        path.split("/")[0] for path in pyproject["tool"]["setuptools"]["package-dir"].values()
    }
    dockerfile = (DOCKER / "Dockerfile").read_text()
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    for folder in folders:
        assert f"COPY {folder}/ /src/{folder}/" in dockerfile, folder
        assert f"!{folder}/" in dockerignore, folder
    for path in ("pyproject.toml", "README.md", "docker/healthcheck.py", "docker/wheelhouse/"):
        assert f"!{path}" in dockerignore, path
