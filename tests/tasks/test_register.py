from tasks.config import RegistryConfig
from tasks.register import version_tags
from tasks.results import EvalReport


def test_version_tags_carry_lineage_identity_and_gate_numbers():
    lineage = {"smelt.dataset_version": "d1", "smelt.config_hash": "c1", "smelt.git_commit": "abc"}
    r = EvalReport(candidate="none-plain-x", quant_method="none", strategy="plain", eval_split="s1", exact_match=0.5,
                   tokens_per_s=120.0, field_accuracy=0.5, draft_acceptance=None, size_bytes=10, latency_p50_s=0.1,
                   latency_p95_s=0.2)
    tags = version_tags(r, lineage)
    assert tags["smelt.dataset_version"] == "d1" and tags["smelt.git_commit"] == "abc"
    assert tags["smelt.exact_match"] == "0.5" and tags["smelt.tokens_per_s"] == "120.0"
    assert tags["smelt.eval_split"] == "s1" and tags["smelt.draft_artifact"] == "none"
    assert all(isinstance(v, str) for v in tags.values())
    # every metric EvalReport declares as tracked is a tag, unmeasured ones included (as "None")
    assert {f"smelt.{k}" for k, m in EvalReport.metrics().items() if m.tracked} <= set(tags)
    assert tags["smelt.draft_acceptance"] == "None"


def test_a_champion_measured_on_another_eval_split_is_re_evaluated_on_this_one(tiny_model_dir, tmp_path):
    import json

    from mlflow.tracking import MlflowClient

    from models.candidate import assemble_candidate
    from models.config import DecodeConfig
    from models.quant import quantize_model
    from tasks.config import EtlConfig, EvalConfig, PipelineConfig
    from tasks.etl import build_dataset
    from tasks.evaluate import eval_split_key
    from tasks.register import champion_on_split

    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Say {i}.", "completion": str(i)}) + "\n" for i in range(60)))
    dataset = build_dataset(EtlConfig(sources=[str(src)], eval_fraction=0.2, max_tokens=256), tmp_path, str(tiny_model_dir))
    quantize_model("none", tiny_model_dir, tmp_path / "q", [])
    cand = assemble_candidate(tmp_path / "q", None, "plain", DecodeConfig(max_new_tokens=4), tmp_path / "candidates" / "cand-a")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = PipelineConfig(eval=EvalConfig(max_samples=3, device="cpu"), registry=RegistryConfig(tracking_uri=uri, model_name="m"))
    client = MlflowClient(tracking_uri=uri)
    client.create_registered_model("m")
    v = client.create_model_version("m", source=cand.as_uri()).version
    for k, val in {"smelt.candidate": "cand-a", "smelt.exact_match": 0.9, "smelt.tokens_per_s": 5.0, "smelt.eval_split": "old"}.items():
        client.set_model_version_tag("m", v, k, str(val))
    client.set_registered_model_alias("m", "champion", v)

    numbers = champion_on_split(client, "m", dataset, cfg, tmp_path)
    assert numbers["eval_split"] == eval_split_key(dataset, cfg.eval) and numbers["reevaluated_version"] == str(v)
    assert numbers["exact_match"] < 0.9 and numbers["tokens_per_s"] > 0  # a random model, measured afresh
    client.set_model_version_tag("m", v, "smelt.eval_split", eval_split_key(dataset, cfg.eval))
    assert champion_on_split(client, "m", dataset, cfg, tmp_path) is None  # recorded numbers already apply
