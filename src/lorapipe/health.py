"""Loss-curve diagnosis: pure functions over the logged series, usable during and after a run.

The per-step diffusion loss is dominated by the random timestep and noise of each step, so
the verdict rests mainly on the fixed-noise losses (training subset and held-out images, same
noise and timesteps at every evaluation): they move only when the model does. The moving
average of the step loss adds a check for blow-ups between evaluations.

Verdicts, checked in this order:
- diverged: a non-finite value, or a loss exploding past `explode_factor` x its minimum. Only
  losses without sampling noise count: the fixed training loss, and the step loss averaged
  over `explode_window` steps (the raw step loss of a tiny dataset swings by 2x and more
  between steps, and over thousands of steps its extremes pass any fixed limit);
- unstable: the fixed training loss rising by more than `swing` between evaluations at least
  `swing_count` times (it has no sampling noise: a well-tuned run lowers it almost
  monotonically, repeated rises mean the optimizer overshoots);
- not_learning: after `min_steps`, the fixed training loss fell by less than `min_improvement`;
- overfitting: validation above its best by `overfit_margin` for `overfit_evals` evaluations
  in a row while the fixed training loss kept falling;
- healthy: none of the above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

Series = list[tuple[int, float]]  # (step, value), in step order


@dataclass
class Verdict:
    status: str
    headline: str
    evidence: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    best_step: int | None = None  # where validation was lowest, when there is validation
    numbers: dict = field(default_factory=dict)
    command: str | None = None  # the `dvc exp run -S ...` to try next (None when healthy)

    def summary(self) -> dict:
        """The verdict's column in `dvc exp show` (its numbers go in a later column group)."""
        return {"status": self.status}


@dataclass(frozen=True)
class RunFacts:
    """The run's settings, so advice names concrete values and only changes that differ
    from what the run already did."""

    learning_rate: float
    batch_size: int
    rank: int
    images: int
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    mixed_precision: str = "no"
    task: str = "sd"  # task_type: the advice speaks of images and captions, or examples

    @classmethod
    def from_params(cls, params, images: int) -> RunFacts:
        p = params.train
        return cls(p.learning_rate, p.batch_size, params.lora.rank, images, p.grad_accum,
                   p.max_grad_norm, p.lr_scheduler, p.lr_warmup_steps, p.mixed_precision,
                   params.task_type)


# advice that depends on what the data is, per task_type
DATA_ADVICE = {
    "sd": {"check_data": "check model.base and that the captions match the images",
           "vary": ["add more varied images", "check that captions describe what varies"]},
    "llm": {"check_data": "check model.base and the answers in the data (validate's report "
                          "counts the trained tokens)",
            "vary": ["add more varied examples", "raise lora.dropout (0.05-0.1)"]},
}


def diverged_advice(f: RunFacts) -> list[str]:
    """What to change after a blow-up, leaving out what this run already does."""
    advice = [f"lower train.learning_rate ({_fmt(f.learning_rate)} -> "
              f"{_fmt(f.learning_rate / 2)} or less)"]
    if not f.max_grad_norm or f.max_grad_norm > 1.0:
        advice.append(f"clip gradients: train.max_grad_norm: 1.0 (now {_fmt(f.max_grad_norm)})")
    if not f.lr_warmup_steps:
        schedule = ("train.lr_scheduler: constant_with_warmup, " if f.lr_scheduler == "constant"
                    else "")
        advice.append(f"add a warm-up ({schedule}train.lr_warmup_steps: 50)")
    if f.mixed_precision == "fp16":
        advice.append("train.mixed_precision: bf16 or no (fp16 overflows where bf16 does not)")
    if f.batch_size * f.grad_accum < 4:
        advice.append(f"raise train.batch_size or train.grad_accum (now {f.batch_size} x "
                      f"{f.grad_accum}): larger batches give steadier gradients")
    advice.append("check the data and model.base")
    return advice


def smoothed(series: Series, window: int) -> Series:
    """Moving mean over `window` points, from the first point where the window is full."""
    if len(series) < window:
        return []
    means = np.convolve([v for _, v in series], np.ones(window) / window, mode="valid")
    return [(step, float(m)) for (step, _), m in zip(series[window - 1:], means, strict=True)]


def _finite(series: Series) -> bool:
    return all(math.isfinite(v) for _, v in series)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def diagnose(train_fixed: Series, validation: Series, current: Series, facts: RunFacts,
             t) -> Verdict:
    """Classify a run from its series (`current`: the per-step loss); `t` holds the
    thresholds (params.yaml `health`). The verdict carries the command to try next."""
    verdict = _classify(train_fixed, validation, current, facts, t)
    verdict.command = try_next(verdict, facts)
    return verdict


def try_next(v: Verdict, f: RunFacts) -> str | None:
    """The exact `dvc exp run` that applies the verdict's first advice to this run's params,
    so train, read, adjust, train again is one copy-paste."""
    changes: dict[str, object] = {}
    if v.status in ("diverged", "unstable"):
        changes["train.learning_rate"] = _fmt(f.learning_rate / 2)
    if v.status == "diverged":
        if not f.max_grad_norm or f.max_grad_norm > 1.0:
            changes["train.max_grad_norm"] = 1.0
        if not f.lr_warmup_steps:
            if f.lr_scheduler == "constant":
                changes["train.lr_scheduler"] = "constant_with_warmup"
            changes["train.lr_warmup_steps"] = 50
        if f.mixed_precision == "fp16":
            changes["train.mixed_precision"] = "bf16"
    if v.status == "unstable" and f.batch_size * f.grad_accum < 4:
        changes["train.batch_size"] = 4
    if v.status == "not_learning":
        changes["train.learning_rate"] = _fmt(max(f.learning_rate * 2, 1e-4))
    if v.status == "overfitting" and v.best_step:
        changes["train.max_steps"] = v.best_step
        if f.rank > 4:
            changes["lora.rank"] = max(4, f.rank // 2)
    if not changes:
        return None
    return "dvc exp run " + " ".join(f"-S {key}={value}" for key, value in changes.items())


def _classify(train_fixed: Series, validation: Series, current: Series, facts: RunFacts,
              t) -> Verdict:
    numbers = {}
    if train_fixed:
        numbers.update(train_fixed_start=train_fixed[0][1], train_fixed_end=train_fixed[-1][1])
    best_step = None
    if validation and _finite(validation):
        best_step, best = min(validation, key=lambda sv: sv[1])
        numbers.update(validation_best=best, validation_end=validation[-1][1])
    lower_lr = _fmt(facts.learning_rate / 2)

    for name, series in (("fixed training loss", train_fixed), ("validation loss", validation),
                         ("step loss", current)):
        if not _finite(series):
            step = next(s for s, v in series if not math.isfinite(v))
            return Verdict("diverged", f"the {name} became non-finite at step {step}",
                           [f"{name} at step {step}: {dict(series)[step]}"],
                           diverged_advice(facts), best_step, numbers)
    average = f"step loss averaged over {t.explode_window} steps"
    for name, series in (("fixed training loss", train_fixed),
                         (average, smoothed(current, t.explode_window))):
        if len(series) >= 2:
            low_step, low = min(series, key=lambda sv: sv[1])
            later = [(s, v) for s, v in series if s > low_step]
            peak_step, peak = max(later, key=lambda sv: sv[1]) if later else (low_step, low)
            if low > 0 and peak > t.explode_factor * low:
                return Verdict(
                    "diverged", f"the {name} exploded after step {low_step}",
                    [f"{name}: {_fmt(low)} at step {low_step}, then {_fmt(peak)} at step "
                     f"{peak_step} ({peak / low:.1f}x; limit {t.explode_factor:g}x)"],
                    diverged_advice(facts), best_step, numbers)

    rises = [(b[0], (b[1] - a[1]) / a[1]) for a, b in zip(train_fixed, train_fixed[1:],
                                                          strict=False) if a[1] > 0]
    jumps = [(s, r) for s, r in rises if r > t.swing]
    if len(jumps) >= t.swing_count:
        step, rise = max(jumps, key=lambda sr: sr[1])
        advice = [f"lower train.learning_rate ({_fmt(facts.learning_rate)} -> {lower_lr})"]
        if facts.batch_size * facts.grad_accum < 4:
            advice.append(f"raise train.batch_size to at least 4 (now {facts.batch_size}), "
                          "or train.grad_accum")
        return Verdict("unstable",
                       f"the fixed training loss rose {len(jumps)} times between evaluations",
                       [f"{len(jumps)} rises above {t.swing:.1%} (limit {t.swing_count}); the "
                        f"largest, {rise:.1%}, ends at step {step}"], advice, best_step, numbers)

    if train_fixed and train_fixed[-1][0] >= t.min_steps:
        first = train_fixed[0][1]
        fall = (first - min(v for _, v in train_fixed)) / first if first > 0 else 0.0
        if fall < t.min_improvement:
            return Verdict(
                "not_learning",
                f"the fixed training loss fell only {fall:.1%} in {train_fixed[-1][0]} steps",
                [f"fixed training loss {_fmt(first)} at step 0, at best "
                 f"{_fmt(min(v for _, v in train_fixed))}; a learning run falls by more than "
                 f"{t.min_improvement:.0%}"],
                [f"raise train.learning_rate (now {_fmt(facts.learning_rate)}, e.g. to "
                 f"{_fmt(max(facts.learning_rate * 2, 1e-4))})",
                 DATA_ADVICE[facts.task]["check_data"],
                 "train longer (train.max_steps) or raise lora.rank"], best_step, numbers)

    if validation and best_step is not None and len(validation) > t.overfit_evals:
        best = numbers["validation_best"]
        tail = validation[-t.overfit_evals:]
        train_at_best = min((abs(s - best_step), v) for s, v in train_fixed)[1]
        if all(s > best_step and v > best * (1 + t.overfit_margin) for s, v in tail) \
                and train_fixed[-1][1] < train_at_best:
            advice = [f"stop earlier: the best validation loss was at step {best_step} "
                      "(train.max_steps, or train.early_stop.patience)",
                      *DATA_ADVICE[facts.task]["vary"]]
            if facts.rank > 4:
                advice.insert(1, f"lower lora.rank ({facts.rank} -> {max(4, facts.rank // 2)})")
            return Verdict(
                "overfitting",
                f"validation loss rising since step {best_step} while training loss falls",
                [f"validation {_fmt(best)} at step {best_step}, {_fmt(tail[-1][1])} at step "
                 f"{tail[-1][0]}; training fixed loss {_fmt(train_at_best)} -> "
                 f"{_fmt(train_fixed[-1][1])}"], advice, best_step, numbers)

    headline = "fixed losses falling or settled"
    if train_fixed:
        headline = (f"fixed training loss {_fmt(train_fixed[0][1])} -> "
                    f"{_fmt(train_fixed[-1][1])}")
    return Verdict("healthy", headline, [], ["nothing to change"], best_step, numbers)


def to_markdown(v: Verdict, run: str) -> str:
    lines = [f"# Training health: {v.status}", "", f"Run `{run}`: {v.headline}.", ""]
    if v.evidence:
        lines += ["## Evidence", "", *[f"- {e}" for e in v.evidence], ""]
    if v.numbers:
        lines += ["## Numbers", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {_fmt(x) if isinstance(x, float) else x} |"
                  for k, x in v.numbers.items()]
        if v.best_step is not None:
            lines.append(f"| best validation step | {v.best_step} |")
        lines.append("")
    lines += ["## What to do", "", *[f"- {a}" for a in v.advice], ""]
    if v.command:
        lines += ["Try next:", "", "```sh", v.command, "```", ""]
    return "\n".join(lines)
