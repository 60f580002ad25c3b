"""`smelt bench`: how fast each serving recipe decodes the registered model, next to plain transformers.

One process, the same fine-tuned weights, prompts and greedy settings for every recipe, so the
ratios come from one run. The baseline is what a user gets by default: `model.generate` in fp32,
eager, dynamic cache. Recipes combine a weight format (each quantized artifact registered with
the champion's run) with a decode loop:
  hf        transformers' generate (with its assisted generation for the draft), as the pipeline ships today
  compiled  smelt's static-cache loop (models/fastgen.py) with each step under torch.compile
  +draft    the same loop with speculative decoding by the trained draft
  hf+draft  transformers' assisted generation with the draft: what `strategy: draft` ships today (fp32)

Per recipe: decode tokens/s at batch 1 (tokens after the first over the time after the first),
time to first token, ratio to the baseline, draft acceptance, weight bytes, effective bandwidth
(weight bytes x decode tokens/s) and its share of the machine's read bandwidth measured in the
same run, aggregate tokens/s of 8 streams decoded together, compile warm-up, and whether the
greedy tokens equal the baseline's.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.artifacts import write_json
from models.chat import render_context
from models.candidate import Recipe as CandidateRecipe
from models.candidate import Candidate, decoder_for
from models.decoding import Generation, SamplingParams, decode_rate
from models.engine import Engine, EngineConfig
from models.measure import memory_bandwidth, weight_bytes
from models.quant import load_quantized
from tasks.results import BenchRow

LOOPS = ("hf", "compiled", "compiled+draft")
FP32_LOOPS = ("compiled", "compiled+draft", "hf+draft")  # after fp32 · hf, the baseline
# weight formats of the random ~100M model: need no calibration, and read fewer bytes per token than fp32
RANDOM_FORMATS = ("bf16", "torchao-int8-dyn")


@dataclass
class Setup:
    """What every recipe shares: rendered prompts, the tokenizer, the draft, the limits."""

    tokenizer: object
    texts: list[str]
    draft: torch.nn.Module | None
    max_new_tokens: int
    streams: int
    num_draft_tokens: int


@dataclass
class Recipe:
    """One weight format x decode loop, ready to time: `decode(i)` decodes prompt i at batch 1,
    `streams()` decodes `setup.streams` prompts together (None where the loop runs one at a time)."""

    name: str
    weights: str
    loop: str
    weight_bytes: int
    decode: Callable[[int], Generation]
    streams: Callable[[], list[Generation]] | None


def serving_recipe(loop: str, setup: Setup) -> CandidateRecipe:
    """The candidate recipe (models/candidate.py) a bench loop names: `hf` and `hf+draft` decode with
    transformers' generate (assisted by the draft), `compiled` and `compiled+draft` with smelt's
    compiled static-cache loop (speculative with the draft)."""
    return CandidateRecipe(strategy="draft" if loop.endswith("+draft") else "plain", compile=loop.startswith("compiled"),
                           max_new_tokens=setup.max_new_tokens, num_draft_tokens=setup.num_draft_tokens)


def build_recipe(model, setup: Setup, weights: str, loop: str, wbytes: int) -> Recipe:
    """Time what ships: one prompt decodes through `decoder_for`, the function a loaded candidate decodes
    through; the concurrent streams go through the service's engine (models/engine.py) over the same recipe."""
    recipe = serving_recipe(loop, setup)
    draft = setup.draft if recipe.strategy == "draft" else None
    cand = Candidate(model, setup.tokenizer, draft, recipe, decoder_for(model, setup.tokenizer, draft, recipe))
    params = SamplingParams(setup.max_new_tokens)
    texts = [setup.texts[i % len(setup.texts)] for i in range(setup.streams)]
    engines: list[Engine] = []

    def streams() -> list[Generation]:
        if not engines:  # built on first use, on the thread that times it
            engines.append(Engine(cand, EngineConfig(max_batch_size=setup.streams, warm_rows=1)))
        jobs = [engines[0].submit(t, params) for t in texts]
        return [j.future.result(timeout=600) for j in jobs]
    return Recipe(f"{weights} · {loop}", weights, loop, wbytes, lambda i: cand.complete(setup.texts[i], params), streams)


def time_recipes(recipes: list[Recipe], n: int, passes: int, echo=print) -> list[dict]:
    """Warm every recipe up (compiles), then time them in turns: each recipe decodes every prompt, then
    the next recipe, `passes` times over; a recipe's speed is its median pass. This host's speed
    drifts (the same loop measured 2.5x apart minutes apart), so turns spread the drift over every
    recipe and the median drops a pass that hit a slow spell. Turns are per recipe, not per prompt:
    compiled kernels and eager PyTorch keep separate OpenMP thread pools whose threads spin a while
    after each kernel, so switching loops every prompt slows whichever runs next."""
    warmup, outs, streams = {}, {r.name: [] for r in recipes}, {r.name: [] for r in recipes}
    for r in recipes:
        echo(f"  warming up {r.name} ...")
        t0 = time.perf_counter()
        r.decode(0)
        warmup[r.name] = time.perf_counter() - t0
        if r.streams:
            r.streams()
    for p in range(passes):
        echo(f"  timing pass {p + 1}/{passes}: {len(recipes)} recipes x {n} prompts, then the concurrent streams")
        for r in recipes:
            outs[r.name].append([r.decode(i) for i in range(n)])
        for r in recipes:
            if r.streams:
                t0 = time.perf_counter()
                tokens = sum(len(d.token_ids) for d in r.streams())
                streams[r.name].append(tokens / (time.perf_counter() - t0))
    return [summarize(r, outs[r.name], warmup[r.name], streams[r.name]) for r in recipes]


def summarize(r: Recipe, passes: list[list[Generation]], warmup: float, streams: list[float]) -> dict:
    every = [o for p in passes for o in p]
    steady = sum(o.seconds for o in every) / len(every)
    proposed, accepted = sum(o.proposed for o in every), sum(o.accepted for o in every)
    rates = [decode_rate(p) for p in passes]
    totals = [sum(len(o.token_ids) for o in p) / sum(o.seconds for o in p) for p in passes]
    row = {
        "recipe": r.name, "weights": r.weights, "loop": r.loop,
        "decode_tokens_per_s": statistics.median(rates), "decode_tokens_per_s_passes": rates,
        "tokens_per_s": statistics.median(totals),
        "ttft_s": statistics.median(o.seconds if o.first_token_s is None else o.first_token_s for o in every),
        "warmup_s": max(0.0, warmup - steady),
        "draft_acceptance": accepted / proposed if proposed else None,
        "token_ids": [o.token_ids for o in passes[0]],
        "weight_bytes": r.weight_bytes,
    }
    if streams:
        row["concurrent_tokens_per_s"], row["concurrency"] = statistics.median(streams), "batched"
    else:  # queued: the streams share one loop, one request at a time
        row["concurrent_tokens_per_s"], row["concurrency"] = row["tokens_per_s"], "speculative decoding runs one stream at a time"
    row["concurrency_gain"] = row["concurrent_tokens_per_s"] / row["tokens_per_s"]
    return row


def bench_candidates(weights: dict[str, Path], draft_dir: Path | None, prompts: list[str | list[dict]],
                     max_new_tokens: int, streams: int = 8, num_draft_tokens: int = 4, passes: int = 3, echo=print,
                     peers_dir: Path | None = None) -> dict:
    """The baseline (fp32 `weights['none']`, transformers generate) and every recipe, in this process.

    `weights`: quantization method -> quantized artifact directory (models/quant), fp32 'none' required.
    With `peers_dir`, other engines (bench/peers) convert the fp32 weights there and are timed in the
    same turns.
    """
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(weights["none"])
    texts = [render_context(tokenizer, p) for p in prompts]
    setup = Setup(tokenizer, texts, AutoModelForCausalLM.from_pretrained(draft_dir, use_safetensors=True).eval() if draft_dir else None,
                  max_new_tokens, streams, num_draft_tokens)
    bandwidth = memory_bandwidth("cpu")
    echo(f"memory read bandwidth (sum over 256 MiB): {bandwidth / 1e9:.1f} GB/s")
    recipes = []
    for method, model_dir in sorted(weights.items(), key=lambda kv: kv[0] != "none"):  # fp32 first: the baseline
        model = load_quantized(model_dir, torch.device("cpu")).eval()  # each weight format loaded once for all its loops
        name = "fp32" if method == "none" else method
        loops = ("hf",) + FP32_LOOPS if method == "none" else LOOPS
        recipes += [build_recipe(model, setup, name, loop, weight_bytes(model_dir))
                    for loop in loops if setup.draft is not None or not loop.endswith("+draft")]
    if peers_dir is not None:
        from bench.peers import peer_recipes

        recipes += peer_recipes(weights["none"], setup, peers_dir, echo)
    rows = time_recipes(recipes, len(prompts), passes, echo)
    baseline = rows[0]
    baseline["recipe"] = "baseline: fp32 · transformers generate"
    for row in rows:
        row.update(effective_bandwidth_gbs=row["weight_bytes"] * row["decode_tokens_per_s"] / 1e9,
                   bandwidth_share=row["weight_bytes"] * row["decode_tokens_per_s"] / bandwidth,
                   speedup=row["decode_tokens_per_s"] / baseline["decode_tokens_per_s"],
                   same_tokens_as_baseline=sum(a == b for a, b in zip(row["token_ids"], baseline["token_ids"])))
    return {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "streams": streams, "passes": passes,
            "num_draft_tokens": num_draft_tokens, "machine_bandwidth_gbs": bandwidth / 1e9,
            "cpus": torch.get_num_threads(), "rows": [{k: v for k, v in r.items() if k != "token_ids"} for r in rows]}


def random_model(like_dir: Path, out: Path, hidden: int = 768, layers: int = 14, intermediate: int = 2048,
                 heads: int = 12) -> Path:
    """A random-init model of the same architecture and tokenizer (~100M parameters by default), saved
    as an fp32 'none' artifact: big enough that a decode step is bound by memory, not Python."""
    from transformers import AutoConfig

    from models.quant import quantize_model

    config = AutoConfig.from_pretrained(like_dir)
    config.update({"hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": intermediate,
                   "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": hidden // heads})
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="smelt-bench-random-") as tmp:
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(like_dir).save_pretrained(tmp)
        quantize_model("none", Path(tmp), out, [])
    return out


def registered_weights(client, name: str, dst: Path) -> tuple[dict[str, Path], Path | None, dict]:
    """The champion's run as registered: one model directory per quantization method, the trained
    draft, and the champion itself (version, quantization, strategy, dataset version)."""
    from tasks.register import download_candidate

    champ = client.get_model_version_by_alias(name, "champion")
    lineage = ("smelt.dataset_version", "smelt.config_hash")
    same_run = [v for v in client.search_model_versions(f"name = '{name}'")
                if all(v.tags.get(k) == champ.tags.get(k) for k in lineage)]
    weights, draft = {}, None
    # plain candidates first (no draft to copy), then one with a draft if no plain one brought it
    for v in sorted(same_run, key=lambda v: (v.tags.get("smelt.strategy") != "plain", int(v.version))):
        method, has_draft = v.tags.get("smelt.quant_method"), v.tags.get("smelt.strategy") == "draft"
        if method in weights and not (has_draft and draft is None):
            continue
        candidate = download_candidate(name, v.version, dst / f"v{v.version}")
        weights.setdefault(method, candidate / "model")
        if draft is None and (candidate / "draft").exists():
            draft = candidate / "draft"
    if "none" not in weights:
        raise ValueError(f"{name} v{champ.version}'s run registered no full-precision ('none') candidate to time as the "
                         "baseline; run the pipeline with quant.methods including none")
    return weights, draft, {"version": str(champ.version), "quant_method": champ.tags.get("smelt.quant_method"),
                            "strategy": champ.tags.get("smelt.strategy"), "dataset_version": champ.tags.get("smelt.dataset_version")}


def metric_key(recipe: str, metric: str) -> str:
    """An MLflow metric name for a recipe's number (MLflow allows letters, digits, _ - . / and spaces)."""
    return f"{recipe.replace(' · ', '.').replace('+', '_').replace(': ', '.').replace(' ', '_')}.{metric}"


def log_benchmark(result: dict, run_name: str) -> str:
    """One MLflow run in the `smelt-bench` experiment: every recipe's numbers and the whole table."""
    import mlflow

    mlflow.set_experiment("smelt-bench")
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags({f"smelt.{k}": str(v) for k, v in result.get("champion", {}).items()})
        mlflow.log_metric("machine_bandwidth_gbs", result["machine_bandwidth_gbs"])
        tables = [("", result["rows"]), ("random.", result.get("random", {}).get("rows", []))]
        for prefix, rows in tables:
            for r in rows:
                numbers = BenchRow.model_validate(r).tracked_numbers()
                mlflow.log_metrics({metric_key(prefix + r["recipe"], k): v for k, v in numbers.items()})
        mlflow.log_dict(result, "serve-benchmark.json")
    return run.info.run_id



def run_serve_benchmark(client, name: str, cfg, home: Path, n_prompts: int, max_new_tokens: int, streams: int,
                        passes: int, with_random: bool, out: Path | None, echo=print, peers: bool = False) -> dict:
    """Bench `name`'s champion run on its own eval prompts (and a random ~100M model); write the JSON
    report and log it to MLflow."""
    from models.chat import row_context
    from models.quant import quantize_model
    from tasks.etl import load_version

    with tempfile.TemporaryDirectory(prefix="smelt-bench-") as tmp:
        weights, draft, champion = registered_weights(client, name, Path(tmp))
        prompts = [row_context(r) for r in load_version(home / "datasets" / champion["dataset_version"]).rows("eval")[:n_prompts]]
        echo(f"{name} v{champion['version']} (champion: {champion['quant_method']}/{champion['strategy']}); "
             f"recipes over {sorted(weights)}, {len(prompts)} prompts, {max_new_tokens} new tokens, greedy")
        result = bench_candidates(weights, draft, prompts, max_new_tokens, streams, cfg.decode.num_draft_tokens, passes, echo,
                                  Path(tmp) / "peers" if peers else None)
        if with_random:
            fp32 = random_model(weights["none"], Path(tmp) / "random")
            formats = {"none": fp32, **{m: quantize_model(m, fp32, Path(tmp) / f"random-{m}", []) for m in RANDOM_FORMATS}}
            echo("random-init ~100M-parameter model of the same architecture:")
            result["random"] = bench_candidates(formats, None, prompts[:4],
                                                max_new_tokens, streams, cfg.decode.num_draft_tokens, passes, echo,
                                                Path(tmp) / "peers-random" if peers else None)
            result["random"]["parameters"] = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(fp32).parameters())
    result["champion"] = {"registered_model": name, **champion}
    out = out or home / "bench" / "serve" / f"{name}-v{champion['version']}.json"
    result["mlflow_run_id"] = log_benchmark(result, f"bench {name} v{champion['version']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    result["report"] = str(out)
    return result


def table_rows(rows: list[dict]) -> list[list[str]]:
    """Header + one line per recipe, formatted for the terminal: the metrics BenchRow declares for the bench."""
    typed = [BenchRow.model_validate(r) for r in rows]
    return [["recipe", *typed[0].cells("bench")]] + [[t.recipe, *t.cells("bench").values()] for t in typed]
