"""The whole pipeline on the micro preset, through the real CLI: real Prefect, MLflow and BentoML."""
import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import free_port, smelt_env

pytestmark = pytest.mark.integration


def run_smelt(home, *args):
    env = smelt_env(home)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cli.main", "run", "--config", "micro-cpu", *args],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout, time.perf_counter() - t0


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e-home")
    out, seconds = run_smelt(home)
    return home, out, seconds


# A script's preamble: the micro preset's MLflow runs, as `runs`, and the client `c`.
RUNS = """
import json
from mlflow.tracking import MlflowClient
c = MlflowClient()
exp = c.get_experiment_by_name('smelt-micro-cpu')
runs = c.search_runs([exp.experiment_id])
"""


def in_subprocess(home, code: str) -> str:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}", "BENTOML_HOME": str(home / "bentoml")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


def test_summary_table_and_next_commands_are_printed(first_run):
    _, out, _ = first_run
    assert "Candidates (dataset" in out
    for word in ("torchao-int8-dyn", "none", "plain", "draft", "exact match", "field F1", "ppl", "tok/s", "TTFT ms",
                 "8-stream tok/s", "weights MB", "chosen", "reference: the base model before fine-tuning", "Selection: fastest-within"):
        assert word in out
    assert "smelt models list smelt-micro-embedded" in out and "smelt up" in out and "smelt serve smelt-micro-embedded" in out
    assert "MLflow run " in out and "challenger v" in out
    assert "Fine-tuning gain on the eval split" in out and "exact match" in out.split("Fine-tuning gain")[1]


def test_evaluation_report_with_pictures_is_in_mlflow_and_names_why_each_candidate_was_chosen(first_run):
    home, _, _ = first_run
    got = json.loads(in_subprocess(home, """
import json, pathlib, mlflow
from mlflow.tracking import MlflowClient
c = MlflowClient()
champ = c.get_model_version_by_alias('smelt-micro-embedded', 'champion')
parent = c.get_run(champ.run_id).data.tags['mlflow.parentRunId']
files = sorted(f.path for f in c.list_artifacts(parent, 'evaluation'))
local = pathlib.Path(mlflow.artifacts.download_artifacts(run_id=parent, artifact_path='evaluation'))
report = json.loads((local / 'evaluation.json').read_text())
versions = c.search_model_versions("name = 'smelt-micro-embedded'")
print(json.dumps({"files": files, "report": report, "png_bytes": [(local / p).read_bytes()[:4].hex() for p in
                  ('accuracy_vs_speed.png', 'latency.png')], "selection_tags": [v.tags.get('smelt.selection') for v in versions]}))
"""))
    assert got["files"] == ["evaluation/accuracy_vs_speed.png", "evaluation/evaluation.json", "evaluation/evaluation.md",
                            "evaluation/latency.png"]
    assert got["png_bytes"] == ["89504e47", "89504e47"]  # real PNG files
    report = got["report"]
    assert report["base"]["candidate"].startswith("base-plain-") and report["base"]["perplexity"] > 0
    for cand in report["candidates"]:
        for key in ("exact_match", "field_f1", "perplexity", "ttft_s", "decode_tokens_per_s", "latency_p95_s",
                    "concurrent_tokens_per_s", "peak_memory_bytes", "weight_bytes", "bandwidth_share", "load_s"):
            assert cand[key] is not None and cand[key] >= 0, (key, cand[key])
    chosen = report["selection"]["chosen"]
    assert report["selection"]["reasons"][chosen].startswith("chosen:")
    assert all(t and t.split(":")[0] in ("chosen", "accepted, not chosen", "rejected") for t in got["selection_tags"])


def test_registry_holds_versions_with_challenger_champion_and_lineage(first_run):
    home, _, _ = first_run
    got = json.loads(in_subprocess(home, """
import json
from mlflow.tracking import MlflowClient
c = MlflowClient()
vs = c.search_model_versions("name = 'smelt-micro-embedded'")
champ = c.get_model_version_by_alias('smelt-micro-embedded', 'champion')
chall = c.get_model_version_by_alias('smelt-micro-embedded', 'challenger')
print(json.dumps({'n': len(vs), 'champ': champ.version, 'chall': chall.version, 'tags': [v.tags for v in vs],
                  'champ_tags': champ.tags}))
"""))
    assert got["n"] == 4  # 2 quantization methods x 2 decoding strategies
    assert got["champ"] == got["chall"]
    assert got["champ_tags"]["smelt.gate"].startswith("promoted")
    for tags in got["tags"]:
        for key in ("dataset_version", "config_hash", "git_commit", "base_model", "quant_method", "draft_model", "version",
                    "eval_split", "exact_match", "tokens_per_s", "candidate"):
            assert tags.get(f"smelt.{key}") not in (None, "", "unknown"), (key, tags)
        assert tags["smelt.quant_method"] in ("none", "torchao-int8-dyn")
        assert len(tags["smelt.dataset_version"]) == 12 and len(tags["smelt.git_commit"]) == 40
        assert tags["smelt.draft_artifact"].startswith("draft-") == (tags["smelt.strategy"] == "draft")


def test_pipeline_run_has_nested_runs_per_stage_and_candidate(first_run):
    home, _, _ = first_run
    got = json.loads(in_subprocess(home, RUNS + """
parents = [r for r in runs if 'mlflow.parentRunId' not in r.data.tags]
p = parents[0]
kids = [r for r in runs if r.data.tags.get('mlflow.parentRunId') == p.info.run_id]
print(json.dumps({'parents': len(parents), 'status': p.info.status, 'params': p.data.params, 'tags': p.data.tags,
                  'kids': sorted(r.info.run_name for r in kids), 'kid_status': sorted({r.info.status for r in kids}),
                  'train_metrics': [r.data.metrics for r in kids if r.info.run_name == 'train'],
                  'draft_metrics': [r.data.metrics for r in kids if r.info.run_name == 'draft'],
                  'parent_metrics': p.data.metrics,
                  'loss_steps': [m.step for r in kids if r.info.run_name == 'train' for m in c.get_metric_history(r.info.run_id, 'loss')],
                  'lr_steps': [m.step for r in kids if r.info.run_name == 'train'
                               for m in c.get_metric_history(r.info.run_id, 'learning_rate')]}))
"""))
    assert got["parents"] == 1 and got["status"] == "FINISHED" and got["kid_status"] == ["FINISHED"]
    assert got["params"]["train.lora.r"] and got["params"]["registry.accuracy_tolerance"] and got["params"]["preset"] == "micro-cpu"
    assert got["tags"]["smelt.prefect_flow_run_id"] and got["tags"]["smelt.champion"]
    stages = {"etl", "train", "draft", "quantize-none", "quantize-torchao-int8-dyn"}
    assert stages <= set(got["kids"]) and len(set(got["kids"]) - stages) == 4  # one nested run per candidate
    assert got["train_metrics"][0]["final_loss"] > 0 and got["train_metrics"][0]["eval_loss"] > 0
    # per-step curves, logged live by the trainer every train.log_every (10) of micro-cpu's 20 steps
    assert sorted(got["loss_steps"]) == sorted(got["lr_steps"]) == [10, 20]
    assert {"grad_norm", "tokens_per_s"} <= set(got["train_metrics"][0])
    d = got["draft_metrics"][0]
    assert 0 <= d["acceptance_before"] <= 1 and 0 <= d["acceptance_after"] <= 1
    m = got["parent_metrics"]
    assert m["finetune_gain_exact_match"] == pytest.approx(m["finetuned_exact_match"] - m["base_exact_match"])
    assert "finetune_gain_field_f1" in m


def test_dataset_version_is_an_mlflow_input_of_the_runs_that_train_on_it(first_run):
    home, _, _ = first_run
    got = json.loads(in_subprocess(home, RUNS + """
def inputs(r):
    return [{'digest': d.dataset.digest, 'source': d.dataset.source, 'schema': d.dataset.schema,
             'context': {t.key: t.value for t in d.tags}.get('mlflow.data.context')} for d in r.inputs.dataset_inputs]
parent = [r for r in runs if 'mlflow.parentRunId' not in r.data.tags][0]
train = [r for r in runs if r.info.run_name == 'train'][0]
print(json.dumps({'version': parent.data.tags['smelt.dataset_version'], 'parent': inputs(parent), 'train': inputs(train),
                  'data': sorted(f.path for f in c.list_artifacts(parent.info.run_id, 'data'))}))
"""))
    for run_inputs in (got["parent"], got["train"]):
        assert [i["digest"] for i in run_inputs] == [got["version"]] and run_inputs[0]["context"] == "training"
        assert json.loads(run_inputs[0]["source"])["uri"].endswith(got["version"])
        assert "messages" in {c["name"] for c in json.loads(run_inputs[0]["schema"])["mlflow_colspec"]}
    assert got["data"] == ["data/lengths.png", "data/manifest.json", "data/report.md"]


def test_champion_loads_in_a_fresh_process_and_repeats_evaluation_outputs(first_run):
    home, _, _ = first_run
    got = json.loads(in_subprocess(home, """
import json, pathlib, mlflow, pandas as pd
uri = 'models:/smelt-micro-embedded@champion'
info = mlflow.models.get_model_info(uri)
local = pathlib.Path(mlflow.artifacts.download_artifacts(uri))
report = json.loads(next(local.rglob('eval_report.json')).read_text())
m = mlflow.pyfunc.load_model(uri)
prompts = [e['prompt'] for e in report['examples']]
print(json.dumps({'outputs': m.predict(pd.DataFrame({'prompt': prompts})), 'expected': [e['output'] for e in report['examples']],
                  'signature': info.signature.to_dict(), 'example': info.saved_input_example_info is not None,
                  'files': sorted(str(p.relative_to(local)) for p in local.rglob('*') if p.is_file())}))
"""))
    assert got["outputs"] == got["expected"] and len(got["outputs"]) == 3
    assert "prompt" in got["signature"]["inputs"] and "max_new_tokens" in got["signature"]["params"]
    assert got["example"]
    files = "\n".join(got["files"])
    for part in ("recipe.json", "model/tokenizer.json", "model/chat_template.jinja", "model/smelt_quant.json", "eval_report.json"):
        assert part in files, part


def smelt_cli(home, *args):
    env = smelt_env(home)
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, capture_output=True, text=True, timeout=300)


def test_cli_lists_promotes_with_a_recorded_reason_and_rolls_back(first_run):
    home, _, _ = first_run
    listing = smelt_cli(home, "models", "list", "-c", "micro-cpu")
    assert listing.returncode == 0, listing.stderr
    assert "smelt-micro-embedded (4 versions)" in listing.stdout and "champion" in listing.stdout
    champ = json.loads(in_subprocess(home, """
import json
from mlflow.tracking import MlflowClient
print(json.dumps(MlflowClient().get_model_version_by_alias('smelt-micro-embedded', 'champion').version))
"""))
    other = next(v for v in ("1", "2", "3", "4") if v != str(champ))
    refused = smelt_cli(home, "promote", "smelt-micro-embedded", other, "--force", "-c", "micro-cpu")
    assert refused.returncode == 2 and "--reason" in refused.stdout
    forced = smelt_cli(home, "promote", "smelt-micro-embedded", other, "--force", "--reason", "e2e test", "-c", "micro-cpu")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert f"v{other} is champion" in forced.stdout
    back = smelt_cli(home, "rollback", "smelt-micro-embedded", "--reason", "undo e2e test", "-c", "micro-cpu")
    assert back.returncode == 0 and f"champion is v{champ} again" in back.stdout, back.stdout + back.stderr
    missing = smelt_cli(home, "promote", "smelt-micro-embedded", "99", "-c", "micro-cpu")
    assert missing.returncode == 2 and "has no version '99'" in missing.stdout


def test_bench_times_the_champions_recipes_and_logs_them(first_run, tmp_path):
    home, _, _ = first_run
    out = tmp_path / "bench.json"
    done = smelt_cli(home, "bench", "-c", "micro-cpu", "-n", "2", "--streams", "2", "--max-new-tokens", "8",
                     "--no-random-100m", "--passes", "1", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "x baseline" in done.stdout and "fp32 · compiled+draft" in done.stdout
    report = json.loads(out.read_text())
    rows = {r["recipe"]: r for r in report["rows"]}
    assert {"baseline: fp32 · transformers generate", "fp32 · compiled", "fp32 · compiled+draft",
            "torchao-int8-dyn · compiled"} <= set(rows)
    for recipe in ("fp32 · compiled", "fp32 · compiled+draft", "fp32 · hf+draft"):  # lossless: the baseline's tokens
        assert rows[recipe]["same_tokens_as_baseline"] == 2, recipe
    logged = json.loads(in_subprocess(home, f"""
import json, mlflow
run = mlflow.get_run({report['mlflow_run_id']!r})
print(json.dumps([run.data.metrics.get('fp32.compiled.speedup'), run.data.tags.get('smelt.registered_model')]))
"""))
    assert logged == [pytest.approx(rows["fp32 · compiled"]["speedup"]), "smelt-micro-embedded"]


def test_bento_exists_with_serving_and_models_code(first_run):
    home, _, _ = first_run
    info = json.loads(in_subprocess(home, """
import json, bentoml, pathlib
b = bentoml.list('smelt')[-1]
src = pathlib.Path(b.path) / 'src'
print(json.dumps({'tag': str(b.tag), 'files': sorted(str(p.relative_to(src)) for p in src.rglob('*.py')),
                  'models': [str(m.tag) for m in b.info.all_models],
                  'dockerfile': (pathlib.Path(b.path) / 'env' / 'docker' / 'Dockerfile').exists()}))
"""))
    assert "serving/service.py" in info["files"] and "models/candidate.py" in info["files"]
    assert not any(f.startswith(("cli/", "flows/", "tasks/", "bench/", "tests/")) for f in info["files"])
    assert info["models"] and info["models"][0].startswith("smelt-micro-embedded:")
    assert info["dockerfile"]


def test_rerun_reuses_finished_work(first_run):
    home, _, first_seconds = first_run
    out, seconds = run_smelt(home)
    assert "Finished in" in out
    versions = in_subprocess(home, """
from mlflow.tracking import MlflowClient
print(len(MlflowClient().search_model_versions("name = 'smelt-micro-embedded'")))
""")
    assert versions == "4"  # nothing registered twice
    assert seconds < first_seconds




@pytest.fixture(scope="module")
def served(first_run):
    """The pipeline's Bento under `bentoml serve` on 127.0.0.1, with an API key from the environment."""
    import httpx

    home, out, _ = first_run
    tag = next(line.split()[1] for line in out.splitlines() if line.strip().startswith("Bento:"))
    port = free_port()
    env = {**os.environ, "BENTOML_HOME": str(home / "bentoml"), "BENTOML_DO_NOT_TRACK": "true", "SMELT_API_KEY": "e2e-key"}
    server = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", tag, "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("bentoml serve did not become ready in 180 s")
        yield f"http://127.0.0.1:{port}", home
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def champion_report(home) -> dict:
    return json.loads(in_subprocess(home, """
import json, pathlib, mlflow
local = pathlib.Path(mlflow.artifacts.download_artifacts('models:/smelt-micro-embedded@champion'))
print(json.dumps(json.loads(next(local.rglob('eval_report.json')).read_text())))
"""))


def test_openai_client_gets_the_pipelines_greedy_output(served):
    from openai import OpenAI

    url, home = served
    report = champion_report(home)
    client = OpenAI(base_url=f"{url}/v1", api_key="e2e-key", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["smelt-micro-embedded"]
    for example in report["examples"]:
        messages = [{"role": "user", "content": example["prompt"]}]
        whole = client.chat.completions.create(model="smelt-micro-embedded", messages=messages, temperature=0)
        assert whole.choices[0].message.content == example["output"]  # what evaluation generated offline
        assert whole.usage.completion_tokens > 0 and whole.usage.total_tokens > whole.usage.completion_tokens
        stream = client.chat.completions.create(model="smelt-micro-embedded", messages=messages, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == example["output"]
    text = client.completions.create(model="smelt-micro-embedded", prompt="Bob from Oslo", max_tokens=8)
    streamed = client.completions.create(model="smelt-micro-embedded", prompt="Bob from Oslo", max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text
    assert 0 < text.usage.completion_tokens <= 8
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"],
              "additionalProperties": False}
    # a bounded schema (one key, a short string, bounded whitespace) must close within 128 tokens, whatever the model
    fmt = {"type": "json_schema", "json_schema": {"name": "who", "schema": schema}}
    answer = client.chat.completions.create(model="smelt-micro-embedded", messages=messages, max_tokens=128,
                                            response_format=fmt).choices[0]
    assert answer.finish_reason == "stop" and list(json.loads(answer.message.content)) == ["name"], answer
    parts = [{"type": "text", "text": example["prompt"]}]
    assert client.chat.completions.create(model="smelt-micro-embedded", temperature=0, messages=[
        {"role": "user", "content": parts}]).choices[0].message.content == example["output"]


def test_bad_requests_get_4xx_and_the_service_keeps_serving(served):
    import httpx
    import openai

    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="e2e-key", max_retries=0)
    ok = {"model": "smelt-micro-embedded", "messages": [{"role": "user", "content": "Bob from Oslo ordered 3 cups."}]}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).chat.completions.create(**ok)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(**{**ok, "model": "gpt-4"})
    for bad in ({"max_tokens": 0}, {"max_tokens": 10**6}, {"messages": []}, {"temperature": "hot"},
                {"messages": [{"role": "user", "content": "word " * 20000}]}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(**{**ok, **bad})
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{oops", headers={"Authorization": "Bearer e2e-key",
                                                                              "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert client.chat.completions.create(**ok).choices[0].message.content is not None  # still serving
    assert httpx.get(f"{url}/livez").status_code == 200
    metrics = httpx.get(f"{url}/metrics").text
    for name in ("smelt_generated_tokens_total", "smelt_time_to_first_token_seconds", "smelt_decode_tokens_per_second",
                 "smelt_inter_token_seconds", "smelt_queue_depth", "smelt_batch_size"):
        assert name in metrics


def test_bounded_load_has_no_server_errors(served):
    import asyncio

    from bench.loadtest import run_load

    url, _ = served
    prompts = ["Extract name, city, item, qty and day as JSON.\nBob from Oslo ordered 3 cups on Monday.", "Ana from Lima"]
    stats = asyncio.run(run_load(f"{url}/v1", "smelt-micro-embedded", prompts, requests=200, concurrency=16, max_tokens=16,
                                 api_key="e2e-key", deadline_s=240))
    print("load test:", stats)
    assert stats["status"] == {200: 200}
    assert stats["completion_tokens"] > 0 and stats["p95_s"] >= stats["p50_s"] > 0


def test_smelt_package_reuses_the_bento_for_the_same_champion_and_code(first_run):
    home, out, _ = first_run
    tag = next(line.split()[1] for line in out.splitlines() if line.strip().startswith("Bento:"))
    proc = smelt_cli(home, "package", "-c", "micro-cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert tag in proc.stdout


# --- The champion as a container, rolled out behind HAProxy (tasks/container.py, tasks/deploy.py) ---

def champion_version(home) -> str:
    return in_subprocess(home, """
from mlflow.tracking import MlflowClient
print(MlflowClient().get_model_version_by_alias('smelt-micro-embedded', 'champion').version)
""")


def version_report(home, version: str) -> dict:
    return json.loads(in_subprocess(home, f"""
import json, pathlib, mlflow
local = pathlib.Path(mlflow.artifacts.download_artifacts('models:/smelt-micro-embedded/{version}'))
print(json.dumps(json.loads(next(local.rglob('eval_report.json')).read_text())))
"""))


def greedy_answers(url: str, prompts: list[str], key: str) -> list[str]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    return [client.chat.completions.create(model="smelt-micro-embedded", temperature=0,
                                           messages=[{"role": "user", "content": p}]).choices[0].message.content
            for p in prompts]


def served_version(url: str, key: str) -> str:
    import httpx

    return httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()["data"][0]["version"]


@pytest.fixture(scope="module")
def rolled_out(first_run):
    """`smelt rollout` of the micro champion: its image built (base image made here if missing), run
    with host networking behind HAProxy on a 127.0.0.1 port."""
    from tests.helpers import ensure_docker

    ensure_docker()
    home, _, _ = first_run
    port = free_port()
    env = {"SMELT_API_KEY": "e2e-key"}
    proc = subprocess.run([sys.executable, "-m", "cli.main", "rollout", "-c", "micro-cpu", "--port", str(port)],
                          env=smelt_env(home, **env), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout[-600:])
    try:
        yield f"http://127.0.0.1:{port}", home, env
    finally:
        subprocess.run([sys.executable, "-m", "cli.main", "rollout", "-c", "micro-cpu", "--stop"],
                       env=smelt_env(home, **env), capture_output=True, text=True, timeout=120)


def test_container_answers_like_smelt_serve_and_is_labelled_with_its_lineage(served, rolled_out):
    import httpx

    url, home, _ = rolled_out
    version = champion_version(home)
    assert served_version(url, "e2e-key") == version
    report = version_report(home, version)
    prompts = [ex["prompt"] for ex in report["examples"]]
    in_container = greedy_answers(url, prompts, "e2e-key")
    assert in_container == greedy_answers(served[0], prompts, "e2e-key")  # the same artifact as `smelt serve`
    assert in_container == [ex["output"] for ex in report["examples"]]  # and as evaluation
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401  # the key came from the environment
    assert httpx.get(f"{url}/livez", timeout=10).status_code == 200
    assert "smelt_generated_tokens_total" in httpx.get(f"{url}/metrics", timeout=10).text
    labels = json.loads(subprocess.run(["docker", "image", "inspect", "--format", "{{json .Config.Labels}}",
                                        f"smelt-micro-embedded:v{version}"], capture_output=True, text=True).stdout)
    assert labels["smelt.mlflow_version"] == version
    assert len(labels["smelt.dataset_version"]) >= 8 and len(labels["smelt.config_hash"]) >= 8 and labels["smelt.git_commit"]


def switch_under_load(url: str, home, env: dict, *cli_args: str) -> dict:
    """Run `smelt <cli_args>` while clients keep 8 requests in flight through the proxy; every answer's status."""
    import asyncio

    from bench.loadtest import run_load

    log = open(home / f"switch-{cli_args[0]}.log", "w+")  # a file, not a pipe: a long build log cannot block it
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", *cli_args, "-c", "micro-cpu"], env=smelt_env(home, **env),
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    status, errors, sent, deadline = {}, [], 0, time.monotonic() + 900
    prompts = ["Extract name, city, item, qty and day as JSON.\nBob from Oslo ordered 3 cups on Monday.", "Ana from Lima"]
    while proc.poll() is None or sent < 200:  # bounded: at most ~900 s and 40 requests a round
        assert time.monotonic() < deadline, "the switch did not finish in 900 s"
        stats = asyncio.run(run_load(f"{url}/v1", "smelt-micro-embedded", prompts, requests=40, concurrency=8,
                                     max_tokens=8, api_key="e2e-key", deadline_s=300))
        sent += stats["requests"]
        for code, n in stats["status"].items():
            status[code] = status.get(code, 0) + n
        errors += stats["errors"]
    log.seek(0)
    assert proc.returncode == 0, log.read()[-3000:]
    if errors:  # what the clients got, and what the containers logged about it
        status["errors"] = errors[:5]
        for saved in sorted((home / "deploy").glob("*/logs/*.log")):
            lines = saved.read_text().splitlines()
            status[saved.name] = [ln for ln in lines if "rror" in ln or "Traceback" in ln or "raise" in ln][-20:]
        status["active"] = subprocess.run(["docker", "logs", "--tail", "60", *active_containers()],
                                          capture_output=True, text=True).stderr[-4000:]
    return status


def active_containers() -> list[str]:
    names = subprocess.run(["docker", "ps", "--format", "{{.Names}}"], capture_output=True, text=True).stdout.split()
    return [n for n in names if n.startswith("smelt-micro-embedded-")][:1]


def test_rollout_of_a_new_champion_and_rollback_fail_no_request(rolled_out):
    url, home, env = rolled_out
    before = champion_version(home)
    other = next(v for v in ("1", "2", "3", "4") if v != before)
    promoted = smelt_cli(home, "promote", "smelt-micro-embedded", other, "--force", "--reason", "rollout test", "-c", "micro-cpu")
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr

    status = switch_under_load(url, home, env, "rollout")
    assert set(status) == {200} and status[200] >= 200, status
    assert served_version(url, "e2e-key") == other
    report = version_report(home, other)
    assert greedy_answers(url, [ex["prompt"] for ex in report["examples"]], "e2e-key") == [ex["output"] for ex in report["examples"]]

    status = switch_under_load(url, home, env, "rollback", "smelt-micro-embedded", "--reason", "rollout test")
    assert set(status) == {200} and status[200] >= 200, status
    assert served_version(url, "e2e-key") == before
