"""Selection: which evaluated candidate becomes the challenger, and why each one was or was not.

Accuracy is judged against two references measured on the same eval split: the full-precision
fine-tuned model (quant `none`, plain decoding) and the base model before fine-tuning. Among the
accepted candidates the policy picks the fastest (default) or the most accurate."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import INPUTS

from tasks.config import SelectConfig
from tasks.results import EvalReport, Selection


def full_precision_reference(reports: list[EvalReport]) -> EvalReport:
    plain = [r for r in reports if r.quant_method == "none" and r.strategy == "plain"]
    anyway = [r for r in reports if r.quant_method == "none"]
    if not (plain or anyway):
        raise ValueError("the selection policy compares every candidate with the full-precision fine-tuned model: "
                         "add 'none' to quant.methods")
    return (plain or anyway)[0]


def rejections(report: EvalReport, ref: EvalReport, base: EvalReport | None, cfg: SelectConfig) -> list[str]:
    """Why a candidate is not acceptable (empty: accepted)."""
    m = cfg.metric
    value, ref_value = getattr(report, m), getattr(ref, m)
    why = []
    if value < ref_value - cfg.max_accuracy_drop - 1e-12:
        why.append(f"{m} {value:.1%} is more than {cfg.max_accuracy_drop:.1%} below the full-precision fine-tuned "
                   f"model's {ref_value:.1%}")
    if cfg.require_above_base and base is not None and value <= getattr(base, m):
        why.append(f"{m} {value:.1%} is not above the base model's {getattr(base, m):.1%}")
    return why


def spread_of(report: EvalReport, speed: str) -> float:
    """How far timing noise moved this speed across interleaved passes (0 where it was not measured)."""
    return (report.tokens_per_s_spread or 0.0) if speed == "tokens_per_s" else 0.0


def within_noise(a: EvalReport, b: EvalReport, speed: str) -> bool:
    """True when the two speeds differ by less than either one's spread: the order could flip on a rerun."""
    fast_a, fast_b = getattr(a, speed) or 0.0, getattr(b, speed) or 0.0
    top = max(fast_a, fast_b)
    return top > 0 and abs(fast_a - fast_b) / top < max(spread_of(a, speed), spread_of(b, speed))


def lost_tie_by(r: EvalReport, chosen: EvalReport, metric: str) -> str:
    """Why a candidate tied on speed with the chosen one lost the tie-break (accuracy, size, median speed)."""
    if getattr(r, metric) != getattr(chosen, metric):
        return "less accurate"
    if (r.weight_bytes or 0) != (chosen.weight_bytes or 0):
        return "larger"
    return "as accurate and as large, with a slower median (a rerun could flip this)"


def select_candidate(reports: list[EvalReport], base: EvalReport | None, cfg: SelectConfig) -> Selection:
    """The chosen candidate's index (None: none accepted), the accepted ones, and a reason per candidate.

    fastest-within: the fastest accepted candidate by median tokens/s; candidates whose speed is
    within the timing spread of the fastest are tied with it, and a tie goes to the more accurate,
    then the one with fewer weight bytes (both deterministic), so noise cannot flip the choice.
    """
    ref = full_precision_reference(reports)
    verdicts = [rejections(r, ref, base, cfg) for r in reports]
    accepted = [i for i, why in enumerate(verdicts) if not why]
    speed, metric = cfg.speed_metric, cfg.metric

    def numbers(r: EvalReport) -> tuple[float, float]:
        return getattr(r, speed) or 0.0, getattr(r, metric)

    def by_accuracy(i: int) -> tuple:
        fast, accurate = numbers(reports[i])
        return accurate, fast, -i  # ties: the earlier candidate (stable across reruns)

    tied: list[int] = []
    if not accepted:
        chosen = None
    elif cfg.policy == "fastest-within":
        fastest = max(accepted, key=lambda i: (numbers(reports[i])[0], -i))
        tied = [i for i in accepted if i == fastest or within_noise(reports[i], reports[fastest], speed)]
        chosen = max(tied, key=lambda i: (numbers(reports[i])[1], -(reports[i].weight_bytes or 0), numbers(reports[i])[0], -i))
    else:
        chosen = max(accepted, key=by_accuracy)
    reasons = []
    for i, r in enumerate(reports):
        fast, accurate = numbers(r)
        said = f"{metric} {accurate:.1%}, {fast:.0f} {speed}" + (f" ±{spread_of(r, speed):.0%}" if spread_of(r, speed) else "")
        if i == chosen:
            what = "fastest" if cfg.policy == "fastest-within" else "most accurate"
            if len(tied) > 1:
                what = f"fastest within timing noise of {len(tied) - 1} other(s), then most accurate and smallest"
            reasons.append(f"chosen: {what} accepted candidate ({said})")
        elif i in accepted:
            best_fast, best_accurate = numbers(reports[chosen])
            tie = f"within timing noise of the chosen, and {lost_tie_by(r, reports[chosen], metric)}; " if i in tied else ""
            reasons.append(f"accepted, not chosen: {tie}{said} vs the chosen {best_fast:.0f} {speed}, {best_accurate:.1%}")
        else:
            reasons.append("rejected: " + "; ".join(verdicts[i]))
    return Selection(chosen=chosen, accepted=accepted, reasons=reasons, policy=cfg.model_dump(), reference=ref.candidate,
                     reference_accuracy=getattr(ref, metric), base=base.candidate if base else None,
                     base_accuracy=getattr(base, metric) if base else None)


@task(name="select", cache_policy=INPUTS)
def select_task(reports: list[EvalReport], base: EvalReport | None, cfg: SelectConfig) -> Selection:
    return select_candidate(reports, base, cfg)
