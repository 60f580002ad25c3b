"""Promotion, rollback and listing against a real MLflow registry on a temporary SQLite store."""
import json
import multiprocessing as mp

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.config import RegistryConfig
from tasks.promote import (
    HISTORY_TAG,
    RegistryError,
    alias_step,
    aliases_of,
    champion_history,
    gate,
    list_versions,
    promote,
    rollback,
    run_all_or_nothing,
)

CFG = RegistryConfig(accuracy_tolerance=0.02, speed_margin=0.10)
NAME = "smelt-promote-test"


def metrics(em, tps):
    return {"exact_match": em, "tokens_per_s": tps}


@pytest.fixture
def registry(tmp_path):
    """A registered model with versions 1..n tagged as the register stage tags them."""
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model(NAME)

    def add(em, tps, split="split-a"):
        v = client.create_model_version(NAME, source=(tmp_path / "src").as_uri()).version
        for k, val in {"smelt.exact_match": em, "smelt.tokens_per_s": tps, "smelt.eval_split": split,
                       "smelt.quant_method": "none", "smelt.dataset_version": "d1"}.items():
            client.set_model_version_tag(NAME, v, k, str(val))
        return str(v)
    return client, add, tmp_path


def test_gate_numbers():
    champ = metrics(0.80, 200.0)
    assert gate(metrics(0.80, 200), None, CFG) == (True, "no champion yet")
    assert gate(metrics(0.79, 185), champ, CFG)[0]
    ok, why = gate(metrics(0.70, 400), champ, CFG)
    assert not ok and "exact match 0.700 < champion 0.800" in why
    ok, why = gate(metrics(0.95, 150), champ, CFG)
    assert not ok and "150.0 tok/s < champion 200.0" in why


def test_the_gate_cannot_decide_when_timing_noise_reaches_the_speed_margin():
    champ = {**metrics(0.80, 200.0), "tokens_per_s_spread": 0.03}
    assert gate({**metrics(0.80, 195.0), "tokens_per_s_spread": 0.04}, champ, CFG)[0]
    for noisy in ({**metrics(0.80, 195.0), "tokens_per_s_spread": 0.12}, metrics(0.80, 195.0)):
        ok, why = gate(noisy, {**champ, "tokens_per_s_spread": 0.12 if "tokens_per_s_spread" not in noisy else 0.03}, CFG)
        assert not ok and why.startswith("cannot decide: tokens/s moved 12.0% across timing passes")


def test_the_gate_compares_the_configured_accuracy_metric(registry):
    client, add, home = registry
    f1 = RegistryConfig(accuracy_tolerance=0.02, speed_margin=0.10, gate_metric="field_f1")
    v1, v2 = add(0.0, 200.0), add(0.0, 220.0)  # exact match 0 for both: only field F1 tells them apart
    for version, value in ((v1, 0.60), (v2, 0.30)):
        client.set_model_version_tag(NAME, version, "smelt.field_f1", str(value))
    assert promote(client, NAME, v1, f1, home).promoted
    refused = promote(client, NAME, v2, f1, home)
    assert not refused.promoted and "field f1 0.300 < champion 0.600" in refused.reason
    assert promote(client, NAME, v2, CFG, home).promoted  # on exact match (0 = 0) the faster one passes


def test_gate_refuses_a_worse_challenger_and_accepts_a_better_one(registry):
    client, add, home = registry
    v1, worse, slower, better = add(0.80, 200.0), add(0.60, 900.0), add(0.95, 100.0), add(0.85, 210.0)
    assert promote(client, NAME, v1, CFG, home).promoted
    r = promote(client, NAME, worse, CFG, home)
    assert not r.promoted and "exact match 0.600 < champion 0.800" in r.reason and r.champion == v1
    r = promote(client, NAME, slower, CFG, home)
    assert not r.promoted and "100.0 tok/s < champion 200.0" in r.reason
    assert client.get_model_version(NAME, worse).tags["smelt.gate"].startswith("refused: exact match")
    assert json.loads(client.get_model_version(NAME, worse).tags["smelt.gate_numbers"])["champion"]["exact_match"] == 0.8
    r = promote(client, NAME, better, CFG, home)
    assert r.promoted and r.previous_champion == v1
    assert aliases_of(client, NAME) == {"champion": better, "previous-champion": v1}
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 4  # nothing deleted


def test_numbers_from_different_eval_splits_are_not_compared(registry):
    client, add, home = registry
    v1, v2 = add(0.5, 100.0, split="a"), add(0.9, 900.0, split="b")
    promote(client, NAME, v1, CFG, home)
    r = promote(client, NAME, v2, CFG, home)
    assert not r.promoted and "not comparable" in r.reason
    # The pipeline passes the champion re-measured on the challenger's split:
    r = promote(client, NAME, v2, CFG, home, champion_metrics={**metrics(0.5, 100.0), "eval_split": "b"})
    assert r.promoted


def test_force_needs_a_reason_and_records_it(registry):
    client, add, home = registry
    v1, v2 = add(0.9, 200.0), add(0.1, 10.0)
    promote(client, NAME, v1, CFG, home)
    with pytest.raises(RegistryError, match="--reason"):
        promote(client, NAME, v2, CFG, home, force=True)
    r = promote(client, NAME, v2, CFG, home, force=True, reason="hotfix for a tokenizer bug")
    assert r.promoted and aliases_of(client, NAME)["champion"] == v2
    gate_tag = client.get_model_version(NAME, v2).tags["smelt.gate"]
    assert "forced" in gate_tag and "hotfix for a tokenizer bug" in gate_tag and "exact match 0.100" in gate_tag


def test_rollback_restores_the_previous_champion_step_by_step(registry):
    client, add, home = registry
    v1, v2, v3 = add(0.5, 100.0), add(0.6, 100.0), add(0.7, 100.0)
    for v in (v1, v2, v3):
        assert promote(client, NAME, v, CFG, home).promoted
    assert champion_history(client, NAME) == [v1, v2, v3]
    r = rollback(client, NAME, home, reason="bad answers in production")
    assert r.version == v2 and aliases_of(client, NAME) == {"champion": v2, "previous-champion": v1}
    assert "bad answers in production" in client.get_model_version(NAME, v3).tags["smelt.rolled_back"]
    rollback(client, NAME, home)
    assert aliases_of(client, NAME) == {"champion": v1}  # nothing further back
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(client, NAME, home)
    assert aliases_of(client, NAME) == {"champion": v1}


def test_unknown_model_and_version_are_named(registry):
    client, add, home = registry
    add(0.5, 1.0)
    with pytest.raises(RegistryError, match="has no version '7'; versions: \\['1'\\]"):
        promote(client, NAME, "7", CFG, home)
    with pytest.raises(RegistryError, match="no registered model named 'nope'"):
        rollback(client, "nope", home)


def test_a_failed_step_puts_back_the_aliases_already_moved(registry):
    client, add, _ = registry
    v1, v2 = add(0.5, 1.0), add(0.5, 1.0)
    client.set_registered_model_alias(NAME, "champion", v1)
    before = aliases_of(client, NAME)
    steps = [alias_step(client, NAME, "previous-champion", v1, before), alias_step(client, NAME, "champion", v2, before),
             alias_step(client, NAME, "challenger", "999", before)]  # no version 999: MLflow refuses this step
    with pytest.raises(MlflowException):
        run_all_or_nothing(steps)
    assert aliases_of(client, NAME) == {"champion": v1}


def promote_many(uri: str, home: str, versions: list[str]) -> None:
    from pathlib import Path

    client = MlflowClient(tracking_uri=uri)
    for v in versions:
        promote(client, NAME, v, CFG, Path(home), force=True, reason="race test")


def test_racing_promotions_leave_a_consistent_registry(registry):
    client, add, home = registry
    first = add(0.5, 100.0)
    promote(client, NAME, first, CFG, home)
    batches = [[add(0.5, 100.0) for _ in range(3)] for _ in range(4)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=promote_many, args=(client.tracking_uri, str(home), b)) for b in batches]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0
    history = champion_history(client, NAME)
    # Every promotion is in the history exactly once, and the aliases agree with its end.
    assert sorted(history, key=int) == sorted([first] + [v for b in batches for v in b], key=int)
    assert aliases_of(client, NAME) == {"champion": history[-1], "previous-champion": history[-2]}
    assert json.loads(client.get_registered_model(NAME).tags[HISTORY_TAG]) == history


def test_list_versions_shows_aliases_metrics_and_lineage(registry):
    client, add, home = registry
    v1, v2 = add(0.5, 100.0), add(0.4, 300.0)
    promote(client, NAME, v1, CFG, home)
    client.set_registered_model_alias(NAME, "challenger", v2)
    rows = list_versions(client, NAME)
    assert [r["version"] for r in rows] == [v1, v2]
    assert rows[0]["aliases"] == ["champion"] and rows[1]["aliases"] == ["challenger"]
    assert rows[1]["tokens_per_s"] == "300.0" and rows[0]["dataset_version"] == "d1"
    assert rows[0]["gate"].startswith("promoted: no champion yet")


@pytest.mark.integration
def test_promotion_and_rollback_through_a_tracking_server(tmp_path):
    """The same registry operations against `mlflow server` (what `smelt up` starts) over HTTP."""
    from cli.stack import start_services, stop_services
    from tests.helpers import free_port

    [state] = start_services(tmp_path, ["mlflow"], {"mlflow": free_port()})
    try:
        client = MlflowClient(tracking_uri=state.api_url)
        client.create_registered_model(NAME)
        run = client.create_run(client.create_experiment("remote"))  # the server takes sources only from a run's artifacts
        versions = []
        for em in (0.5, 0.7, 0.2):
            v = client.create_model_version(NAME, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version
            for k, val in {"smelt.exact_match": em, "smelt.tokens_per_s": 100.0, "smelt.eval_split": "s"}.items():
                client.set_model_version_tag(NAME, v, k, str(val))
            versions.append(str(v))
        assert promote(client, NAME, versions[0], CFG, tmp_path).promoted
        assert promote(client, NAME, versions[1], CFG, tmp_path).promoted
        assert not promote(client, NAME, versions[2], CFG, tmp_path).promoted
        rollback(client, NAME, tmp_path)
        assert aliases_of(client, NAME) == {"champion": versions[0]}
        assert [r["aliases"] for r in list_versions(client, NAME)] == [["champion"], [], []]
    finally:
        stop_services(tmp_path, ["mlflow"])
