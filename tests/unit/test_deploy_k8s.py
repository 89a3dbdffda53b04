"""deploy/k8s: every manifest, base and rendered overlay, passes `kubernetes-validate --strict`.

Neither kubectl nor kustomize is installed here, so `render` applies the few kustomize features
the manifests use (resources, namespace, images, replicas, strategic-merge patches matched
by kind and name) and refuses any other key, so the overlay cannot quietly use a feature the
test does not render.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from services.console.settings import ConsoleSettings
from services.identity.settings import IdentitySettings
from services.ingest.settings import IngestSettings
from services.scoring.settings import ScoringSettings
from services.triggers.settings import TriggersSettings
from touchstream.settings import CoreSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "production"
SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "replicas", "patches"}
SETTINGS: dict[str, type[BaseSettings]] = {
    "ingest": IngestSettings, "identity": IdentitySettings, "scoring": ScoringSettings, "triggers": TriggersSettings,
    "console": ConsoleSettings,
}
Manifest = dict[str, Any]
# What an operator puts in the Secret instead of the base's placeholders.
REAL_SECRETS = {
    "TOUCHSTREAM_PII_HASH_KEY": "a-real-secret-from-the-vault",
    "TOUCHSTREAM_SCORING_CHECKPOINT_KEY": "a-real-checkpoint-key-from-the-vault",
    "TOUCHSTREAM_CONSOLE_IDENTITY_ADMIN_KEY": "a-real-admin-key-from-the-vault",
}


def load_all(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def merge(base: Any, patch: Any) -> Any:
    """Strategic merge as kustomize does it for these manifests: maps merge, lists of named items merge by name.

    >>> merge({"a": 1, "l": [{"name": "x", "v": 1}]}, {"l": [{"name": "x", "v": 2}, {"name": "y"}]})
    {'a': 1, 'l': [{'name': 'x', 'v': 2}, {'name': 'y'}]}
    """
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    if (isinstance(base, list) and isinstance(patch, list)
            and all(isinstance(i, dict) and "name" in i for i in base + patch)):
        by_name = {item["name"]: item for item in base}
        for item in patch:
            by_name[item["name"]] = merge(by_name[item["name"]], item) if item["name"] in by_name else item
        return list(by_name.values())
    return patch


def render(directory: Path) -> list[Manifest]:
    """Build a kustomization the way `kubectl kustomize` would for the features listed in SUPPORTED."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED
    assert not unsupported, f"{directory}: render() does not implement {unsupported}"
    manifests: list[Manifest] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        manifests += render(path) if path.is_dir() else load_all(path)
    manifests = copy.deepcopy(manifests)
    for patch_ref in kustomization.get("patches", []):
        for patch in load_all(directory / patch_ref["path"]):
            targets = [i for i, m in enumerate(manifests)
                       if m["kind"] == patch["kind"] and m["metadata"]["name"] == patch["metadata"]["name"]]
            assert len(targets) == 1, f"patch {patch['kind']}/{patch['metadata']['name']} matches {len(targets)}"
            manifests[targets[0]] = merge(manifests[targets[0]], patch)
    for change in kustomization.get("replicas", []):
        named = [m for m in manifests if m["kind"] == "Deployment" and m["metadata"]["name"] == change["name"]]
        assert len(named) == 1, f"replicas: no Deployment {change['name']}"
        named[0]["spec"]["replicas"] = change["count"]
    for image in kustomization.get("images", []):
        for manifest in manifests:
            for container in manifest.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    if "namespace" in kustomization:
        for manifest in manifests:
            if manifest["kind"] != "Namespace":
                manifest["metadata"]["namespace"] = kustomization["namespace"]
    return manifests


def validate(manifests: list[Manifest], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    validator = Path(sys.executable).parent / "kubernetes-validate"
    assert validator.exists(), "kubernetes-validate is missing: it is in the dev extra (`make install`)"
    files = []
    for i, manifest in enumerate(manifests):
        path = tmp_path / f"{i:02d}-{manifest['kind']}-{manifest['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(manifest))
        files.append(str(path))
    return subprocess.run([str(validator), "--strict", "--no-warn", *files], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def production() -> list[Manifest]:
    return render(OVERLAY)


def by_kind(manifests: list[Manifest], kind: str) -> dict[str, Manifest]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def test_every_base_file_passes_strict_schema_validation(tmp_path: Path) -> None:
    listed = yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")
    result = validate([m for name in listed for m in load_all(BASE / name)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rendered_overlay_passes_strict_schema_validation(production: list[Manifest], tmp_path: Path) -> None:
    result = validate(production, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_strict_validation_refuses_an_unknown_field(tmp_path: Path) -> None:
    """The check above is not vacuous: a misspelt field fails it."""
    deployment = copy.deepcopy(load_all(BASE / "deployments.yaml")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    assert validate([deployment], tmp_path).returncode != 0


def test_each_service_runs_with_probes_resources_and_the_shared_settings(production: list[Manifest]) -> None:
    deployments = by_kind(production, "Deployment")
    assert set(deployments) == {f"touchstream-{s}" for s in SETTINGS}
    for name, deployment in deployments.items():
        assert deployment["metadata"]["namespace"] == "touchstream"
        assert deployment["spec"]["replicas"] > 1
        pod = deployment["spec"]["template"]["spec"]
        [container] = pod["containers"]
        assert container["image"] == "registry.example.com/touchstream:0.1.0"
        assert container["command"] == ["python", "-m", f"services.{name.removeprefix('touchstream-')}"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]) & set(container["resources"]["limits"])
        refs = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
        assert refs == {"touchstream-config", "touchstream-secrets"}
        assert set(deployment["spec"]["selector"]["matchLabels"].items()) <= set(
            deployment["spec"]["template"]["metadata"]["labels"].items())


def test_scaling_stays_within_the_partitions(production: list[Manifest]) -> None:
    partitions = int(by_kind(production, "ConfigMap")["touchstream-config"]["data"]["TOUCHSTREAM_PARTITIONS"])
    # The overlay is the layout docs/scale-out.md sizes; the two change together.
    assert f"{partitions} partitions" in (ROOT / "docs" / "scale-out.md").read_text()
    deployments = by_kind(production, "Deployment")
    for name, hpa in by_kind(production, "HorizontalPodAutoscaler").items():
        assert hpa["spec"]["scaleTargetRef"]["name"] == name and name in deployments
        assert hpa["spec"]["minReplicas"] == deployments[name]["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
        if name != "touchstream-ingest":
            # A worker beyond the partition count of its input topic gets no partition.
            assert hpa["spec"]["maxReplicas"] <= partitions
    for name, service in by_kind(production, "Service").items():
        assert service["spec"]["selector"] == deployments[name]["spec"]["selector"]["matchLabels"]
    assert set(by_kind(production, "Service")) == {"touchstream-ingest", "touchstream-console", "touchstream-identity"}


@pytest.mark.parametrize("service", list(SETTINGS))
def test_the_environment_is_made_of_real_settings(
    production: list[Manifest], service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = by_kind(production, "ConfigMap")["touchstream-config"]["data"]
    secret = by_kind(production, "Secret")["touchstream-secrets"]["stringData"]
    container = by_kind(production, "Deployment")[f"touchstream-{service}"]["spec"]["template"]["spec"]["containers"][0]
    env = {**config, **secret, **{item["name"]: item["value"] for item in container["env"]}}
    classes: list[type[BaseSettings]] = [CoreSettings, *SETTINGS.values()]
    known = {f"{c.model_config.get('env_prefix', '')}{f}".upper() for c in classes for f in c.model_fields}
    assert not set(env) - known, f"no settings field reads {sorted(set(env) - known)}"
    for variable in [v for v in os.environ if v.startswith("TOUCHSTREAM_")]:
        monkeypatch.delenv(variable)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    # The base Secret's placeholders are refused in prod: pods cannot start until they are replaced.
    with pytest.raises(ValueError, match="TOUCHSTREAM_PII_HASH_KEY"):
        CoreSettings()
    for variable, value in REAL_SECRETS.items():
        assert variable in secret
        monkeypatch.setenv(variable, value)
    if service == "console":
        key = "TOUCHSTREAM_CONSOLE_IDENTITY_ADMIN_KEY"
        monkeypatch.setenv(key, secret[key])
        with pytest.raises(ValueError, match=key):
            ConsoleSettings()
        monkeypatch.setenv(key, REAL_SECRETS[key])
    core = CoreSettings()
    assert core.idempotent_producer and core.replication_factor == 3
    settings: Any = SETTINGS[service]()
    port = settings.web_port
    assert container["ports"] == [{"name": "web", "containerPort": port}]
    assert settings.web_host == "0.0.0.0", "probes and Prometheus reach the pod IP, not its loopback"
    if service == "ingest":
        assert settings.write_keys == {}, "the base must not accept the dev write key"
    if service == "console":
        assert settings.admin_keys == frozenset() and settings.cookie_secure
        assert settings.identity_url == "http://touchstream-identity"
    if service == "identity":
        assert settings.admin_keys == frozenset()
        settings.refuse_placeholders(core.environment)
    if service == "scoring":
        settings.refuse_placeholders(core.is_production)
        key = "TOUCHSTREAM_SCORING_CHECKPOINT_KEY"
        monkeypatch.setenv(key, secret[key])
        with pytest.raises(ValueError, match=key):
            ScoringSettings().refuse_placeholders(core.is_production)
