"""Benchmarks through EleutherAI's lm-evaluation-harness, run as a library on an already-loaded model.

Two kinds of task:
  smelt-embedded  the project's own eval rows as an lm-eval task defined on local files: each prompt
                  rendered with the tokenizer's chat template (the text serving feeds the model),
                  greedy generation to the end of the assistant's turn, exact match on the completion.
  anything else   a task from lm-eval's registry (hellaswag, arc_easy, ...). Those read Hugging Face
                  datasets; where the hub cannot be reached and the dataset is not cached, the task
                  is reported in `skipped` with the reason instead of failing the run.

lm-eval's defaults are tuned for loading a model by name; for a model handed over in memory we
switch off what would change it or the prompt: no BOS added in front of our rendered prompt, no chat
template of its own, no re-tying of (possibly quantized) output embeddings, no global RNG reseeding.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import yaml

from models.chat import render_context, render_full, row_context

EMBEDDED_TASK = "smelt-embedded"
BATCH_SIZE = 8
HUB_PROBE_TIMEOUT_S = 3.0
# Room after the longest completion for the end-of-turn marker and for the completion tokenizing a
# little differently inside the conversation than on its own; a model that runs on is wrong anyway.
END_SLACK_TOKENS = 8


def run_lm_eval(model, tokenizer, task_names: list[str], eval_rows: list[dict], limit: int | None, workdir: Path,
                *, max_gen_toks: int | None = None) -> dict:
    """Returns {"results": {task: {metric: value, ...}}, "skipped": {task: "clear reason"}}.

    `limit` caps documents per task; `max_gen_toks` caps each smelt-embedded answer (default: enough
    for the longest completion and its end-of-turn marker). Everything lm-eval writes goes under `workdir`.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of documents per task (or None for all), got {limit!r}")
    names = list(dict.fromkeys(task_names))  # once each, in the order asked
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, str] = {}
    if EMBEDDED_TASK in names and not eval_rows:
        names.remove(EMBEDDED_TASK)
        skipped[EMBEDDED_TASK] = "no eval rows were given, so there is nothing to score: skipped"
    task_dir = write_embedded_task(tokenizer, eval_rows, workdir, max_gen_toks) if EMBEDDED_TASK in names else None
    from_registry = [n for n in names if n != EMBEDDED_TASK]
    manager = build_task_manager(task_dir, with_registry=bool(from_registry))
    offline = bool(from_registry) and not hub_reachable(HUB_PROBE_TIMEOUT_S)
    with hub_offline(offline):
        tasks = load_tasks(manager, names, skipped)
        results = evaluate_tasks(model, tokenizer, manager, tasks, limit) if tasks else {}
    return {"results": results, "skipped": skipped}


def write_embedded_task(tokenizer, rows: list[dict], workdir: Path, max_gen_toks: int | None) -> Path:
    """Write the eval rows (with their rendered prompts) and the smelt-embedded task YAML; returns the task folder.

    The prompt is rendered here, in Python, with the same chat rendering serving uses, so the YAML only
    reads a field and lm-eval never formats a prompt of its own.
    """
    task_dir = workdir / "lm-eval-tasks"  # its own folder: lm-eval indexes every YAML under an include path
    task_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": r["prompt"], "completion": r["completion"],
                         "rendered_prompt": render_context(tokenizer, row_context(r))}) for r in rows]
    text = "\n".join(lines) + "\n"
    # Named by content: datasets knows a cached local file by path and modification time, not content.
    data_file = task_dir / f"rows-{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    data_file.write_text(text, encoding="utf-8")
    config = embedded_task_config(data_file, workdir / "datasets-cache", end_of_turn(tokenizer),
                                  max_gen_toks or answer_budget(tokenizer, rows))
    (task_dir / f"{EMBEDDED_TASK}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return task_dir


def embedded_task_config(data_file: Path, cache_dir: Path, stop: str | None, max_gen_toks: int) -> dict:
    return {
        "task": EMBEDDED_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "rendered_prompt",  # a column name: lm-eval returns the field as it is
        "doc_to_target": "completion",
        # lm-eval adds the tokenizer's EOS itself; the template's end-of-turn marker may differ from it.
        "generation_kwargs": {"until": [stop] if stop else [], "do_sample": False, "max_gen_toks": max_gen_toks},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "regexes_to_ignore": [r"^\s+|\s+$"]}],  # compare with surrounding whitespace stripped
        "metadata": {"version": 1.0},
    }


def end_of_turn(tokenizer) -> str | None:
    """The marker the chat template puts after an assistant answer (e.g. "<|end|>", "<|im_end|>"), if any."""
    sentinel = "SMELT-ANSWER-SENTINEL"
    tail = render_full(tokenizer, "question", sentinel).split(sentinel, 1)[-1].strip()
    return tail.split()[0] if tail else None


def answer_budget(tokenizer, rows: list[dict]) -> int:
    longest = max(len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) for r in rows)
    return longest + END_SLACK_TOKENS


def build_task_manager(task_dir: Path | None, with_registry: bool):
    """lm-eval's task index, with our task folder; its own registry (thousands of YAMLs, seconds) only when needed."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir) if task_dir else None, include_defaults=with_registry)


def hub_reachable(timeout_s: float) -> bool:
    """Whether the Hugging Face hub answers within `timeout_s` (False at once where offline mode is set).

    Probed in a thread because name resolution ignores socket timeouts and can stall for tens of
    seconds on a machine without a resolver; datasets itself would retry for half a minute per task.
    """
    import datasets.config
    from huggingface_hub import constants

    if datasets.config.HF_HUB_OFFLINE or constants.HF_HUB_OFFLINE:
        return False
    answered = threading.Event()

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout_s).close()
            answered.set()
        except urllib.error.HTTPError:
            answered.set()  # an error status is still an answer: the hub is there
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return answered.is_set()


@contextmanager
def hub_offline(enabled: bool):
    """Put datasets and huggingface_hub in offline mode for this block: cached datasets still load,
    missing ones fail at once instead of retrying. Both read HF_HUB_OFFLINE once at import, so the
    module flags are set (and put back) rather than the environment variable."""
    if not enabled:
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def load_tasks(manager, names: list[str], skipped: dict[str, str]) -> list:
    """Build each task (loading its dataset); a registry task that cannot be built goes to `skipped` with the reason."""
    built = []
    for name in names:
        if name not in manager.task_index:
            skipped[name] = unknown_task_reason(manager, name)
            continue
        try:
            loaded = manager.load([name])
        except (OSError, ImportError) as err:  # datasets' ConnectionError, DatasetNotFoundError, ...; a missing extra
            if name == EMBEDDED_TASK:
                raise  # our own local files: failing to read them is a bug to see, not a download to skip
            skipped[name] = unavailable_reason(manager, name, err)
            continue
        # a group keeps its own aggregate score; a task or a tag contributes its tasks
        built.extend([loaded["groups"][name]] if name in loaded["groups"] else loaded["tasks"].values())
    return built


def unknown_task_reason(manager, name: str) -> str:
    close = difflib.get_close_matches(name, manager.all_tasks, n=3)
    hint = f"did you mean {', '.join(map(repr, close))}?" if close else "list the known ones with `uv run lm-eval ls tasks`"
    return f"unknown lm-eval task {name!r} (not {EMBEDDED_TASK!r} and not in lm-eval's task registry): {hint}"


def unavailable_reason(manager, name: str, err: Exception) -> str:
    import datasets.config

    if isinstance(err, ImportError):
        return f"needs a Python package that is not installed ({err}): skipped"
    cfg = manager.task_index[name].cfg or {}
    dataset = f"the Hugging Face dataset {cfg['dataset_path']!r}" if cfg.get("dataset_path") else "Hugging Face datasets"
    if datasets.config.HF_HUB_OFFLINE:
        return (f"needs {dataset}, which cannot be downloaded here (offline) and is not in the local datasets cache: "
                f"skipped ({type(err).__name__}: {err})")
    return f"needs {dataset}, which could not be loaded: skipped ({type(err).__name__}: {err})"


def evaluate_tasks(model, tokenizer, manager, tasks: list, limit: int | None) -> dict:
    from lm_eval import simple_evaluate

    with model_left_as_is(model):
        lm = wrap_model(model, tokenizer)
    out = simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=limit,
        apply_chat_template=False,  # prompts arrive rendered with the model's own template
        log_samples=False, bootstrap_iters=0,  # no per-sample copies, no resampling: scores only
        random_seed=None, numpy_random_seed=None, torch_random_seed=None,  # leave the caller's RNGs alone
    )
    return collect_metrics(out)


def wrap_model(model, tokenizer):
    from lm_eval.models.huggingface import HFLM

    # add_bos_token=False makes HFLM encode with add_special_tokens=False, like models.decoding: the
    # rendered prompt already holds every special token the template wants, a second BOS would shift it.
    return HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=BATCH_SIZE, add_bos_token=False)


@contextmanager
def model_left_as_is(model):
    """HFLM's constructor calls model.eval() and model.tie_weights(). Re-tying points a tied lm_head back
    at the input embedding, which silently undoes a quantized lm_head (torchao int4 replaces it with
    its own tensor): the scores would describe another model, and the caller's model would change."""
    training = model.training
    model.tie_weights = lambda *args, **kwargs: None  # shadows the method on this instance only
    try:
        yield
    finally:
        del model.tie_weights
        model.train(training)


def collect_metrics(out: dict) -> dict:
    """{task: {metric: value}} from lm-eval's results: numbers only, "exact_match,none" shortened to
    "exact_match" (a named filter stays, e.g. "exact_match,strict-match"), plus "samples", the documents scored."""
    metrics = {}
    for task, values in out["results"].items():
        row = {key.removesuffix(",none"): float(v) for key, v in values.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and key != "sample_len"}
        if task in out.get("n-samples", {}):
            row["samples"] = out["n-samples"][task]["effective"]
        metrics[task] = row
    return metrics
