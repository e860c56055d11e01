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


@dataclass(frozen=True)
class Remedy:
    """One thing to change: the advice in words, and the params it sets (the `dvc exp run -S`
    of the verdict is rendered from these; advice with no changes is for the user to judge)."""

    text: str
    changes: dict = field(default_factory=dict)


@dataclass
class Verdict:
    status: str
    headline: str
    evidence: list[str] = field(default_factory=list)
    remedies: list[Remedy] = field(default_factory=list)
    best_step: int | None = None  # where validation was lowest, when there is validation
    numbers: dict = field(default_factory=dict)

    @property
    def advice(self) -> list[str]:
        return [r.text for r in self.remedies]

    @property
    def command(self) -> str | None:
        """The exact `dvc exp run` that applies the remedies' changes to this run's params, so
        train, read, adjust, train again is one copy-paste (None when nothing to change)."""
        changes: dict[str, object] = {}
        for remedy in self.remedies:
            changes.update(remedy.changes)
        if not changes:
            return None
        return "dvc exp run " + " ".join(f"-S {key}={value}" for key, value in changes.items())

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


def diverged_remedies(f: RunFacts) -> list[Remedy]:
    """What to change after a blow-up, leaving out what this run already does."""
    remedies = [Remedy(f"lower train.learning_rate ({_fmt(f.learning_rate)} -> "
                       f"{_fmt(f.learning_rate / 2)} or less)",
                       {"train.learning_rate": _fmt(f.learning_rate / 2)})]
    if not f.max_grad_norm or f.max_grad_norm > 1.0:
        remedies.append(Remedy(f"clip gradients: train.max_grad_norm: 1.0 (now "
                               f"{_fmt(f.max_grad_norm)})", {"train.max_grad_norm": 1.0}))
    if not f.lr_warmup_steps:
        constant = f.lr_scheduler == "constant"
        schedule = "train.lr_scheduler: constant_with_warmup, " if constant else ""
        remedies.append(Remedy(
            f"add a warm-up ({schedule}train.lr_warmup_steps: 50)",
            {**({"train.lr_scheduler": "constant_with_warmup"} if constant else {}),
             "train.lr_warmup_steps": 50}))
    if f.mixed_precision == "fp16":
        remedies.append(Remedy("train.mixed_precision: bf16 or no (fp16 overflows where bf16 "
                               "does not)", {"train.mixed_precision": "bf16"}))
    if f.batch_size * f.grad_accum < 4:
        remedies.append(Remedy(f"raise train.batch_size or train.grad_accum (now "
                               f"{f.batch_size} x {f.grad_accum}): larger batches give "
                               "steadier gradients"))
    remedies.append(Remedy("check the data and model.base"))
    return remedies


def diverged_advice(f: RunFacts) -> list[str]:
    return [r.text for r in diverged_remedies(f)]


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


@dataclass(frozen=True)
class Run:
    """What the checks read: the series, the run's settings, the thresholds (params.yaml
    `health`), and the numbers every verdict reports."""

    train_fixed: Series
    validation: Series
    current: Series  # the per-step loss
    facts: RunFacts
    t: object
    numbers: dict
    best_step: int | None

    @classmethod
    def of(cls, train_fixed, validation, current, facts, t) -> Run:
        numbers = {}
        if train_fixed:
            numbers.update(train_fixed_start=train_fixed[0][1],
                           train_fixed_end=train_fixed[-1][1])
        best_step = None
        if validation and _finite(validation):
            best_step, best = min(validation, key=lambda sv: sv[1])
            numbers.update(validation_best=best, validation_end=validation[-1][1])
        return cls(train_fixed, validation, current, facts, t, numbers, best_step)

    def verdict(self, status: str, headline: str, evidence: list[str],
                remedies: list[Remedy]) -> Verdict:
        return Verdict(status, headline, evidence, remedies, self.best_step, self.numbers)


def non_finite(r: Run) -> Verdict | None:
    for name, series in (("fixed training loss", r.train_fixed),
                         ("validation loss", r.validation), ("step loss", r.current)):
        if not _finite(series):
            step = next(s for s, v in series if not math.isfinite(v))
            return r.verdict("diverged", f"the {name} became non-finite at step {step}",
                             [f"{name} at step {step}: {dict(series)[step]}"],
                             diverged_remedies(r.facts))
    return None


def exploded(r: Run) -> Verdict | None:
    t = r.t
    average = f"step loss averaged over {t.explode_window} steps"
    for name, series in (("fixed training loss", r.train_fixed),
                         (average, smoothed(r.current, t.explode_window))):
        if len(series) >= 2:
            low_step, low = min(series, key=lambda sv: sv[1])
            later = [(s, v) for s, v in series if s > low_step]
            peak_step, peak = max(later, key=lambda sv: sv[1]) if later else (low_step, low)
            if low > 0 and peak > t.explode_factor * low:
                return r.verdict(
                    "diverged", f"the {name} exploded after step {low_step}",
                    [f"{name}: {_fmt(low)} at step {low_step}, then {_fmt(peak)} at step "
                     f"{peak_step} ({peak / low:.1f}x; limit {t.explode_factor:g}x)"],
                    diverged_remedies(r.facts))
    return None


def unstable(r: Run) -> Verdict | None:
    t, f, fixed = r.t, r.facts, r.train_fixed
    rises = [(b[0], (b[1] - a[1]) / a[1]) for a, b in zip(fixed, fixed[1:], strict=False)
             if a[1] > 0]
    jumps = [(s, rise) for s, rise in rises if rise > t.swing]
    if len(jumps) < t.swing_count:
        return None
    step, rise = max(jumps, key=lambda sr: sr[1])
    lower = _fmt(f.learning_rate / 2)
    remedies = [Remedy(f"lower train.learning_rate ({_fmt(f.learning_rate)} -> {lower})",
                       {"train.learning_rate": lower})]
    if f.batch_size * f.grad_accum < 4:
        remedies.append(Remedy(f"raise train.batch_size to at least 4 (now {f.batch_size}), "
                               "or train.grad_accum", {"train.batch_size": 4}))
    return r.verdict("unstable",
                     f"the fixed training loss rose {len(jumps)} times between evaluations",
                     [f"{len(jumps)} rises above {t.swing:.1%} (limit {t.swing_count}); the "
                      f"largest, {rise:.1%}, ends at step {step}"], remedies)


def not_learning(r: Run) -> Verdict | None:
    t, f, fixed = r.t, r.facts, r.train_fixed
    if not fixed or fixed[-1][0] < t.min_steps:
        return None
    first = fixed[0][1]
    fall = (first - min(v for _, v in fixed)) / first if first > 0 else 0.0
    if fall >= t.min_improvement:
        return None
    higher = _fmt(max(f.learning_rate * 2, 1e-4))
    return r.verdict(
        "not_learning", f"the fixed training loss fell only {fall:.1%} in {fixed[-1][0]} steps",
        [f"fixed training loss {_fmt(first)} at step 0, at best "
         f"{_fmt(min(v for _, v in fixed))}; a learning run falls by more than "
         f"{t.min_improvement:.0%}"],
        [Remedy(f"raise train.learning_rate (now {_fmt(f.learning_rate)}, e.g. to {higher})",
                {"train.learning_rate": higher}),
         Remedy(DATA_ADVICE[f.task]["check_data"]),
         Remedy("train longer (train.max_steps) or raise lora.rank")])


def overfitting(r: Run) -> Verdict | None:
    t, f, validation, best_step = r.t, r.facts, r.validation, r.best_step
    if not validation or best_step is None or len(validation) <= t.overfit_evals:
        return None
    best = r.numbers["validation_best"]
    tail = validation[-t.overfit_evals:]
    train_at_best = min((abs(s - best_step), v) for s, v in r.train_fixed)[1]
    if not (all(s > best_step and v > best * (1 + t.overfit_margin) for s, v in tail)
            and r.train_fixed[-1][1] < train_at_best):
        return None
    remedies = [Remedy(f"stop earlier: the best validation loss was at step {best_step} "
                       "(train.max_steps, or train.early_stop.patience)",
                       {"train.max_steps": best_step} if best_step else {}),
                *[Remedy(text) for text in DATA_ADVICE[f.task]["vary"]]]
    if f.rank > 4:
        remedies.insert(1, Remedy(f"lower lora.rank ({f.rank} -> {max(4, f.rank // 2)})",
                                  {"lora.rank": max(4, f.rank // 2)}))
    return r.verdict(
        "overfitting", f"validation loss rising since step {best_step} while training loss falls",
        [f"validation {_fmt(best)} at step {best_step}, {_fmt(tail[-1][1])} at step "
         f"{tail[-1][0]}; training fixed loss {_fmt(train_at_best)} -> "
         f"{_fmt(r.train_fixed[-1][1])}"], remedies)


# The verdicts, in the order they are checked: the first that applies is the run's. A new
# verdict is one function here (Run -> Verdict | None) and its place in this list.
CHECKS = (non_finite, exploded, unstable, not_learning, overfitting)


def diagnose(train_fixed: Series, validation: Series, current: Series, facts: RunFacts,
             t) -> Verdict:
    """Classify a run from its series (`current`: the per-step loss); `t` holds the
    thresholds (params.yaml `health`). The verdict carries the command to try next."""
    run = Run.of(train_fixed, validation, current, facts, t)
    for check in CHECKS:
        verdict = check(run)
        if verdict is not None:
            return verdict
    headline = "fixed losses falling or settled"
    if train_fixed:
        headline = (f"fixed training loss {_fmt(train_fixed[0][1])} -> "
                    f"{_fmt(train_fixed[-1][1])}")
    return run.verdict("healthy", headline, [], [Remedy("nothing to change")])


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
