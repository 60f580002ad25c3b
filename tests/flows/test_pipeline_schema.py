from prefect.utilities.callables import parameter_schema

from flows.pipeline import pipeline


def test_flow_parameter_is_the_typed_pipeline_config():
    """The Prefect UI renders a form from this schema: every stage config must be in it, typed."""
    schema = parameter_schema(pipeline.fn).model_dump()
    assert list(schema["properties"]) == ["config"]
    defs = schema["definitions"]
    for name in ("PipelineConfig", "TrainConfig", "QuantConfig", "EtlConfig", "EvalConfig", "RegistryConfig"):
        assert name in defs, sorted(defs)
    steps = defs["TrainConfig"]["properties"]["steps"]
    assert steps["type"] == "integer" and steps["minimum"] == 1 and steps["description"]
    methods = defs["QuantConfig"]["properties"]["methods"]["items"]
    assert "torchao-int8-dyn" in methods["enum"]
