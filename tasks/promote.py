"""Champion management in the MLflow registry: the accuracy-and-speed gate, promotion,
rollback and listing. The pipeline's register stage and the `smelt models/promote/rollback`
commands both go through these functions.

Rules kept here:
- aliases, not stages: `challenger`, `champion`, `previous-champion`;
- promotions of one model are serialised by a lock, and each is all-or-nothing: if any step
  fails, the aliases and tags it already changed are put back;
- nothing is ever deleted; the champion history is a tag on the registered model.
"""
from __future__ import annotations

import contextlib
import getpass
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from models.artifacts import digest
from tasks.config import RegistryConfig
from tasks.results import EvalReport

log = logging.getLogger(__name__)

HISTORY_TAG = "smelt.champion_history"
HISTORY_KEEP = 100  # registry tag values are length-limited; older entries stay in the versions' own tags
LOCK_TIMEOUT_S = 300


class RegistryError(RuntimeError):
    """The registry cannot do what was asked (unknown model or version, nothing to roll back to...)."""


@dataclass
class Promotion:
    name: str
    version: str
    promoted: bool
    reason: str
    champion: str | None
    previous_champion: str | None = None
    numbers: dict = field(default_factory=dict)


def gate(challenger: dict, champion: dict | None, cfg: RegistryConfig) -> tuple[bool, str]:
    """Challenger replaces champion only if not less accurate (minus tolerance) and not much slower.

    "Much slower" is only decidable when timing noise is smaller than the margin: if either side's
    tokens/s moved across its interleaved passes by as much as `speed_margin`, the gate refuses to
    decide (no promotion) rather than let noise choose.
    """
    if champion is None:
        return True, "no champion yet"
    m, label = cfg.gate_metric, cfg.gate_metric.replace("_", " ")
    acc_floor = champion[m] - cfg.accuracy_tolerance
    speed_floor = champion["tokens_per_s"] * (1 - cfg.speed_margin)
    if challenger[m] < acc_floor:
        return False, f"{label} {challenger[m]:.3f} < champion {champion[m]:.3f} - tolerance {cfg.accuracy_tolerance}"
    spread = max(challenger.get("tokens_per_s_spread") or 0.0, champion.get("tokens_per_s_spread") or 0.0)
    if spread >= cfg.speed_margin:
        return False, (f"cannot decide: tokens/s moved {spread:.1%} across timing passes, not less than the speed margin "
                       f"{cfg.speed_margin:.0%}; rerun on a quieter machine, add eval.timing_passes, or widen "
                       f"registry.speed_margin")
    if challenger["tokens_per_s"] < speed_floor:
        return False, f"{challenger['tokens_per_s']:.1f} tok/s < champion {champion['tokens_per_s']:.1f} x (1 - {cfg.speed_margin})"
    return True, (f"{label} {challenger[m]:.3f} >= {acc_floor:.3f} and "
                  f"{challenger['tokens_per_s']:.1f} tok/s >= {speed_floor:.1f} (spread {spread:.1%} < margin {cfg.speed_margin:.0%})")


def version_metrics(version, metric: str = "exact_match") -> dict | None:
    """The gate's numbers as recorded on a model version by the register stage (None if absent)."""
    try:
        numbers = {metric: float(version.tags[f"smelt.{metric}"]),
                   "tokens_per_s": float(version.tags["smelt.tokens_per_s"]),
                   "eval_split": version.tags.get("smelt.eval_split")}
    except (KeyError, ValueError):
        return None
    spread = version.tags.get("smelt.tokens_per_s_spread")
    numbers["tokens_per_s_spread"] = float(spread) if spread is not None else None
    return numbers


def get_version(client: MlflowClient, name: str, version: str):
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        known = [str(v.version) for v in search_versions(client, name)]
        raise RegistryError(f"registered model {name!r} has no version {version!r}; versions: {known}") from None


def search_versions(client: MlflowClient, name: str) -> list:
    try:
        client.get_registered_model(name)
    except MlflowException:
        names = [m.name for m in client.search_registered_models()]
        raise RegistryError(f"no registered model named {name!r}; registered models: {names}") from None
    return sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def aliases_of(client: MlflowClient, name: str) -> dict[str, str]:
    """{alias: version} for a registered model."""
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def champion_history(client: MlflowClient, name: str) -> list[str]:
    """Versions that have been champion, oldest first, current last."""
    model = client.get_registered_model(name)
    if HISTORY_TAG in model.tags:
        return json.loads(model.tags[HISTORY_TAG])
    aliases = aliases_of(client, name)  # a registry promoted before the history tag existed
    return [v for v in (aliases.get("previous-champion"), aliases.get("champion")) if v]


def registry_lock(client: MlflowClient, name: str, home: Path) -> FileLock:
    """One lock per (tracking store, model): promotions on this machine never interleave."""
    path = home / "locks" / f"registry-{digest(client.tracking_uri, name)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path, timeout=LOCK_TIMEOUT_S)


Step = tuple[Callable[[], None], Callable[[], None]]


def run_all_or_nothing(steps: list[Step]) -> None:
    """Run (do, undo) steps in order; if one fails, undo the finished ones in reverse, then re-raise."""
    undo_stack = []
    try:
        for do, undo in steps:
            do()
            undo_stack.append(undo)
    except BaseException:
        for undo in reversed(undo_stack):
            try:
                undo()
            except Exception:  # keep undoing the rest; the original error is what the user needs
                log.exception("could not undo a registry change")
        raise


def alias_step(client: MlflowClient, name: str, alias: str, version: str | None, before: dict[str, str]) -> Step:
    """Point `alias` at `version` (None removes it); undo restores the version `before` recorded."""
    def point_to(v: str | None) -> Callable[[], None]:
        def point() -> None:
            if v is not None:
                client.set_registered_model_alias(name, alias, v)
            elif alias in aliases_of(client, name):
                client.delete_registered_model_alias(name, alias)
        return point
    return point_to(version), point_to(before.get(alias))


def model_tag_step(client: MlflowClient, name: str, key: str, value: str) -> Step:
    old = client.get_registered_model(name).tags.get(key)
    return (lambda: client.set_registered_model_tag(name, key, value),
            lambda: client.set_registered_model_tag(name, key, old) if old is not None
            else client.delete_registered_model_tag(name, key))


def version_tags_step(client: MlflowClient, name: str, version: str, tags: dict[str, str]) -> Step:
    old = client.get_model_version(name, version).tags

    def restore():
        for k in tags:
            if k in old:
                client.set_model_version_tag(name, version, k, old[k])
            else:
                client.delete_model_version_tag(name, version, k)
    return (lambda: [client.set_model_version_tag(name, version, k, v) for k, v in tags.items()], restore)


def set_champion_steps(client: MlflowClient, name: str, version: str, history: list[str], event: dict[str, str]) -> list[Step]:
    """Steps that make `version` champion with `history` (current champion last) and record `event` on it."""
    before = aliases_of(client, name)
    previous = history[-2] if len(history) > 1 else None
    return [
        version_tags_step(client, name, version, event),
        model_tag_step(client, name, HISTORY_TAG, json.dumps(history[-HISTORY_KEEP:])),
        alias_step(client, name, "previous-champion", previous, before),
        alias_step(client, name, "champion", version, before),
    ]


def decide(challenger, champion, cfg: RegistryConfig, champion_metrics: dict | None) -> tuple[bool, str, dict]:
    """Run the gate on recorded (or freshly measured) numbers; refuse when they are not comparable."""
    mine = version_metrics(challenger, cfg.gate_metric)
    if mine is None:
        return False, (f"version {challenger.version} has no recorded {cfg.gate_metric} / tokens/s "
                       "(not registered by smelt, or by an older smelt?)"), {}
    if champion is None:
        return True, "no champion yet", {"challenger": mine}
    theirs = champion_metrics or version_metrics(champion, cfg.gate_metric)
    if theirs is None:
        return False, f"champion v{champion.version} has no recorded metrics to compare with", {"challenger": mine}
    if theirs.get("eval_split") != mine.get("eval_split"):
        return False, (f"not comparable: v{challenger.version} was measured on eval split {mine.get('eval_split')}, "
                       f"champion v{champion.version} on {theirs.get('eval_split')}; rerun the pipeline on the same data "
                       "(it re-evaluates the champion) or use --force"), {"challenger": mine, "champion": theirs}
    ok, why = gate(mine, theirs, cfg)
    return ok, why, {"challenger": mine, "champion": theirs}


def promote(client: MlflowClient, name: str, version: str, cfg: RegistryConfig, home: Path, *,
            force: bool = False, reason: str | None = None, champion_metrics: dict | None = None) -> Promotion:
    """Make `version` the champion if the gate passes (or `force`, which needs a reason).

    The decision and its numbers are recorded as tags on the version either way.
    """
    if force and not (reason and reason.strip()):
        raise RegistryError("--force needs a --reason; it is recorded on the model version")
    version = str(version)
    with registry_locked(client, name, home):
        target = get_version(client, name, version)
        champ = current_champion(client, name)
        if champ is not None and str(champ.version) == version:
            return Promotion(name, version, True, "already champion", version)
        ok, why, numbers = decide(target, champ, cfg, champion_metrics)
        if force and not ok:
            ok, why = True, f"forced by {getpass.getuser()}: {reason.strip()} (gate said: {why})"
        event = {"smelt.gate": f"{'promoted' if ok else 'refused'}: {why}", "smelt.gate_numbers": json.dumps(numbers),
                 "smelt.gate_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if not ok:
            run_all_or_nothing([version_tags_step(client, name, version, event)])
            return Promotion(name, version, False, why, str(champ.version) if champ else None, numbers=numbers)
        history = [v for v in champion_history(client, name) if v != version] + [version]
        run_all_or_nothing(set_champion_steps(client, name, version, history, event))
        return Promotion(name, version, True, why, version, previous_champion=str(champ.version) if champ else None, numbers=numbers)


def rollback(client: MlflowClient, name: str, home: Path, reason: str | None = None) -> Promotion:
    """Champion back to the previous champion (and previous-champion one further back, if any)."""
    with registry_locked(client, name, home):
        search_versions(client, name)  # clear error for an unknown model
        history = champion_history(client, name)
        if len(history) < 2:
            raise RegistryError(f"{name!r} has no previous champion to roll back to (champion history: {history})")
        demoted, restored = history[-1], history[-2]
        why = f"rollback from v{demoted} by {getpass.getuser()}" + (f": {reason.strip()}" if reason else "")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        steps = [version_tags_step(client, name, demoted, {"smelt.rolled_back": f"{stamp} {why}"})]
        steps += set_champion_steps(client, name, restored, history[:-1], {"smelt.gate": f"restored: {why}", "smelt.gate_at": stamp})
        run_all_or_nothing(steps)
        return Promotion(name, restored, True, why, restored, previous_champion=history[-3] if len(history) > 2 else None)


@contextlib.contextmanager
def registry_locked(client: MlflowClient, name: str, home: Path) -> Iterator[None]:
    """Hold the model's promotion lock; a clear error if another promotion holds it too long."""
    lock = registry_lock(client, name, home)
    try:
        lock.acquire()
    except Timeout:
        raise RegistryError(f"another promotion of {name!r} has held {lock.lock_file} for over {LOCK_TIMEOUT_S} s") from None
    try:
        yield
    finally:
        lock.release()


def current_champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None


# What a version is and where it came from; its numbers are the metrics EvalReport declares `listed`.
LINEAGE_TAGS = ("quant_method", "strategy", "dataset_version", "config_hash", "git_commit", "base_model", "gate", "rolled_back")


def listed_tags() -> list[str]:
    """Keys of the smelt.<key> version tags `smelt models list` shows: listed metrics, then lineage."""
    return [k for k, m in EvalReport.metrics().items() if m.listed] + list(LINEAGE_TAGS)


def list_versions(client: MlflowClient, name: str) -> list[dict]:
    """Every version of `name` with its aliases, key metrics and lineage, oldest first."""
    versions = search_versions(client, name)
    by_version: dict[str, list[str]] = {}
    for alias, v in aliases_of(client, name).items():
        by_version.setdefault(v, []).append(alias)
    return [{"version": str(v.version), "aliases": sorted(by_version.get(str(v.version), [])),
             "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(v.creation_timestamp / 1000)),
             "run_id": v.run_id, **{k: v.tags.get(f"smelt.{k}") for k in listed_tags()}} for v in versions]
