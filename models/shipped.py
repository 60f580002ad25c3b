"""Weights shipped inside the repository, like a small hub model: files plus a manifest of hashes.

The manifest records how the files were made (command, config, seed, tokens seen, loss curve,
machine) and the sha256 of every file; loading checks every hash, so a truncated checkout or an
edited file is refused with the file's name and the command that rebuilds it, never loaded.
"""
from __future__ import annotations

import hashlib
import json
import platform
import re
import shutil
from pathlib import Path

from models.config import EmbeddedBuildConfig

MANIFEST = "manifest.json"


class ShippedWeightsError(RuntimeError):
    """A shipped file is missing, altered, or was built from another config."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cpu_flags() -> list[str]:
    """The AVX-512 / AMX flags of this CPU (what decides its matmul kernels), as /proc/cpuinfo lists them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted(set(re.findall(r"\b(avx512[a-z_0-9]*|amx[a-z_0-9]*|avx2|fma)\b", text)))


def machine() -> dict:
    import torch

    return {"cpu_flags": cpu_flags(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def publish(tmp: Path, out: Path, manifest: dict) -> dict:
    """Hash every file under `tmp`, write the manifest there, then move `tmp` to `out` whole.

    `out` is replaced only after everything is written: an interrupted build leaves the old
    release (or nothing), never a mix.
    """
    manifest = {**manifest, "files": file_hashes(tmp)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    return manifest


def verify(root: Path, rebuild: str) -> dict:
    """The manifest of the release in `root`, after checking every file it lists; raises
    ShippedWeightsError naming the first bad file and `rebuild` (the command that remakes it)."""
    manifest_path = root / MANIFEST
    if not manifest_path.exists():
        raise ShippedWeightsError(f"{manifest_path} is missing: the shipped weights are incomplete. "
                                  f"Restore them (git checkout -- {root}) or rebuild them with: {rebuild}")
    manifest = json.loads(manifest_path.read_text())
    for name, expected in manifest["files"].items():
        path = root / name
        if not path.exists():
            raise ShippedWeightsError(f"{path} is missing (listed in {manifest_path}). "
                                      f"Restore it (git checkout -- {path}) or rebuild the weights with: {rebuild}")
        if (actual := sha256_file(path)) != expected:
            raise ShippedWeightsError(f"{path} does not match {manifest_path} (sha256 {actual[:12]}..., expected "
                                      f"{expected[:12]}...): the file was altered or truncated (a Git LFS pointer?). "
                                      f"Restore it (git checkout -- {path}) or rebuild the weights with: {rebuild}")
    return manifest


def rebuild_command(cfg: EmbeddedBuildConfig) -> str:
    return f"uv run smelt embedded build --config <the preset that names it> --out {cfg.shipped or 'DIR'}"


def release(cfg: EmbeddedBuildConfig, root: Path) -> Path:
    """The release folder named by `cfg.shipped`, every file hash-checked and its config equal to `cfg`.
    Imports neither torch nor transformers: ETL finds the shipped tokenizer through it in a moment."""
    path = root / cfg.shipped
    manifest = verify(path, rebuild_command(cfg))
    wanted = cfg.model_dump(mode="json", exclude={"shipped"})
    if manifest["config"] != wanted:
        differ = sorted(k for k in wanted if manifest["config"].get(k) != wanted[k])
        raise ShippedWeightsError(
            f"model.embedded differs from the build in {path / MANIFEST} (fields: {', '.join(differ)}): "
            f"the shipped weights were made with other settings. Set model.embedded.shipped=null to build these "
            f"settings locally, or rebuild the release with: {rebuild_command(cfg)}")
    return path
