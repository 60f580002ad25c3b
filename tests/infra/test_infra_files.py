"""The compose file and Kubernetes manifests, checked by parsing them and cross-checking that services,
ports, credentials and variables line up (fast; the stack itself is brought up by
tests/infra/test_compose_stack.py, marked slow)."""
import json
import re
from urllib.parse import urlparse

import yaml

from models.settings import load_settings
from serving.config import ServeConfig
from tasks.config import REPO_ROOT

INFRA = REPO_ROOT / "infra"


def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def resolve(value: str) -> str:
    """Expand ${VAR:-default} the way compose does with VAR unset."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", value)


def env_of(service: dict) -> dict:
    return {k: resolve(str(v)) for k, v in (service.get("environment") or {}).items()}


def test_compose_has_the_whole_stack_on_the_hosts_loopback_from_local_images():
    services = compose()["services"]
    assert {"postgres", "prefect-server", "mlflow", "worker", "bento"} <= set(services)
    for name, svc in services.items():
        assert svc["network_mode"] == "host" and "ports" not in svc, name  # each binds its own 127.0.0.1 port
        build = svc.get("build")
        if build:
            dockerfile = (INFRA / build["context"] / build["dockerfile"]).read_text()
            assert re.search(r"^FROM smelt-base:latest$", dockerfile, re.M), name  # made here, no registry
        elif "minio" not in svc.get("profiles", []):
            assert svc.get("profiles") == ["bento"], f"{name} needs a registry image outside an optional profile"
    listens = [resolve(" ".join(svc["command"]) if isinstance(svc.get("command"), list) else svc.get("command", ""))
               for svc in services.values()]
    for command in listens:
        for host in re.findall(r"--(?:host|address|console-address) (\S+)", command):
            assert host.startswith("127.0.0.1"), command
    assert "listen_addresses=127.0.0.1" in (INFRA / "docker" / "postgres-entrypoint.sh").read_text()
    declared = set(compose()["volumes"])
    for svc in services.values():
        for volume in svc.get("volumes", []):
            src = volume.split(":")[0]
            assert src.startswith(".") or src in declared, volume


def test_databases_and_credentials_line_up():
    services = compose()["services"]
    pg = env_of(services["postgres"])
    prefect_db = urlparse(env_of(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"])
    mlflow_cmd = resolve(services["mlflow"]["command"])
    mlflow_db = urlparse(re.search(r"--backend-store-uri (\S+)", mlflow_cmd).group(1))
    # the drivers the project image has: asyncpg comes with Prefect, psycopg2-binary is a locked dependency
    assert (prefect_db.scheme, mlflow_db.scheme) == ("postgresql+asyncpg", "postgresql+psycopg2")
    for url in (prefect_db, mlflow_db):
        assert (url.hostname, url.port, url.username, url.password) == ("127.0.0.1", int(pg["POSTGRES_PORT"]),
                                                                       pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"])
    assert {prefect_db.path.lstrip("/"), mlflow_db.path.lstrip("/")} == set(pg["POSTGRES_DBS"].split())


def test_mlflow_serves_artifacts_from_a_declared_volume():
    mlflow = compose()["services"]["mlflow"]
    dest = re.search(r"--artifacts-destination (\S+)", mlflow["command"]).group(1)
    assert "--serve-artifacts" in mlflow["command"]
    assert any(v.split(":")[1] == dest and v.split(":")[0] in compose()["volumes"] for v in mlflow["volumes"])


def test_worker_and_clients_point_at_the_servers_compose_runs():
    spec = compose()
    services = spec["services"]
    worker_env = {**{k: resolve(str(v)) for k, v in spec["x-smelt-env"].items()}, **env_of(services["worker"])}
    api = urlparse(worker_env["PREFECT_API_URL"])
    assert api.hostname == "127.0.0.1" and f"--port {api.port}" in resolve(services["prefect-server"]["command"])
    tracking = urlparse(worker_env["MLFLOW_TRACKING_URI"])
    assert tracking.hostname == "127.0.0.1" and f"--port {tracking.port}" in resolve(services["mlflow"]["command"])
    assert f"--pool {worker_env['SMELT_WORK_POOL']}" in services["worker"]["command"]
    assert worker_env["SMELT_WORK_POOL"] == load_settings().work_pool
    for key in env_of(services["bento"]):
        assert key.removeprefix("SMELT_").lower() in ServeConfig.model_fields or key == "SMELT_HOST", key


def test_the_worker_image_copies_every_package_the_wheel_builds():
    """`uv sync` installs the project, whose wheel lists these folders: a package missing from the
    image fails the build (or a flow run, on the first import of it)."""
    import tomllib

    packages = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    copied = re.findall(r"^COPY (\S+) \1$", (INFRA / "docker" / "smelt.Dockerfile").read_text(), re.M)
    assert set(packages) <= set(copied) and {"cli", "bench"} <= set(packages)


def manifests() -> dict[str, list[dict]]:
    return {p.name: list(yaml.safe_load_all(p.read_text())) for p in sorted((INFRA / "k8s").glob("*.yaml"))}


def test_kubernetes_worker_has_the_rights_to_run_jobs():
    docs = {(d["kind"], d["metadata"]["name"]): d for docs in manifests().values() for d in docs}
    deployment = docs[("Deployment", "smelt-worker")]
    pod = deployment["spec"]["template"]["spec"]
    assert ("ServiceAccount", pod["serviceAccountName"]) in docs
    role = docs[("Role", "smelt-worker")]
    assert any("jobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"])
    binding = docs[("RoleBinding", "smelt-worker")]
    assert binding["roleRef"]["name"] == role["metadata"]["name"] and binding["subjects"][0]["name"] == pod["serviceAccountName"]
    assert {d["metadata"].get("namespace") for d in docs.values() if d["kind"] != "Namespace"} == {"smelt"}
    assert ("Namespace", "smelt") in docs
    command = pod["containers"][0]["command"]
    assert command[command.index("--type") + 1] == "kubernetes"


def test_kubernetes_bento_probes_and_settings_match_the_service():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in manifests()["bento.yaml"]}
    container = docs[("Deployment", "smelt-bento")]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" and container["livenessProbe"]["httpGet"]["path"] == "/livez"
    for env in container["env"]:
        assert env["name"].removeprefix("SMELT_").lower() in ServeConfig.model_fields or env["name"] == "SMELT_HOST"
    service = docs[("Service", "smelt-bento")]
    assert service["spec"]["selector"] == docs[("Deployment", "smelt-bento")]["spec"]["selector"]["matchLabels"]


def test_work_pool_template_declares_every_variable_it_uses():
    template = json.loads((INFRA / "k8s" / "work-pool-template.json").read_text())
    used = set(re.findall(r"\{\{ (\w+) \}\}", json.dumps(template["job_configuration"])))
    assert used <= set(template["variables"]["properties"]), used - set(template["variables"]["properties"])
    assert template["job_configuration"]["job_manifest"]["kind"] == "Job"
