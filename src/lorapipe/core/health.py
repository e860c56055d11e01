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

Every verdict also states the LoRA against the base (`gains`: 1 - loss / the base's loss on
the same examples, noise and timesteps), and for the image task reads the fixed losses per
evaluation timestep (`bands`): low noise (small t) is where fine detail is learned and, first,
memorised; high noise is composition and colour.
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
    against_base: list[str] = field(default_factory=list)  # the gains, in sentences
    # per evaluation timestep: (t, training gain at the end, validation gain at the best
    # step, validation gain at the end); None where not measured
    bands: list[tuple] = field(default_factory=list)

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
    optimizer: str = "adamw"  # train.optimizer: what a step-size change means
    d_coef: float = 1.0  # train.prodigy.d_coef
    relative_step: bool = False  # train.adafactor.relative_step

    @classmethod
    def from_params(cls, params, images: int) -> RunFacts:
        p = params.train
        return cls(p.learning_rate, p.batch_size, params.lora.rank, images, p.grad_accum,
                   p.max_grad_norm, p.lr_scheduler, p.lr_warmup_steps, p.mixed_precision,
                   params.task_type, p.optimizer, p.prodigy.d_coef, p.adafactor.relative_step)


def step_size(f: RunFacts, factor: float, or_less: bool = False) -> Remedy:
    """The remedy that scales the step size by `factor`, in the optimizer's own terms:
    Prodigy estimates its step size (learning_rate stays 1.0; d_coef scales the estimate),
    Adafactor's relative step has no rate to change, the others take train.learning_rate."""
    verb = "lower" if factor < 1 else "raise"
    if f.optimizer == "prodigy":
        d = _fmt(f.d_coef * factor)
        return Remedy(f"{verb} train.prodigy.d_coef ({_fmt(f.d_coef)} -> {d}): Prodigy sets "
                      "its own step size, which d_coef scales (keep train.learning_rate 1.0)",
                      {"train.prodigy.d_coef": d})
    if f.optimizer == "adafactor" and f.relative_step:
        rate = "1e-4" if factor < 1 else "1e-3"
        return Remedy(f"replace Adafactor's relative step by a fixed rate: "
                      f"train.adafactor.relative_step false, train.learning_rate {rate}",
                      {"train.adafactor.relative_step": "false", "train.learning_rate": rate})
    new = _fmt(f.learning_rate * factor if factor < 1 else max(f.learning_rate * factor, 1e-4))
    if factor < 1:
        return Remedy(f"lower train.learning_rate ({_fmt(f.learning_rate)} -> {new}"
                      f"{' or less' if or_less else ''})", {"train.learning_rate": new})
    return Remedy(f"raise train.learning_rate (now {_fmt(f.learning_rate)}, e.g. to {new})",
                  {"train.learning_rate": new})


# advice that depends on what the data is, per task_type
DATA_ADVICE = {
    "sd": {"check_data": "check model.base and that the captions match the images",
           "vary": ["add more varied images", "check that captions describe what varies"],
           "outlier": "open the image and read its caption: is the caption another image's, "
                      "the image corrupt, mostly noise or unlike the rest of the set? Fix or "
                      "drop its row in metadata.csv"},
    "llm": {"check_data": "check model.base and the answers in the data (validate's report "
                          "counts the trained tokens)",
            "vary": ["add more varied examples", "raise lora.dropout (0.05-0.1)"],
            "outlier": "read the example: does its answer contradict the other examples', or "
                       "follow another format? Fix or drop that line"},
}
# where a timestep counts as low noise (fine detail) or high noise (composition, colour), on
# the 1000-step scale of train.validation.timesteps
LOW_NOISE_BELOW = 400
HIGH_NOISE_FROM = 600


def diverged_remedies(f: RunFacts) -> list[Remedy]:
    """What to change after a blow-up, leaving out what this run already does."""
    remedies = [step_size(f, 0.5, or_less=True)]
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
    train_gain: Series  # improvement over the base per evaluation (1 - loss / base loss)
    val_gain: Series
    # per evaluation timestep t: the fixed losses at t, training and validation
    train_bands: dict[int, Series] = field(default_factory=dict)
    val_bands: dict[int, Series] = field(default_factory=dict)

    @classmethod
    def of(cls, train_fixed, validation, current, facts, t, train_gain=None, val_gain=None,
           train_bands=None, val_bands=None) -> Run:
        numbers = {}
        if train_fixed:
            numbers.update(train_fixed_start=train_fixed[0][1],
                           train_fixed_end=train_fixed[-1][1])
        best_step = None
        if validation and _finite(validation):
            best_step, best = min(validation, key=lambda sv: sv[1])
            numbers.update(validation_best=best, validation_end=validation[-1][1])
        # logged gains are against the base itself (after lora.init too); without them the
        # first evaluation is the reference
        train_gain = train_gain or _gain(train_fixed)
        val_gain = val_gain or _gain(validation)
        if train_gain:
            numbers["gain_train_end"] = train_gain[-1][1]
        if val_gain and _finite(val_gain):
            numbers["gain_val_end"] = val_gain[-1][1]
            if best_step is not None:
                numbers["gain_val_best"] = dict(val_gain).get(best_step, val_gain[-1][1])
        return cls(train_fixed, validation, current, facts, t, numbers, best_step, train_gain,
                   val_gain, train_bands or {}, val_bands or {})

    def against_base(self) -> list[str]:
        """The gains in sentences: what the LoRA does to the losses the base had."""
        lines = []
        if self.train_gain and _finite(self.train_gain):
            step, gain = self.train_gain[-1]
            lines.append(f"the LoRA {_change(gain, 'the fixed training loss')} against the "
                         f"base (step {step})")
        if self.val_gain and _finite(self.val_gain):
            step, gain = self.val_gain[-1]
            line = (f"the LoRA {_change(gain, 'the held-out loss')} against the base (step "
                    f"{step})")
            if self.best_step is not None and self.best_step != step:
                line += (f"; the best was {self.numbers['gain_val_best']:.0%} at step "
                         f"{self.best_step}")
            lines.append(line)
        return lines

    def band_table(self) -> list[tuple]:
        rows = []
        for t in sorted(self.train_bands or self.val_bands):
            train = self.train_bands.get(t, [])
            val = self.val_bands.get(t, [])
            at_best = dict(val).get(self.best_step) if val and self.best_step is not None \
                else None
            rows.append((t, _gain_of(train, train[-1][1] if train else None),
                         _gain_of(val, at_best), _gain_of(val, val[-1][1] if val else None)))
        return rows

    def verdict(self, status: str, headline: str, evidence: list[str],
                remedies: list[Remedy]) -> Verdict:
        return Verdict(status, headline, evidence, remedies, self.best_step, self.numbers,
                       self.against_base(), self.band_table())


def _gain(series: Series) -> Series:
    """Improvement of each value over the first (the reference when none was logged)."""
    if not series or not series[0][1] > 0:
        return []
    first = series[0][1]
    return [(s, 1.0 - v / first) for s, v in series]


def _gain_of(series: Series, value: float | None) -> float | None:
    if value is None or not series or not series[0][1] > 0:
        return None
    return 1.0 - value / series[0][1]


def _change(gain: float, what: str) -> str:
    return f"lowers {what} by {gain:.0%}" if gain >= 0 else f"raises {what} by {-gain:.0%}"


def _bands_named(ts: list[int]) -> str:
    return ", ".join(f"t={t}" for t in ts)


def rising_bands(r: Run) -> tuple[list[int], str, Remedy | None]:
    """Which evaluation timesteps' validation loss rose since the best step (by more than
    health.overfit_margin), what that means, and the remedy that follows from it."""
    if not r.val_bands or r.best_step is None:
        return [], "", None
    rising = []
    for t, series in sorted(r.val_bands.items()):
        at = dict(series)
        if r.best_step in at and series and series[-1][1] > at[r.best_step] * (
                1 + r.t.overfit_margin):
            rising.append(t)
    if not rising:
        return [], "", None
    if len(rising) == len(r.val_bands):
        return rising, "validation rising at every noise level: the images themselves are " \
                       "being memorised", None
    if max(rising) < LOW_NOISE_BELOW:
        return rising, (f"validation rising at t <= {max(rising)} only ({_bands_named(rising)})"
                        ": fine detail (texture, exact features) is being memorised"), Remedy(
            "low-noise detail is memorised first: more varied images of the subject (other "
            "backgrounds, lighting, crops), or a lower lora.rank")
    if min(rising) >= HIGH_NOISE_FROM:
        return rising, (f"validation rising at t >= {min(rising)} only ({_bands_named(rising)})"
                        ": composition and colour are being memorised"), Remedy(
            "high-noise composition is memorised: vary the framing and composition of the "
            "images, and caption the layout and colours")
    return rising, f"validation rising at {_bands_named(rising)}", None


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
    remedies = [step_size(f, 0.5)]
    if f.batch_size * f.grad_accum < 4:
        remedies.append(Remedy(f"raise train.batch_size to at least 4 (now {f.batch_size}), "
                               "or train.grad_accum", {"train.batch_size": 4}))
    return r.verdict("unstable",
                     f"the fixed training loss rose {len(jumps)} times between evaluations",
                     [f"{len(jumps)} rises above {t.swing:.1%} (limit {t.swing_count}); the "
                      f"largest, {rise:.1%}, ends at step {step}"], remedies)


def not_learning(r: Run) -> Verdict | None:
    t, f, fixed = r.t, r.facts, r.train_fixed
    if not fixed or fixed[-1][0] < t.min_steps or not r.train_gain:
        return None
    best_step, fall = max(r.train_gain, key=lambda sg: sg[1])  # the best gain over the base
    if fall >= t.min_improvement:
        return None
    evidence = [f"fixed training loss {_fmt(fixed[0][1])} at step 0, at best "
                f"{_fmt(min(v for _, v in fixed))}: at most {fall:.1%} below the base (step "
                f"{best_step}); a learning run gets more than {t.min_improvement:.0%} below it"]
    if r.train_bands:
        evidence.append("training loss against the base per timestep: " + ", ".join(
            f"t={band_t} {gain:+.1%}" for band_t, gain, _, _ in r.band_table()
            if gain is not None))
    return r.verdict(
        "not_learning", f"the fixed training loss fell only {fall:.1%} in {fixed[-1][0]} steps",
        evidence,
        [step_size(f, 2),
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
    evidence = [f"validation {_fmt(best)} at step {best_step}, {_fmt(tail[-1][1])} at step "
                f"{tail[-1][0]}; training fixed loss {_fmt(train_at_best)} -> "
                f"{_fmt(r.train_fixed[-1][1])}"]
    if "gain_val_best" in r.numbers:
        evidence.append(f"against the base: held-out {r.numbers['gain_val_best']:.0%} better "
                        f"at step {best_step}, {r.numbers['gain_val_end']:.0%} at the end; "
                        f"training {r.numbers['gain_train_end']:.0%} better")
    _, reading, band_remedy = rising_bands(r)
    if reading:
        evidence.append(reading)
    if band_remedy:
        remedies.insert(1, band_remedy)
    return r.verdict(
        "overfitting", f"validation loss rising since step {best_step} while training loss falls",
        evidence, remedies)


# The verdicts, in the order they are checked: the first that applies is the run's. A new
# verdict is one function here (Run -> Verdict | None) and its place in this list.
CHECKS = (non_finite, exploded, unstable, not_learning, overfitting)


def diagnose(train_fixed: Series, validation: Series, current: Series, facts: RunFacts,
             t, train_gain: Series | None = None, val_gain: Series | None = None,
             train_bands: dict[int, Series] | None = None,
             val_bands: dict[int, Series] | None = None) -> Verdict:
    """Classify a run from its series (`current`: the per-step loss; the gains over the base
    and the per-timestep fixed losses where logged); `t` holds the thresholds (params.yaml
    `health`). The verdict carries the command to try next."""
    run = Run.of(train_fixed, validation, current, facts, t, train_gain, val_gain,
                 train_bands, val_bands)
    for check in CHECKS:
        verdict = check(run)
        if verdict is not None:
            return verdict
    headline = "fixed losses falling or settled"
    if train_fixed:
        headline = (f"fixed training loss {_fmt(train_fixed[0][1])} -> "
                    f"{_fmt(train_fixed[-1][1])}")
    return run.verdict("healthy", headline, [], [Remedy("nothing to change")])


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:+.1%}"


def to_markdown(v: Verdict, run: str, sections: list[tuple[str, list[str]]] = ()) -> str:
    """The report; `sections`: more (title, markdown lines), after the verdict's own."""
    lines = [f"# Training health: {v.status}", "", f"Run `{run}`: {v.headline}.", ""]
    if v.against_base:
        lines += ["## Against the base", "", *[f"- {e}" for e in v.against_base], ""]
    if v.evidence:
        lines += ["## Evidence", "", *[f"- {e}" for e in v.evidence], ""]
    if v.bands:
        lines += ["## Where in the schedule", "",
                  "The fixed losses per evaluation timestep against the base's (positive = "
                  "lower than the base). Low t (little noise) is fine detail, high t is "
                  "composition and colour; detail is memorised first.", "",
                  "| t | training, end | validation, best step | validation, end |",
                  "|---|---|---|---|"]
        lines += [f"| {t} | {_pct(a)} | {_pct(b)} | {_pct(c)} |" for t, a, b, c in v.bands]
        lines.append("")
    for title, body in sections:
        lines += [f"## {title}", "", *body, ""]
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
