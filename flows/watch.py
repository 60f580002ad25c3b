"""Retrain on new data: watch a data folder and emit `smelt.data.changed` to Prefect when its
content changes; the retrain deployment's event trigger turns that into a run.

- Unchanged content never emits: the folder's digest (names + file hashes) is compared with the
  last digest emitted, kept in SMELT_HOME/watch/.
- A burst of files emits once: the watcher waits until the folder has been quiet for a while.
- `smelt data add` copies files in atomically (hidden temp name, then rename) and emits at once.
- The watched location may be an fsspec URI (s3://, gs://, file://...): its data files are mirrored
  into the local folder first (only those whose fsspec key changed), and ETL reads the mirror.
"""
from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

from models.artifacts import digest, file_digest, read_json, write_json
from tasks.data.formats import EXTENSIONS, base_suffix

DATA_EVENT = "smelt.data.changed"


def folder_digest(folder: Path) -> tuple[str, list[Path]]:
    """Content digest of the data files in `folder` (and the files), independent of listing order and mtimes."""
    files = sorted(f for f in folder.rglob("*") if f.is_file() and is_data_file(str(f.relative_to(folder)))) if folder.is_dir() else []
    return digest("watch-v1", [(str(f.relative_to(folder)), file_digest(f)) for f in files]), files


def is_data_file(rel: str) -> bool:
    """A file ETL would read from the folder: a known format, not hidden (half-copied temp files are)."""
    return base_suffix(rel) in EXTENSIONS and not any(part.startswith((".", "_")) for part in rel.split("/"))


def resource_id(folder: Path) -> str:
    return f"smelt.data.{digest(str(folder.resolve()))}"


def state_file(home: Path, folder: Path) -> Path:
    return Path(home) / "watch" / f"{digest(str(folder.resolve()))}.json"


def last_emitted(home: Path, folder: Path) -> str | None:
    path = state_file(home, folder)
    return read_json(path)["data_digest"] if path.exists() else None


async def send_event(name: str, resource: dict, payload: dict) -> None:
    from prefect.events.clients import get_events_client
    from prefect.events.schemas.events import Event

    async with get_events_client() as client:  # awaited: the CLI may exit right after
        await client.emit(Event(event=name, resource=resource, payload=payload))


def emit_if_changed(home: Path, folder: Path) -> dict | None:
    """Emit `smelt.data.changed` if the folder's content differs from what was last emitted; the payload or None."""
    data_digest, files = folder_digest(folder)
    if not files or data_digest == last_emitted(home, folder):
        return None
    payload = {"data_digest": data_digest, "folder": str(folder.resolve()), "files": [str(f.relative_to(folder)) for f in files]}
    asyncio.run(send_event(DATA_EVENT, {"prefect.resource.id": resource_id(folder), "prefect.resource.name": folder.name}, payload))
    state = state_file(home, folder)
    state.parent.mkdir(parents=True, exist_ok=True)
    write_json(state, {**payload, "emitted_at": time.time()})  # after sending: a failed send is retried next time
    return payload


def write_atomically(dst: Path, data: bytes) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp"  # hidden: ETL and the watcher skip it
    tmp.write_bytes(data)
    os.replace(tmp, dst)


def mirror(uri: str, folder: Path, home: Path) -> list[Path]:
    """Copy the data files under an fsspec URI into `folder`; only those whose key (ETag, mtime...) changed."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    keys_file = Path(home) / "watch" / f"mirror-{digest(uri)}.json"
    keys = read_json(keys_file) if keys_file.exists() else {}
    changed = []
    for remote in sorted(fs.find(root)):
        rel = remote[len(root):].lstrip("/")
        if not is_data_file(rel):
            continue
        key = fs.ukey(remote)
        if keys.get(rel) == key and (folder / rel).exists():
            continue
        write_atomically(folder / rel, fs.cat_file(remote))
        keys[rel] = key
        changed.append(folder / rel)
    keys_file.parent.mkdir(parents=True, exist_ok=True)
    write_json(keys_file, keys)
    return changed


def add_files(paths: list[Path], folder: Path) -> list[Path]:
    """Copy files into the watched folder; each appears complete or not at all."""
    folder.mkdir(parents=True, exist_ok=True)
    added = []
    for src in paths:
        if not src.is_file():
            raise FileNotFoundError(f"{src} is not a file")
        write_atomically(folder / src.name, src.read_bytes())
        added.append(folder / src.name)
    return added


def watch(home: Path, folder: Path, interval_s: float, quiet_s: float, max_polls: int | None = None,
          source_uri: str | None = None) -> list[dict]:
    """Poll `folder` (mirroring `source_uri` into it first, if given); once its content has changed and
    then stayed the same for `quiet_s`, emit once."""
    emitted, seen, since, polls = [], None, time.monotonic(), 0
    while max_polls is None or polls < max_polls:
        if source_uri:
            mirror(source_uri, folder, home)
        current, _ = folder_digest(folder)
        if current != seen:
            seen, since = current, time.monotonic()  # still changing: restart the quiet period
        elif time.monotonic() - since >= quiet_s and (payload := emit_if_changed(home, folder)):
            emitted.append(payload)
        polls += 1
        time.sleep(interval_s)
    return emitted
