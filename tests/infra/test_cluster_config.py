"""ray_cluster.yaml against the JSON schema shipped inside `ray`; Kubernetes manifests parse and are complete."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((REPO / "infra" / "k8s").glob("*.yaml"))
SECRET_WORDS = ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY", "BACKEND_STORE_URI")


def test_ray_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    validate_config(config)  # raises jsonschema.ValidationError on any violation
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert any(t["node_config"]["InstanceType"].startswith(("p4d", "p5")) for t in types.values())
    text = (REPO / "ray_cluster.yaml").read_text()
    assert "aws_secret_access_key" not in text.lower() and "AWS_SECRET_ACCESS_KEY" not in text


def test_schema_validation_rejects_a_broken_config():
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    config["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


REQUIRED = {
    "Service": ["spec.selector", "spec.ports"],
    "Deployment": ["spec.selector.matchLabels", "spec.template.metadata.labels", "spec.template.spec.containers"],
    "StatefulSet": ["spec.serviceName", "spec.selector.matchLabels", "spec.template.spec.containers"],
    "RayCluster": ["spec.headGroupSpec.rayStartParams", "spec.headGroupSpec.template.spec.containers"],
    "RayJob": ["spec.entrypoint", "spec.rayClusterSpec.headGroupSpec.template.spec.containers"],
}


def _get(doc, dotted):
    node = doc
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"missing {dotted}"
        node = node[part]
    return node


def _containers(doc):
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    if "headGroupSpec" in spec:
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        return [c for g in groups for c in g["template"]["spec"]["containers"]]
    return doc["spec"].get("template", {}).get("spec", {}).get("containers", [])


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_parses_and_has_required_fields(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), path.name
        assert doc["metadata"].get("name")
        for dotted in REQUIRED[doc["kind"]]:
            assert _get(doc, dotted) is not None
        if doc["kind"] in ("Deployment", "StatefulSet"):
            assert _get(doc, "spec.selector.matchLabels").items() <= _get(doc, "spec.template.metadata.labels").items()
        if doc["kind"] == "RayCluster" or doc["kind"] == "RayJob":
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            for group in spec.get("workerGroupSpecs", []):
                assert group["groupName"] and group["minReplicas"] <= group["maxReplicas"]
        for container in _containers(doc):
            assert container["name"] and container["image"]
            for env in container.get("env", []):
                if any(word in env["name"] for word in SECRET_WORDS):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], f"{env['name']} must be a secret"


def test_runbook_commands_exist():
    """Every `longplay ...` line of the README's bash blocks parses with the real CLI (the runbook cannot drift from
    it); blocks of printed output are not commands."""
    import re
    import shlex

    from infra.cli import build_parser, parse_args

    parser = build_parser()
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    commands = [shlex.split(line.split(" #")[0])[1:] for line in lines if line.startswith("longplay ")]
    assert len(commands) >= 9
    for argv in commands:
        args = parse_args(parser, argv)
        if argv[0] == "submit":  # the submitted command must parse too
            parse_args(parser, args.argv[args.argv.index("longplay") + 1 :])
