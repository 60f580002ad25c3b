from tasks.config import RegistryConfig
from tasks.register import gate, select_challenger

CFG = RegistryConfig(accuracy_tolerance=0.02, speed_margin=0.10, min_accuracy_gain_to_trade_speed=0.02)


def report(em, tps, fa=0.5):
    return {"exact_match": em, "tokens_per_s": tps, "field_accuracy": fa}


def test_challenger_is_the_fastest_within_the_accuracy_margin():
    reports = [report(0.90, 100), report(0.89, 300), report(0.70, 900)]
    d = select_challenger(reports, CFG)
    assert d.chosen == 1
    assert d.reasons[0].startswith("slower") and d.reasons[2].startswith("exact match 70.0% below")


def test_challenger_is_the_most_accurate_when_the_fast_one_is_worse():
    assert select_challenger([report(0.90, 100), report(0.50, 900)], CFG).chosen == 0


def test_gate_promotes_only_when_not_less_accurate_and_not_slower():
    champ = {"exact_match": 0.80, "tokens_per_s": 200.0}
    assert gate(report(0.80, 200), None, CFG) == (True, "no champion yet")
    assert gate(report(0.79, 185), champ, CFG)[0]
    ok, why = gate(report(0.70, 400), champ, CFG)
    assert not ok and "exact match 0.700 < champion 0.800" in why
    ok, why = gate(report(0.95, 150), champ, CFG)
    assert not ok and "150.0 tok/s < champion 200.0" in why


def test_promotion_moves_aliases_only_through_the_gate_in_a_real_registry(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.register import promote_through_gate

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        client, name = MlflowClient(), "smelt-gate-test"
        client.create_registered_model(name)
        versions = [client.create_model_version(name, source=(tmp_path / f"v{i}").as_uri()).version for i in range(3)]

        def register(version, em, tps):
            for k, v in {"smelt.exact_match": em, "smelt.tokens_per_s": tps}.items():
                client.set_model_version_tag(name, version, k, str(v))
            return promote_through_gate(client, name, str(version), report(em, tps), CFG)

        assert register(versions[0], 0.80, 200.0) == (True, "no champion yet")
        promoted, why = register(versions[1], 0.60, 900.0)  # much faster, but less accurate
        assert not promoted and "exact match 0.600 < champion 0.800" in why
        assert client.get_model_version_by_alias(name, "champion").version == versions[0]
        assert client.get_model_version(name, versions[1]).tags["smelt.gate"].startswith("refused: exact match")
        assert register(versions[2], 0.85, 210.0)[0]
        assert client.get_model_version_by_alias(name, "champion").version == versions[2]
        assert client.get_model_version_by_alias(name, "previous-champion").version == versions[0]
        assert len(client.search_model_versions(f"name = '{name}'")) == 3  # nothing deleted
    finally:
        mlflow.set_tracking_uri(None)
