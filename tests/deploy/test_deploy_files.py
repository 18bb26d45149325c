"""deploy/: the Dockerfile, compose file and Kubernetes manifests agree with each other and
with the code (images, ports, volumes, paths). No container engine is needed: the files are
parsed and cross-checked; `kubectl kustomize` runs when kubectl is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from confide.server.jobs import load_job
from confide.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
PORTS = {
    ServerSettings.model_fields["superlink_port"].default,
    ServerSettings.model_fields["enrollment_port"].default,
}
IMAGES = {"coordinator": "confide/coordinator:0.1.0", "institution": "confide/institution:0.1.0"}
STATE_MOUNT = "/var/lib/confide"


def _dockerfile_lines() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def _stage(target: str) -> list[str]:
    """The instructions of build stage `target`."""
    lines, inside = [], False
    for line in _dockerfile_lines():
        if line.startswith("FROM "):
            inside = line.endswith(f" AS {target}")
            continue
        if inside:
            lines.append(line)
    assert lines, f"no stage {target} in {DOCKERFILE}"
    return lines


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    documents = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def _kind(manifests: list[dict], kind: str) -> list[dict]:
    return [doc for doc in manifests if doc["kind"] == kind]


# --- Dockerfile ---------------------------------------------------------------------------------


def test_every_file_the_dockerfile_copies_exists_in_the_repository():
    for line in _dockerfile_lines():
        if line.startswith("COPY "):
            sources = [word for word in line.split()[1:-1] if not word.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), f"{DOCKERFILE}: COPY {source}: missing"


def test_the_coordinator_image_exposes_the_ports_the_server_listens_on():
    exposed = {
        int(p)
        for line in _stage("coordinator")
        if line.startswith("EXPOSE ")
        for p in line.split()[1:]
    }
    assert exposed == PORTS


@pytest.mark.parametrize("script", ["coordinator-entrypoint.sh", "institution-entrypoint.sh"])
def test_entrypoint_scripts_are_valid_shell(script):
    path = DEPLOY / "docker" / script
    assert subprocess.run(["sh", "-n", str(path)], capture_output=True).returncode == 0


def test_each_stage_enters_through_its_own_script():
    for target in ("coordinator", "institution"):
        stage, script = _stage(target), f"confide-{target}"
        assert f'ENTRYPOINT ["{script}"]' in stage
        installed = f"/usr/local/bin/{script}"
        assert any(line.startswith("COPY") and line.endswith(installed) for line in stage)


def test_the_state_folder_of_the_image_is_where_the_entrypoints_keep_state():
    assert f"VOLUME {STATE_MOUNT}" in _stage("base")
    for script in ("coordinator-entrypoint.sh", "institution-entrypoint.sh"):
        assert f"{STATE_MOUNT}/" in (DEPLOY / "docker" / script).read_text()


# --- compose ------------------------------------------------------------------------------------


def test_compose_builds_the_two_targets_under_the_same_image_names(compose):
    built = {name: service for name, service in compose["services"].items() if "build" in service}
    for service in built.values():
        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert service["image"] == IMAGES[build["target"]]
    for name, service in compose["services"].items():
        assert service["image"] in IMAGES.values(), name


def test_compose_publishes_the_servers_ports_on_loopback_only(compose):
    mappings = [m.split(":") for m in compose["services"]["coordinator"]["ports"]]
    assert all(m[0] == "127.0.0.1" for m in mappings)  # not on every interface of the host
    assert {int(m[1]) for m in mappings} == {int(m[2]) for m in mappings} == PORTS


def test_compose_volumes_are_declared_and_state_is_persistent(compose):
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in declared, f"{name}: volume {source} is not declared"
        assert all(dep in compose["services"] for dep in service.get("depends_on", {})), name
    for name in ("coordinator", "hospital-a", "hospital-b"):
        mounts = {v.split(":")[1] for v in compose["services"][name]["volumes"]}
        assert STATE_MOUNT in mounts, f"{name} keeps its state in the container"


def test_institutions_reach_a_name_in_the_coordinators_certificate(compose):
    hosts = compose["services"]["coordinator"]["environment"]["CONFIDE_HOSTS"].split(",")
    invite = compose["services"]["invite"]["command"][0]
    for name in ("hospital-a", "hospital-b"):
        env = compose["services"][name]["environment"]
        host, port = env["CONFIDE_SERVER"].split(":")
        assert host in hosts and host in compose["services"]
        assert int(port) == ServerSettings.model_fields["enrollment_port"].default
        # The token file the institution reads is one the invite service writes.
        assert env["CONFIDE_TOKEN_FILE"] == f"/tokens/{name}" and name in invite
        assert env["CONFIDE_DATA"].startswith("/data/")


# --- Kubernetes ---------------------------------------------------------------------------------


def test_manifests_use_the_images_built_by_the_dockerfile(manifests):
    images = {
        container["image"]
        for doc in _kind(manifests, "StatefulSet") + _kind(manifests, "Deployment")
        for container in doc["spec"]["template"]["spec"]["containers"]
    }
    assert images == set(IMAGES.values())


def test_the_coordinator_service_routes_the_servers_ports_to_its_statefulset(manifests):
    (service,) = [
        s for s in _kind(manifests, "Service") if s["metadata"]["name"] == "confide-coordinator"
    ]
    (stateful,) = _kind(manifests, "StatefulSet")
    pod = stateful["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert stateful["spec"]["serviceName"] == service["metadata"]["name"]
    (container,) = pod["spec"]["containers"]
    named = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert {port["port"] for port in service["spec"]["ports"]} == PORTS == set(named.values())
    assert all(port["targetPort"] in named for port in service["spec"]["ports"])
    hosts = next(e["value"] for e in container["env"] if e["name"] == "CONFIDE_HOSTS").split(",")
    assert service["metadata"]["name"] in hosts


def test_the_coordinator_state_is_on_a_persistent_volume_claim(manifests):
    (stateful,) = _kind(manifests, "StatefulSet")
    claims = {claim["metadata"]["name"] for claim in stateful["spec"]["volumeClaimTemplates"]}
    (container,) = stateful["spec"]["template"]["spec"]["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[STATE_MOUNT] in claims


def test_the_institution_mounts_its_secret_state_and_data_consistently(manifests):
    (deployment,) = _kind(manifests, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (container,) = pod["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert set(mounts) == set(volumes)
    claims = {c["metadata"]["name"] for c in _kind(manifests, "PersistentVolumeClaim")}
    for volume in volumes.values():
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] in claims
    secrets = {s["metadata"]["name"]: s for s in _kind(manifests, "Secret")}
    token = volumes["join-token"]["secret"]
    assert set(secrets[token["secretName"]]["stringData"]) >= {i["key"] for i in token["items"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    token_path = f"{mounts['join-token']['mountPath']}/{token['items'][0]['path']}"
    assert env["CONFIDE_TOKEN_FILE"] == token_path
    assert mounts["state"]["mountPath"] == STATE_MOUNT and mounts["data"]["readOnly"]
    assert env["CONFIDE_DATA"].startswith(mounts["data"]["mountPath"] + "/")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    enrollment = ServerSettings.model_fields["enrollment_port"].default
    assert int(env["CONFIDE_SERVER"].split(":")[1]) == enrollment


def test_kustomization_lists_every_manifest(manifests):
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_the_manifests():
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    kinds = re.findall(r"^kind: (\w+)$", rendered.stdout, flags=re.MULTILINE)
    assert sorted(kinds) == sorted(
        [
            "Namespace",
            "Service",
            "StatefulSet",
            "Secret",
            "PersistentVolumeClaim",
            "PersistentVolumeClaim",
            "Deployment",
        ]
    )


# --- jobs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("job", sorted((DEPLOY / "jobs").glob("*.toml")), ids=lambda p: p.name)
def test_example_jobs_are_valid(job):
    loaded, ignored = load_job(job)
    assert not ignored and loaded.federation.min_available <= 2
