"""The end of a run, for every task: the verdict from the logged history, the summary that
`dvc exp show` lists (dvclive's metrics.json, in its column order), and the health report."""

from __future__ import annotations

from pathlib import Path

from lorapipe.core import health, outputs
from lorapipe.core.metrics import (
    IMPROVEMENT_TRAIN,
    IMPROVEMENT_VALIDATION,
    STEP_LOSS,
    TRAIN_FIXED,
    VALIDATION,
    band_of,
)


def series(history, name: str) -> health.Series:
    return [(step, m[name]) for step, m in history if name in m]


def bands(history, name: str) -> dict[int, health.Series]:
    """The per-timestep series of `name` (loss/validation/t0100, ...) by timestep."""
    out: dict[int, health.Series] = {}
    for step, metrics in history:
        for key, value in metrics.items():
            banded = band_of(key)
            if banded and banded[0] == name:
                out.setdefault(banded[1], []).append((step, value))
    return out


def diagnose(history, facts: health.RunFacts, thresholds) -> health.Verdict:
    return health.diagnose(series(history, TRAIN_FIXED), series(history, VALIDATION),
                           series(history, STEP_LOSS), facts, thresholds,
                           series(history, IMPROVEMENT_TRAIN),
                           series(history, IMPROVEMENT_VALIDATION),
                           bands(history, TRAIN_FIXED), bands(history, VALIDATION))


def summary(verdict: health.Verdict, history, step: int, family: str, rest: dict) -> dict:
    """dvclive's metrics.json, in the order `dvc exp show` shows its columns: first what
    decides between runs (verdict, the last fixed-noise losses, the best validation step),
    then the rest; the verdict's evidence last. Short names (loss.train, loss.val: the
    fixed-noise losses; gain: the held-out loss against the base's, 1 - loss / base loss, or
    the training one's without validation; gain_train after best_step), so the verdict, the
    losses, the gain and the best step fit 120 columns beside DVC's own, State and Executor
    included (gain.train and gain.val both there would push best_step off by one column)."""
    def last(key):
        values = [m[key] for _, m in history if key in m]
        return values[-1] if values else None

    losses = {name: v for name, key in (("train", TRAIN_FIXED), ("val", VALIDATION))
              if (v := last(key)) is not None}
    gain_train, gain_val = last(IMPROVEMENT_TRAIN), last(IMPROVEMENT_VALIDATION)
    gain = gain_val if gain_val is not None else gain_train
    out = {"health": verdict.summary(), "loss": losses}
    # 4 decimals (0.01%): a tiny gain such as -0.00012345 would widen its column by 4
    gain, gain_train = (None if g is None else round(g, 4) for g in (gain, gain_train))
    if gain is not None:
        out["gain"] = gain
    if verdict.best_step is not None:
        out["best_step"] = verdict.best_step
    if gain_train is not None:
        out["gain_train"] = gain_train
    return {**out, "model": {"family": family}, "step": step, **rest,
            "verdict_numbers": verdict.numbers}


def report_health(tracker, verdict: health.Verdict, path: Path | None, step: int,
                  sections: list[tuple[str, list[str]]] = ()) -> None:
    """The verdict (and more `sections`) as reports/health.md, TensorBoard text at the run's
    last step, and the stage's last line of output."""
    text = health.to_markdown(verdict, tracker.name, sections)
    if path is not None:
        outputs.write_text(path, text)
    tracker.tb.add_text("health", text, step)
    print(f"train: health: {verdict.status}: {verdict.headline}"
          + (f"; {verdict.advice[0]}" if verdict.status != "healthy" else "")
          + (f"; try: {verdict.command}" if verdict.command else ""))


def averages(losses: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(losses)):
        chunk = losses[max(0, i + 1 - window):i + 1]
        out.append(sum(chunk) / len(chunk))
    return out
