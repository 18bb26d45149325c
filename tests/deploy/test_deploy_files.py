"""deploy/: the Dockerfile, compose file, Kubernetes manifests and the monitoring (Prometheus,
Grafana) agree with each other and with the code (images, ports, volumes, paths, metric
names). No container engine is needed: the files are parsed and cross-checked; `kubectl
kustomize` runs when kubectl is installed."""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from confide.client import cli as client_cli
from confide.client import metrics as client_metrics
from confide.client.institution import InstitutionConfig
from confide.server import cli as server_cli
from confide.server import metrics as server_metrics
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
# Services of the compose file that are not confide's: its monitoring, from pinned images.
MONITORING = {"prometheus", "grafana"}
INSTITUTIONS = ("hospital-a", "hospital-b")


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
        if name in MONITORING:
            tag = service["image"].partition(":")[2]
            assert tag and tag != "latest", f"{name}: pin the image's version"
            continue
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
            if source.startswith("./"):  # a file of deploy/, mounted read-only
                assert (DEPLOY / source).exists() and volume.endswith(":ro"), (name, volume)
                continue
            assert source in declared, f"{name}: volume {source} is not declared"
        assert all(dep in compose["services"] for dep in service.get("depends_on", {})), name
    for name in ("coordinator", *INSTITUTIONS):
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


# --- monitoring: Prometheus and Grafana ----------------------------------------------------------


def _mounted(service: dict, target: str) -> Path:
    """The file of deploy/ that `service` mounts at `target`."""
    (source,) = [v.split(":")[0] for v in service["volumes"] if v.split(":")[1] == target]
    return DEPLOY / source


def _cli_default(command: object, option: str) -> object:
    return inspect.signature(command).parameters[option].default  # type: ignore[arg-type]


def test_the_commands_serve_metrics_on_the_ports_the_modules_name_on_loopback_by_default():
    assert _cli_default(server_cli.start, "metrics_port") == server_metrics.METRICS_PORT
    assert _cli_default(server_cli.start, "metrics_address") == "127.0.0.1"
    # An institution's are its settings (saved by `join`); the options only override them.
    fields = InstitutionConfig.model_fields
    assert fields["metrics_port"].default == client_metrics.METRICS_PORT
    assert fields["metrics_address"].default == "127.0.0.1"
    for command in (client_cli.start, client_cli.join):
        assert _cli_default(command, "metrics_port") is None
        assert _cli_default(command, "metrics_address") is None


_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_UNIT_SECONDS = {
    "ms": 0.001,
    "s": 1,
    "m": 60,
    "h": 3600,
    "d": 86400,
    "w": 7 * 86400,
    "y": 365 * 86400,
}


def _seconds(duration: str) -> float:
    """A Prometheus duration ("15s", "1m30s", "500ms") in seconds."""
    parts = _DURATION.findall(duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(int(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def test_prometheus_durations_are_read_as_durations():
    assert _seconds("20s") < _seconds("3m") < _seconds("1h") and _seconds("1m30s") == 90
    assert _seconds("500ms") == 0.5 and not _seconds("9s") <= _seconds("10ms")


def test_prometheus_scrapes_the_coordinator_and_each_institution_where_they_serve(compose):
    services = compose["services"]
    prometheus = services["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = yaml.safe_load(_mounted(prometheus, "/etc/prometheus/prometheus.yml").read_text())
    targets = {
        target: static.get("labels", {})
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    expected = {f"coordinator:{server_metrics.METRICS_PORT}": {}} | {
        f"{name}:{client_metrics.METRICS_PORT}": {"institution": name} for name in INSTITUTIONS
    }
    assert targets == expected
    scrape = config["global"]
    assert _seconds(scrape["scrape_timeout"]) <= _seconds(scrape["scrape_interval"])
    for target in targets:
        service = services[target.split(":")[0]]
        # Inside a container the endpoint must listen beyond the container's loopback.
        assert service["environment"]["CONFIDE_METRICS_ADDRESS"] == "0.0.0.0", target
        assert target.split(":")[0] in prometheus["depends_on"]
    # Published to the host's loopback only, as the coordinator's ports are.
    for name in MONITORING:
        assert all(port.startswith("127.0.0.1:") for port in services[name]["ports"]), name


def _dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "confide.json").read_text())


def _queried(dashboard: dict) -> set[str]:
    """Every metric a panel of `dashboard` queries, as exported (a histogram's series named
    by the histogram)."""
    names = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"\bconfide_[a-z_]+", target["expr"]):
                names.add(re.sub(r"_(bucket|count|sum)$", "", name))
    return names


def test_the_dashboard_queries_only_metrics_the_code_exports():
    exported = server_metrics.METRICS | client_metrics.METRICS
    queried = _queried(_dashboard())
    assert queried <= set(exported), sorted(queried - set(exported))
    histograms = {name for name in queried if exported[name] == "histogram"}
    assert histograms == {"confide_round_duration_seconds"}
    # What the dashboard is for: online, runs, round time, refusals, every epsilon.
    assert {
        "confide_institutions_online",
        "confide_runs",
        "confide_round_duration_seconds",
        "confide_replies_refused_total",
        "confide_central_epsilon",
        "confide_institution_epsilon",
        "confide_client_epsilon_remaining",
    } <= queried


def test_grafana_provisions_the_prometheus_source_and_the_dashboard_it_mounts(compose):
    grafana = compose["services"]["grafana"]
    provisioning = _mounted(grafana, "/etc/grafana/provisioning")
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    prometheus_port = compose["services"]["prometheus"]["ports"][0].split(":")[-1]
    assert source["type"] == "prometheus"
    assert source["url"] == f"http://prometheus:{prometheus_port}"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "confide.yml").read_text())[
        "providers"
    ]
    dashboard_file = _mounted(grafana, f"{provider['options']['path']}/confide.json")
    assert dashboard_file == DEPLOY / "grafana" / "confide.json"
    dashboard = _dashboard()
    (variable,) = dashboard["templating"]["list"]
    assert variable["current"]["value"] == source["uid"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]


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
