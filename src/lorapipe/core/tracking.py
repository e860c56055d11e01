"""dvclive + TensorBoard + a plain-text log behind one small interface, with one set of names
(lorapipe.core.metrics).

Names follow kohya's trainers, the de facto standard: loss/current, loss/average,
loss/epoch_average, lr/unet. Each TensorBoard run gets its own folder under logs/tensorboard/
(named after the DVC experiment under `dvc exp run`), so runs never mix and
`tensorboard --logdir logs/tensorboard` shows them side by side.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from dvclive import Live
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from lorapipe.core.metrics import (
    IMPROVEMENT_TRAIN,
    IMPROVEMENT_VALIDATION,
    LR_DENOISER,
    LR_LORA,
    LR_TEXT,
    STEP_AVERAGE,
    STEP_LOSS,
    TRAIN_FIXED,
    VALIDATION,
    VALIDATION_BEST,
    band_of,
    tensorboard_only,
)

SUMMARY_EVERY_S = 1.0  # how often dvclive's metrics.json is rewritten during training
# TensorBoard's Custom Scalars tab: the curves that are read together, in one chart each.
# Its tags are regular expressions: a plain name is anchored (`^name$`), or
# loss/train/fixed would also draw loss/train/fixed/t0100 and every other timestep's curve.


def _exactly(*names: str) -> list[str]:
    return [f"^{re.escape(name)}$" for name in names]


LAYOUT = {
    "lorapipe": {
        "fixed-noise loss: training vs validation (overfitting: the lines part; the best "
        "validation so far goes flat at the best step)": [
            "Multiline", _exactly(TRAIN_FIXED, VALIDATION, VALIDATION_BEST)],
        "improvement over the base (1 - loss / base loss): training vs validation": [
            "Multiline", _exactly(IMPROVEMENT_TRAIN, IMPROVEMENT_VALIDATION)],
        "validation improvement over the base per timestep (low t: detail, high t: "
        "composition)": ["Multiline", [f"^{re.escape(IMPROVEMENT_VALIDATION)}/t\\d+$"]],
        "training improvement over the base per timestep": [
            "Multiline", [f"^{re.escape(IMPROVEMENT_TRAIN)}/t\\d+$"]],
        "validation loss per timestep": ["Multiline", [f"^{re.escape(VALIDATION)}/t\\d+$"]],
        "step loss and its moving average": ["Multiline", _exactly(STEP_LOSS, STEP_AVERAGE)],
        "learning rate": ["Multiline", _exactly(LR_DENOISER, LR_TEXT, LR_LORA)],
    },
}
# dvc plots' improvement chart, a line per timestep (dvc.yaml: improvement.json)
BREAKDOWN_PLOT = "improvement"
PARTIAL = ".partial"  # in a TensorBoard run folder while its run has not finished


def run_name(default: str | None = None) -> str:
    """The DVC experiment's name under `dvc exp run`, else `default`, else a timestamp."""
    return os.environ.get("DVC_EXP_NAME") or default or time.strftime("run-%Y%m%d-%H%M%S")


def sample_run_name(trained: str | None) -> str:
    """The sample stage's TensorBoard run: named after the training run that made the LoRA,
    so TensorBoard lists the two together; a resample of that LoRA under another experiment
    (other sample.* values) goes beneath it."""
    current = run_name()
    if trained and trained != current and "DVC_EXP_NAME" in os.environ:
        return f"{trained}/{current}"
    return trained or current


def remove_partial_runs(logs_dir: Path, keep: set[str], replace: str) -> list[str]:
    """Before a fresh (not resumed) run: remove the TensorBoard runs that killed runs left
    unfinished, except those a checkpoint may still resume (`keep`), and an earlier run
    under this run's own name `replace` (the same name means the same experiment again)."""
    removed = []
    root = Path(logs_dir) / "tensorboard"
    for run in sorted(root.glob("*")):
        if run.is_dir() and (run.name == replace
                             or ((run / PARTIAL).exists() and run.name not in keep)):
            shutil.rmtree(run)
            removed.append(run.name)
    return removed


class Tracker:
    """Logs one training run. Create it on the main process only.

    `history` is every (step, metrics) logged so far: stored in checkpoints and replayed on
    resume, so the dvclive files of a resumed run equal those of an uninterrupted one.
    """

    def __init__(self, live_dir: Path, logs_dir: Path, name: str, params: dict,
                 history: list | None = None, resume_step: int = 0,
                 images: list[tuple[int, Path]] | None = None):
        self.name = name
        self._summary_at = 0.0
        self.history: list[tuple[int, dict[str, float]]] = []
        self.breakdown: list[dict] = []  # the rows of dvclive/plots/custom/improvement.json
        # (step, file) of each dvclive sample: image, or markdown (text samples)
        self.images: list[tuple[int, Path]] = []
        self.live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None)
        self.live.log_params(params)
        self.tb_dir = Path(logs_dir) / "tensorboard" / name
        # purge_step drops events a killed run wrote after its last checkpoint
        self.tb = SummaryWriter(str(self.tb_dir), purge_step=resume_step if history else None)
        (self.tb_dir / PARTIAL).touch()
        self.text_path = Path(logs_dir) / "train.log"
        self.text_path.parent.mkdir(parents=True, exist_ok=True)
        self._text = open(self.text_path, "a" if history else "w", encoding="utf-8")  # noqa: SIM115
        if not history:
            self.tb.add_text("params", _markdown(params), 0)
            self.tb.add_custom_scalars(LAYOUT)
        for step, metrics in history or []:
            self._to_live(step, metrics)
            self.history.append((step, metrics))
        for step, file in images or []:  # dvclive cleared its folder: put them back
            if file.suffix == ".md":
                self._live_text(step, file.read_text(encoding="utf-8"))
            else:
                self._live_image(step, file)

    def _to_live(self, step: int, metrics: dict[str, float]) -> None:
        # log_metric appends to dvclive's .tsv files at once. Live.next_step() would also
        # re-read every logged point each step to offer it to DVC Studio (measured: 10 ms a
        # step at 200 steps, and growing), so the summary is refreshed once a second instead.
        self.live.step = step
        for name, value in metrics.items():
            if not tensorboard_only(name):
                self.live.log_metric(name, value)
        self._breakdown_rows(step, metrics)
        if time.monotonic() - self._summary_at > SUMMARY_EVERY_S:
            self.live.make_summary()
            self._summary_at = time.monotonic()

    def _breakdown_rows(self, step: int, metrics: dict[str, float]) -> None:
        """The improvement over the base as one long table for the one dvc plots chart that
        draws a line per part (dvc.yaml: improvement.json): per evaluation timestep for the
        image task (the validation's; the training subset's when nothing is held out),
        training and validation for the LLM task (and with train.validation.breakdown off).
        Long rows, not a column per part: dvc.yaml names a plot's fields, and the timesteps
        are a param."""
        banded = {name: band_of(name) for name in metrics}
        wanted = (IMPROVEMENT_VALIDATION if any(b and b[0] == IMPROVEMENT_VALIDATION
                                                for b in banded.values())
                  else IMPROVEMENT_TRAIN)
        rows = [{"step": step, "part": f"t={banded[name][1]}", "improvement": value}
                for name, value in metrics.items()
                if banded[name] and banded[name][0] == wanted]
        if not rows:
            rows = [{"step": step, "part": part, "improvement": metrics[name]}
                    for name, part in ((IMPROVEMENT_TRAIN, "training"),
                                       (IMPROVEMENT_VALIDATION, "validation"))
                    if name in metrics]
        if rows:
            self.breakdown += rows
            self.live.log_plot(BREAKDOWN_PLOT, self.breakdown, x="step", y="improvement",
                               title="improvement over the base")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._to_live(step, metrics)
        for name, value in metrics.items():
            self.tb.add_scalar(name, value, step)
        self.history.append((step, dict(metrics)))

    def log_image(self, step: int, image) -> None:
        """A sample grid: one TensorBoard image with a step slider, and one dvclive image
        per step (named by step, so `dvc plots show` puts early and late side by side)."""
        import numpy as np

        self.tb.add_image("samples", np.asarray(image), step, dataformats="HWC")
        self._live_image(step, image)

    def _live_image(self, step: int, image) -> None:
        name = f"samples/step_{step:06d}.png"
        self.live.log_image(name, image)
        self.images.append((step, Path(self.live.plots_dir) / "images" / name))

    def log_text(self, step: int, markdown: str) -> None:
        """Text samples (the LLM task): TensorBoard's text tab with a step slider, and one
        markdown file per step in the dvclive folder (dvclive has no text API)."""
        self.tb.add_text("samples", markdown, step)
        self._live_text(step, markdown)

    def _live_text(self, step: int, markdown: str) -> None:
        path = Path(self.live.dir) / "samples" / f"step_{step:06d}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown, encoding="utf-8")
        self.images.append((step, path))

    def text(self, line: str) -> None:
        self._text.write(line + "\n")
        self._text.flush()

    def summary(self, step: int, values: dict, timing: dict | None = None) -> None:
        """Final numbers for `dvc exp show` (dvclive's metrics.json) and TensorBoard; `timing`
        (wall times) goes to TensorBoard only, whose event files carry wall times anyway."""
        self.live.summary = dict(values)  # ours, in our order: not the last step's values
        self.live.step = step
        self.live.make_summary()
        for key, value in {**values, **(timing or {})}.items():
            if isinstance(value, int | float):
                self.tb.add_scalar(f"summary/{key}", value, step)

    def hparams(self, params: dict, outcome: dict) -> None:
        """TensorBoard's HParams tab: this run's params and outcome (e.g. the verdict) beside
        its final fixed-noise losses, so runs compare there as in `dvc exp show`. Written
        into this run's own folder: SummaryWriter.add_hparams would start a sub-run."""
        values = {k: v if isinstance(v, bool | int | float | str) else str(v)
                  for k, v in {**params, **outcome}.items()}
        metrics = {tag: 0.0 for tag in (TRAIN_FIXED, VALIDATION)
                   if any(tag in m for _, m in self.history)}  # values: the scalars' last
        for event in hparams(values, metrics):
            self.tb.file_writer.add_summary(event)

    def close(self) -> None:
        """The run finished (or stopped with a verdict): its TensorBoard run is complete."""
        self.live.make_summary()
        self.tb.close()
        self._text.close()
        (self.tb_dir / PARTIAL).unlink(missing_ok=True)


def _markdown(params: dict) -> str:
    lines = ["| key | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in params.items()]
    return "\n".join(lines)
