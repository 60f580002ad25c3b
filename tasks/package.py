"""Packaging stage: import the MLflow champion into BentoML's model store and build a Bento.

The Bento carries serving/ and models/ only, with pinned requirements; `bentoml containerize`
turns it into an image where a Docker daemon exists.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version as pkg_version
from pathlib import Path

import bentoml
import yaml
from mlflow.tracking import MlflowClient
from prefect import task

from models.artifacts import code_digest, read_json
from models.quant import runtime_library
from models.candidate import RECIPE, Recipe
from models.settings import BENTO_MODEL_FILE, REPO_ROOT
from tasks.caching import STAGE_CACHE
from tasks.config import RegistryConfig
from tasks.container import base_image_tag, torch_index
from tasks.register import download_candidate
from tasks.results import BentoRef, ContainerImage
from tasks.tracking import use_tracking

BENTO_SOURCES = ("serving", "models")
BENTO_PACKAGES = ["torch", "transformers", "tokenizers", "safetensors", "torchao", "accelerate", "bentoml", "pydantic",
                  "pydantic-settings", "fastapi", "prometheus-client", "llguidance",
                  "ninja"]  # ninja: torch builds smelt's int8 kernel (models/csrc) with it at load time


def bento_model_name(registered: str) -> str:
    return registered.lower().replace("_", "-")


def existing_models(name: str) -> list:
    try:
        return bentoml.models.list(name)
    except bentoml.exceptions.NotFound:
        return []


def import_champion(registered: str, client: MlflowClient) -> str:
    """Copy `models:/<registered>@champion` into the BentoML model store (once per MLflow version)."""
    champ = client.get_model_version_by_alias(registered, "champion")
    name = bento_model_name(registered)
    for m in existing_models(name):
        if m.info.labels.get("mlflow_version") == str(champ.version):
            return str(m.tag)
    with tempfile.TemporaryDirectory(prefix="smelt-champion-") as tmp:
        candidate = download_candidate(registered, champ.version, Path(tmp))
        with bentoml.models.create(
            name,
            labels={"registered_model": registered, "mlflow_version": str(champ.version)},
            # BentoML metadata takes only basic values: unset recipe fields (None) are left out.
            metadata={"recipe": Recipe.model_validate(read_json(candidate / RECIPE)).model_dump(exclude_none=True),
                      "mlflow_run_id": champ.run_id},
        ) as model:
            shutil.copytree(candidate, model.path, dirs_exist_ok=True)
    return str(model.tag)


def bento_labels(model_tag: str) -> dict[str, str]:
    return {"model": model_tag.replace(":", "-"), "source": code_digest(BENTO_SOURCES),
            "base_image": base_image_tag().split(":")[1]}


def bento_packages(quant_method: str) -> list[str]:
    """The serving stack, plus the library that loads the champion's quantization (gptqmodel,
    bitsandbytes) when it needs one, each pinned to the version installed here."""
    extra = runtime_library(quant_method)
    names = BENTO_PACKAGES + ([extra] if extra and extra not in BENTO_PACKAGES else [])
    return [f"{p}=={pkg_version(p)}" for p in names]


def model_quant_method(model_tag: str) -> str:
    """The quantization method recorded with a model-store model ("none" if it is not in the store)."""
    try:
        return bentoml.models.get(model_tag).info.metadata.get("recipe", {}).get("quant_method", "none")
    except bentoml.exceptions.NotFound:
        return "none"


def bentofile(model_tag: str) -> dict:
    python = {"packages": bento_packages(model_quant_method(model_tag)), "lock_packages": False}
    if index := torch_index():  # CPU torch wheels where reachable (no CUDA libraries in a CPU image)
        python["extra_index_url"] = [index]
    return {
        "service": "serving.service:SmeltService",
        "name": "smelt",
        "labels": bento_labels(model_tag),
        "include": ["serving/**/*.py", str(BENTO_MODEL_FILE), "models/**/*.py", "models/csrc/*.cpp"],
        "exclude": ["**/__pycache__"],
        "python": python,
        # Made here from Debian packages (tasks/container.py): no image registry is needed to containerize.
        "docker": {"base_image": base_image_tag()},
    }


def build_bento(model_tag: str) -> str:
    """`bentoml build` of serving/ + models/ around one model-store tag; returns the Bento tag.

    Runs the real CLI in a subprocess on a temporary build context holding serving/ and models/
    plus the pinned model tag (models/settings.py: BENTO_MODEL_FILE), the one place the service reads it
    from (BentoML's loader puts the build context first on sys.path, so the build imports that copy).
    """
    with tempfile.TemporaryDirectory(prefix="smelt-bento-") as tmp:
        ctx = Path(tmp) / "ctx"
        for pkg in ("serving", "models"):  # the Bento carries these two packages and nothing else
            shutil.copytree(REPO_ROOT / pkg, ctx / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        (ctx / BENTO_MODEL_FILE).write_text(model_tag + "\n")
        spec = Path(tmp) / "bentofile.yaml"
        spec.write_text(yaml.safe_dump(bentofile(model_tag)))
        proc = subprocess.run(
            [sys.executable, "-m", "bentoml", "build", "-f", str(spec), "--output", "tag", str(ctx)],
            capture_output=True, text=True, timeout=600,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"bentoml build failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    tag = proc.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    return tag


def package_champion(registered: str, registry: RegistryConfig, home: Path) -> BentoRef:
    """Import the champion (once per MLflow version) and return its Bento, building it only if none exists."""
    model_tag = import_champion(registered, use_tracking(registry, home))
    return BentoRef(model_tag=model_tag, bento_tag=find_bento(model_tag) or build_bento(model_tag))


def find_bento(model_tag: str) -> str | None:
    """The newest Bento built around `model_tag` from the current serving/ and models/ code, if any."""
    try:
        bentos = bentoml.list("smelt")
    except bentoml.exceptions.NotFound:
        return None
    want = bento_labels(model_tag)  # same model, same code, same base image
    hits = [b for b in bentos if all(b.info.labels.get(k) == v for k, v in want.items())]
    return str(max(hits, key=lambda b: b.info.creation_time).tag) if hits else None


@task(name="package", retries=2, retry_delay_seconds=[5, 30], cache_policy=STAGE_CACHE, persist_result=True)
def package_task(registered: str, champion_version: str | None, registry: RegistryConfig, home: str) -> BentoRef:
    # champion_version is part of the cache key: a new champion means a new Bento.
    return package_champion(registered, registry, Path(home))


def containerize_champion(registered: str, registry: RegistryConfig, home: Path) -> ContainerImage:
    """The champion's Bento as a Docker image `<name>:v<mlflow version>`, labelled with its lineage; an
    image of that tag from the same Bento is reused."""
    from tasks.container import containerize, image_exists, image_labels, image_tag_for

    client = use_tracking(registry, home)
    champ = client.get_model_version_by_alias(registered, "champion")
    bento = package_champion(registered, registry, home)
    tag = image_tag_for(registered, champ.version)
    if image_exists(tag) and image_labels(tag).get("smelt.bento") == bento.bento_tag:
        return ContainerImage(image_tag=tag, bento_tag=bento.bento_tag, mlflow_version=str(champ.version), built=False)
    lineage = {k: champ.tags.get(f"smelt.{k}", "") for k in ("dataset_version", "config_hash", "git_commit", "quant_method", "strategy")}
    image = containerize(bento.bento_tag, tag, {"registered_model": registered, "mlflow_version": str(champ.version),
                                               "bento": bento.bento_tag, **lineage})
    return ContainerImage(image_tag=tag, bento_tag=bento.bento_tag, mlflow_version=str(champ.version), built=True,
                          size_bytes=image.size_bytes, build_seconds=round(image.build_seconds, 1))
