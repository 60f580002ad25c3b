"""Selection: which evaluated candidate becomes the challenger, and why each one was or was not.

Accuracy is judged against two references measured on the same eval split: the full-precision
fine-tuned model (quant `none`, plain decoding) and the base model before fine-tuning. Among the
accepted candidates the policy picks the fastest (default) or the most accurate."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import INPUTS

from tasks.config import SelectConfig


def full_precision_reference(reports: list[dict]) -> dict:
    plain = [r for r in reports if r["quant_method"] == "none" and r["strategy"] == "plain"]
    anyway = [r for r in reports if r["quant_method"] == "none"]
    if not (plain or anyway):
        raise ValueError("the selection policy compares every candidate with the full-precision fine-tuned model: "
                         "add 'none' to quant.methods")
    return (plain or anyway)[0]


def rejections(report: dict, ref: dict, base: dict | None, cfg: SelectConfig) -> list[str]:
    """Why a candidate is not acceptable (empty: accepted)."""
    m, value = cfg.metric, report[cfg.metric]
    why = []
    floor = ref[m] - cfg.max_accuracy_drop
    if value < floor - 1e-12:
        why.append(f"{m} {value:.1%} is more than {cfg.max_accuracy_drop:.1%} below the full-precision fine-tuned "
                   f"model's {ref[m]:.1%}")
    if cfg.require_above_base and base is not None and value <= base[m]:
        why.append(f"{m} {value:.1%} is not above the base model's {base[m]:.1%}")
    return why


def select_candidate(reports: list[dict], base: dict | None, cfg: SelectConfig) -> dict:
    """{'chosen': index or None, 'reasons': one line per candidate, 'accepted': [indices], ...}."""
    ref = full_precision_reference(reports)
    verdicts = [rejections(r, ref, base, cfg) for r in reports]
    accepted = [i for i, why in enumerate(verdicts) if not why]
    speed, metric = cfg.speed_metric, cfg.metric

    def rank(i: int) -> tuple:
        r = reports[i]
        key = (r.get(speed) or 0.0, r[metric]) if cfg.policy == "fastest-within" else (r[metric], r.get(speed) or 0.0)
        return key + (-i,)  # ties: the earlier candidate (stable across reruns)

    chosen = max(accepted, key=rank) if accepted else None
    reasons = []
    for i, r in enumerate(reports):
        numbers = f"{metric} {r[metric]:.1%}, {r.get(speed) or 0:.0f} {speed}"
        if i == chosen:
            what = "fastest" if cfg.policy == "fastest-within" else "most accurate"
            reasons.append(f"chosen: {what} accepted candidate ({numbers})")
        elif i in accepted:
            reasons.append(f"accepted, not chosen: {numbers} vs the chosen {reports[chosen].get(speed) or 0:.0f} {speed}, "
                           f"{reports[chosen][metric]:.1%}")
        else:
            reasons.append("rejected: " + "; ".join(verdicts[i]))
    return {"chosen": chosen, "accepted": accepted, "reasons": reasons, "policy": cfg.model_dump(),
            "reference": ref["candidate"], "reference_accuracy": ref[metric],
            "base": base["candidate"] if base else None, "base_accuracy": base[metric] if base else None}


@task(name="select", cache_policy=INPUTS)
def select_task(reports: list[dict], base: dict | None, cfg: SelectConfig) -> dict:
    return select_candidate(reports, base, cfg)
