"""Per-example losses against the base: the examples the LoRA learns far less than the rest
of their set, or whose loss stays far above it. A wrong caption, a corrupt or unlike image,
an answer that contradicts the others: each is learned last, or not at all.

Both sets are read on their own, the fixed training subset (train.validation.fixed_images)
and the held-out examples, since held-out examples improve less than trained ones by nature.
The rule is robust to the outliers it looks for: the median and the median absolute deviation
(MAD) of the set, as the modified z-score (Iglewicz and Hoaglin, 1993: |z| > 3.5 is their
outlier limit), with a floor relative to the median improvement, so that a set whose
examples all improve alike does not flag its slightly lowest one. Written by hand: no
library of the stack reports per-example outliers.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from dataclasses import dataclass

from lorapipe.core.evaluation import Evaluation, improvement

SETS = {"train": "training", "validation": "held-out"}
MIN_EXAMPLES = 5  # a median and MAD of fewer examples says nothing about the odd one out
MAD_TO_SIGMA = 1.4826  # MAD x this = the standard deviation, for normally spread values
COLUMNS = ("set", "example", "text", "base_loss", "final_loss", "improvement", "rank",
           "outlier")


@dataclass(frozen=True)
class ExampleRow:
    part: str  # "train" or "validation"
    where: str  # the image's file in data.dir, or "line N" of the LLM's data file
    text: str  # the caption, or the prompt
    base: float  # its loss with the base (the reference evaluation)
    final: float  # its loss with the saved LoRA
    improvement: float  # 1 - final / base
    rank: int  # 1 = the least improved of its set
    outlier: str  # why it is one, or ""


def robust_z(values: list[float]) -> list[float]:
    """The modified z-score of each value: (x - median) / (MAD x 1.4826); a set with no spread
    gives 0 to the values at its median and +-inf to the rest."""
    ordered = sorted(values)
    median = _median(ordered)
    mad = _median(sorted(abs(v - median) for v in values)) * MAD_TO_SIGMA
    if mad == 0:
        return [0.0 if v == median else math.copysign(math.inf, v - median) for v in values]
    return [(v - median) / mad for v in values]


def _median(ordered: list[float]) -> float:
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def outliers(base: list[float], final: list[float], t) -> list[str]:
    """Why each example is an outlier of its set ("" if not), by the thresholds in `t`
    (params.yaml health): improvement far below the set's median (health.outlier_z robust
    standard deviations below it, and short of it by health.outlier_gap of it: 0.25 = learned
    a quarter less than the typical example), or a final loss far above it (health.outlier_z,
    and health.outlier_loss times the median). A set that learned nothing (median
    improvement <= 0) has no outliers by improvement."""
    if len(base) < MIN_EXAMPLES:
        return [""] * len(base)
    gains = [improvement(f, b) for b, f in zip(base, final, strict=True)]
    median_gain, median_loss = _median(sorted(gains)), _median(sorted(final))
    why = []
    for gain, z_gain, loss, z_loss in zip(gains, robust_z(gains), final, robust_z(final),
                                          strict=True):
        if (z_gain < -t.outlier_z and median_gain > 0
                and median_gain - gain > t.outlier_gap * median_gain):
            why.append(f"improved {gain:.1%} against the base, the set's median {median_gain:.1%}")
        elif z_loss > t.outlier_z and loss > t.outlier_loss * median_loss:
            why.append(f"loss {loss:.4g}, {loss / median_loss:.1f}x the set's median "
                       f"{median_loss:.4g}")
        else:
            why.append("")
    return why


def table(base: Evaluation, final: Evaluation, sets: dict[str, list[int]],
          describe: Callable[[int], tuple[str, str]], t) -> list[ExampleRow]:
    """One row per evaluated example, by set: its losses with the base and with the saved
    LoRA; rank 1 is the least improved of its set."""
    rows = []
    for part, idx in sets.items():
        if part not in final.examples or part not in base.examples:
            continue
        b, f = base.examples[part], final.examples[part]
        gains = [improvement(x, y) for y, x in zip(b, f, strict=True)]
        order = sorted(range(len(idx)), key=lambda k: (gains[k], k))
        rank = {k: r + 1 for r, k in enumerate(order)}
        why = outliers(b, f, t)
        for k, i in enumerate(idx):
            where, text = describe(i)
            rows.append(ExampleRow(part, where, text, b[k], f[k], gains[k], rank[k], why[k]))
    return rows


def to_csv(rows: list[ExampleRow]) -> str:
    """reports/examples.csv: every evaluated example, least improved first within its set."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in sorted(rows, key=lambda r: (list(SETS).index(r.part), r.rank)):
        writer.writerow([r.part, r.where, r.text, f"{r.base:.6g}", f"{r.final:.6g}",
                         f"{r.improvement:.4f}", r.rank, r.outlier])
    return buf.getvalue()


def report(rows: list[ExampleRow], sets: dict[str, list[int]], unit: str,
           what_to_check: str) -> list[str]:
    """The health report's section: how many examples were read, and each outlier named with
    its file (or line) and caption (or prompt) and what to check."""
    lines = []
    for part, idx in sets.items():
        if not idx:
            continue
        mine = [r for r in rows if r.part == part]
        if not mine:
            lines.append(f"- {SETS[part]} set: not measured (train.validation.breakdown is "
                         "off)")
            continue
        median = _median(sorted(r.improvement for r in mine))
        head = (f"- {SETS[part]} set: {len(mine)} {unit}, median improvement over the base "
                f"{median:.1%}")
        odd = [r for r in mine if r.outlier]
        if len(mine) < MIN_EXAMPLES:
            lines.append(f"{head}; too few to name outliers ({MIN_EXAMPLES} needed)")
        elif not odd:
            lines.append(f"{head}; no outliers")
        else:
            lines.append(f"{head}; {len(odd)} outlier{'s' if len(odd) > 1 else ''}:")
            lines += [f"  - `{r.where}` (\"{_short(r.text)}\"): {r.outlier}" for r in odd]
    if any(r.outlier for r in rows):
        lines += ["", f"What to check: {what_to_check}. Every example is in "
                      "reports/examples.csv, least improved first."]
    return lines


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
