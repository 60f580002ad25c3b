"""Content-addressed, atomically written artifacts (directories or single JSON files).

An artifact's name carries a hash of its inputs and of the source of the modules that make it
(`artifact`), so a changed input or changed code gets a new name and nothing is bumped by hand.
It is complete only once renamed into place, so a crash never leaves a half-written model or
dataset that looks finished.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from pydantic import BaseModel


def digest(*parts: Any, length: int = 12) -> str:
    """Stable short hash of configs, strings and nested JSON-able values."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, BaseModel):
            part = part.model_dump(mode="json")
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:length]


def file_digest(path: Path, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the folder that holds models/, tasks/, serving/


def source_files(module: str, root: Path) -> list[Path]:
    """The .py files of a dotted module ("models.embedded"), a package ("models.quant": every file
    below it) or a file path relative to `root`. A name that matches nothing raises, so a module
    moved away cannot silently drop out of the keys that name it."""
    path = root / (module if module.endswith(".py") else module.replace(".", "/"))
    if path.is_dir():
        return sorted(path.rglob("*.py"))
    if path.with_suffix(".py").is_file():
        return [path.with_suffix(".py")]
    raise FileNotFoundError(f"code {module!r}: no module or package of that name under {root}")


@functools.cache  # once per process: the code that runs is the code imported when it started
def code_digest(modules: tuple[str, ...], root: Path = SOURCE_ROOT) -> str:
    """Hash of the source of `modules` (see `source_files`): the one notion of "code" that both the
    artifact keys and the Prefect cache policy (tasks/caching.py) use."""
    h = hashlib.sha256()
    for module in modules:
        for path in source_files(module, root):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; rename it into place only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(tmp: Path, final: Path) -> None:
    try:
        os.rename(tmp, final)  # atomic; refuses to replace a non-empty directory, so no check-then-rename race
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp)  # another run finished the same content-addressed work first: keep its copy


def publish_json(path: Path, obj: Any) -> None:
    """Write `obj` to `path` unless another run published it first (first finisher wins, as for dirs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    try:
        os.link(tmp, path)  # atomic, and fails instead of replacing what another run published
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


@dataclass(frozen=True)
class Artifact:
    """Where one content-addressed output lives (made by `artifact`), and how it is written."""

    path: Path

    @property
    def work(self) -> Path:
        """Scratch space that outlives a crash (checkpoints, finished shards) so a rerun resumes;
        cleared once the artifact is in place."""
        return self.path.parent / f".work-{self.path.name}"

    def exists(self) -> bool:
        return self.path.exists()

    @contextlib.contextmanager
    def build(self) -> Iterator[Path]:
        """A temp dir that becomes the artifact when the block succeeds and vanishes when it fails."""
        with atomic_dir(self.path) as tmp:
            yield tmp
        shutil.rmtree(self.work, ignore_errors=True)

    def ensure(self, make: Callable[[Path], Any]) -> Path:
        """The artifact's directory: reused when present, else `make(tmp)` fills it first."""
        if not self.path.exists():
            with self.build() as tmp:
                make(tmp)
        return self.path

    def ensure_json(self, make: Callable[[], Any]) -> Any:
        """A single-JSON-file artifact's value: read when present, else `make()` computes it first.
        Returns what is on disk, so a first run and a rerun see the same value."""
        if not self.path.exists():
            publish_json(self.path, make())
        return read_json(self.path)


def artifact(parent: Path, name: str, *inputs: Any, code: tuple[str, ...], suffix: str = "",
             root: Path = SOURCE_ROOT) -> Artifact:
    """`parent/<name>-<key><suffix>`, where the key hashes `inputs` (configs, strings, paths of the
    artifacts it is made from) and the source of `code`, the modules that make it. Name the modules
    that decide the content, not the whole repo: an unrelated edit must not redo minutes of work.
    An empty `name` makes the key the whole name (a dataset version is its key)."""
    key = digest(*inputs, code_digest(tuple(code), root))
    return Artifact(Path(parent) / f"{f'{name}-' if name else ''}{key}{suffix}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file atomically (temp file, then rename): readers see the old or the new text, never half."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + f".tmp-{uuid.uuid4().hex[:6]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def dir_size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
