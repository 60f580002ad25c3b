"""Containers: the champion's Bento as a Docker image built here, from a base image made here.

No image registry is reachable from these machines, so the base image is made locally from Debian
packages by infra/docker/base-image.sh (debootstrap + `docker import`) and named by the hash of that
script: it is built once per machine and reused. BentoML's own `containerize` then builds the Bento's
image on top of it (its generated Dockerfile installs the pinned requirements with uv from PyPI).
Every container runs with host networking on a 127.0.0.1 port.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from models.settings import REPO_ROOT

BASE_SCRIPT = REPO_ROOT / "infra" / "docker" / "base-image.sh"
UV_VERSION = "0.13.9"  # the uv inside the base image; part of its tag
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
DOCKERD_HINT = ("start one as root, on the loopback only: `apt-get install -y docker.io debootstrap && "
                "dockerd --bridge=none --iptables=false --ip6tables=false &`")


class ContainerError(RuntimeError):
    """Docker is missing or refused a step; the message says which step and what to do."""


def base_image_tag() -> str:
    """`smelt-base:<hash>` of the base-image recipe and the uv it installs: a changed recipe is a new image."""
    digest = hashlib.sha256(BASE_SCRIPT.read_bytes() + UV_VERSION.encode()).hexdigest()[:12]
    return f"smelt-base:{digest}"


@lru_cache(maxsize=1)
def torch_index() -> str | None:
    """The extra package index the image takes torch from: PyTorch's CPU wheels, so a CPU image does not
    carry CUDA libraries (~3 GB). SMELT_TORCH_INDEX overrides it ("pypi": PyPI's wheel, which bundles CUDA).
    Unreachable (offline machines reach PyPI only) -> PyPI, said on stderr."""
    chosen = os.environ.get("SMELT_TORCH_INDEX", TORCH_CPU_INDEX)
    if chosen == "pypi":
        return None
    try:
        urllib.request.urlopen(chosen.rstrip("/") + "/torch/", timeout=5).close()
        return chosen
    except (urllib.error.URLError, OSError) as err:
        print(f"smelt: torch index {chosen} unreachable ({err}); the image takes torch from PyPI, which "
              f"bundles CUDA libraries (~3 GB more). Set SMELT_TORCH_INDEX to a reachable CPU index to avoid it.",
              flush=True)
        return None


def docker(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    exe = shutil.which("docker")
    if exe is None:
        raise ContainerError(f"no `docker` command on PATH: {DOCKERD_HINT}")
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise ContainerError(f"`docker {' '.join(args[:3])} ...` failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def require_daemon() -> None:
    if docker("info", "--format", "{{.ServerVersion}}", timeout=30, check=False).returncode != 0:
        raise ContainerError(f"no Docker daemon answers: {DOCKERD_HINT}")


def image_exists(tag: str) -> bool:
    return docker("image", "inspect", tag, timeout=30, check=False).returncode == 0


def ensure_base_image() -> str:
    """The base image's tag, building it first if this machine lacks it (~1-2 min; root and debootstrap)."""
    require_daemon()
    tag = base_image_tag()
    if not image_exists(tag):
        build_base_image(tag)
    docker("tag", tag, "smelt-base:latest")  # what infra/docker/*.Dockerfile start FROM
    return tag


def build_base_image(tag: str) -> None:
    if shutil.which("debootstrap") is None:
        raise ContainerError(f"the base image {tag} is not built and debootstrap is missing: "
                             "`apt-get install -y debootstrap`, then rerun")
    print(f"smelt: building base image {tag} from Debian packages ({BASE_SCRIPT.relative_to(REPO_ROOT)}) ...", flush=True)
    proc = subprocess.run(["bash", str(BASE_SCRIPT), tag], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "UV_VERSION": UV_VERSION})
    if proc.returncode != 0:
        raise ContainerError(f"building the base image {tag} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def client_version(exe: str) -> tuple[int, ...]:
    out = subprocess.run([exe, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True, timeout=30)
    return tuple(int(p) for p in re.findall(r"\d+", out.stdout)[:2]) or (0,)


def buildkit_backend() -> str:
    """The BentoML builder backend to use: "docker", or, when that client cannot build with BuildKit (its
    generated Dockerfile uses RUN --mount), "docker-buildkit": the same builder on an older Docker client
    that has BuildKit inside. Clients from 23 on need the buildx plugin for it; some machines pair such a
    client without buildx (/usr/local/bin) with Debian's docker.io, whose client is 20.10 (/usr/bin)."""
    from bentoml._internal.container import BUILDER_REGISTRY, docker as docker_builder
    import bentoml

    default = shutil.which("docker")
    if default and subprocess.run([default, "buildx", "version"], capture_output=True, timeout=30).returncode == 0:
        return "docker"
    if "docker-buildkit" in BUILDER_REGISTRY:
        return "docker-buildkit"
    older = [exe for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin"]
             if os.access(exe := os.path.join(d, "docker"), os.X_OK) and (0,) < client_version(exe) < (23,)]
    if not older:
        raise ContainerError("`docker build` needs BuildKit and this Docker client has no buildx plugin: install it "
                             "(Docker's docker-buildx-plugin package), or Debian's docker.io, whose client has BuildKit inside")
    bentoml.container.register_backend("docker-buildkit", binary=older[0], buildkit_support=True,
                                       health=docker_builder.health, env=docker_builder.ENV,
                                       construct_build_args=docker_builder.construct_build_args)
    return "docker-buildkit"


@dataclass(frozen=True)
class Image:
    tag: str
    size_bytes: int
    build_seconds: float


def image_tag_for(registered: str, mlflow_version: str) -> str:
    return f"{registered.lower().replace('_', '-')}:v{mlflow_version}"


def containerize(bento_tag: str, image_tag: str, labels: dict[str, str]) -> Image:
    """`bentoml containerize` of one Bento into `image_tag` (host network for PyPI during the build)."""
    import bentoml

    ensure_base_image()
    start = time.perf_counter()
    try:
        bentoml.container.build(bento_tag, backend=buildkit_backend(), image_tag=(image_tag,), network="host",
                                label={f"smelt.{k}": v for k, v in labels.items()})
    except Exception as err:  # BentoML wraps the builder's failure; keep its message, name the step
        raise ContainerError(f"bentoml containerize {bento_tag} failed: {err}") from err
    seconds = time.perf_counter() - start
    if not image_exists(image_tag):  # BentoML logs some build failures instead of raising them
        raise ContainerError(f"bentoml containerize {bento_tag} did not produce {image_tag}; its log is above")
    size = int(docker("image", "inspect", "--format", "{{.Size}}", image_tag).stdout.strip())
    return Image(tag=image_tag, size_bytes=size, build_seconds=seconds)


def image_labels(image_tag: str) -> dict[str, str]:
    out = docker("image", "inspect", "--format", "{{json .Config.Labels}}", image_tag).stdout
    return json.loads(out) or {}


def run_container(image_tag: str, name: str, port: int, env: dict[str, str] | None = None) -> str:
    """Start the image detached with host networking, its API on 127.0.0.1:`port`; returns the container id.
    A container of the same name is replaced."""
    docker("rm", "-f", name, check=False)
    args = ["run", "-d", "--name", name, "--network", "host", "-e", "SMELT_HOST=127.0.0.1"]
    for key, value in (env or {}).items():
        args += ["-e", f"{key}={value}"]
    return docker(*args, image_tag, "--port", str(port)).stdout.strip()


def wait_ready(port: int, timeout: float = 600, container: str | None = None) -> float:
    """Seconds until GET 127.0.0.1:`port`/readyz answers 200; raises with the container's log tail if it
    exits or the time runs out."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
                if resp.status == 200:
                    return time.perf_counter() - start
        except (urllib.error.URLError, OSError):
            pass
        if container and not container_running(container):
            raise ContainerError(f"container {container} exited before it was ready:\n{logs(container)}")
        time.sleep(1)
    raise ContainerError(f"127.0.0.1:{port}/readyz not ready after {timeout:.0f} s"
                         + (f":\n{logs(container)}" if container else ""))


def container_running(name: str) -> bool:
    return docker("inspect", "--format", "{{.State.Running}}", name, check=False).stdout.strip() == "true"


def logs(container: str, tail: int = 40) -> str:
    proc = docker("logs", "--tail", str(tail), container, check=False)
    return (proc.stdout + proc.stderr)[-4000:]


def save_logs(container: str, path: Path) -> None:
    """The container's whole log (stdout and stderr, timestamped) written to `path`, for after it is gone."""
    proc = docker("logs", "--timestamps", container, check=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(proc.stdout + proc.stderr)


def stop_container(name: str) -> None:
    docker("rm", "-f", name, check=False)
