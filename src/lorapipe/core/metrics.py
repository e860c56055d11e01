"""The logged names, one place for each: training, evaluation, tracking, health and the
plots in dvc.yaml use these (tests/test_dvc_yaml.py checks that every plot file dvc.yaml
names is written by a run of each task).

They follow kohya's trainers, the de facto standard TensorBoard names: loss/current,
loss/average, loss/epoch_average, lr/unet, lr/textencoder, loss/validation/...
"""

from __future__ import annotations

STEP_LOSS = "loss/current"  # the loss of each optimizer step
STEP_AVERAGE = "loss/average"  # its moving mean over an epoch of steps
EPOCH_AVERAGE = "loss/epoch_average"  # the mean loss of each epoch
TRAIN_FIXED = "loss/train/fixed"  # the fixed loss on a fixed subset of the training data
VALIDATION = "loss/validation/step_average"  # the same on the held-out data
VALIDATION_DIVERGENCE = "loss/validation/step_divergence"  # validation - training
LR_DENOISER = "lr/unet"  # the learning rate of the image task's denoiser LoRA (kohya's name)
LR_TEXT = "lr/textencoder"  # of its text-encoder LoRA(s)
LR_LORA = "lr/lora"  # of the LLM task's LoRA
# every lr/ name logs the step size taken (Prodigy: d x lr); Prodigy's estimate d itself
PRODIGY_D = "optimizer/prodigy_d"
PERPLEXITY_TRAIN = "perplexity/train"  # exp of the LLM's fixed training loss
PERPLEXITY_VALIDATION = "perplexity/validation"
# the fixed losses against the base's (the LoRA at step 0, or switched off after lora.init):
# 1 - loss / base loss, so 0.18 = the LoRA lowers that loss by 18%
IMPROVEMENT_TRAIN = "improvement/train"
IMPROVEMENT_VALIDATION = "improvement/validation"
# the lowest validation loss so far: flat from the best step on, it marks that step in
# TensorBoard's overlay chart (TensorBoard draws no vertical rules)
VALIDATION_BEST = "loss/validation/best"

# the image task's fixed losses per evaluation timestep (train.validation.timesteps): the
# same names with /t<4 digits> appended, e.g. loss/validation/t0100, improvement/train/t0900
BANDED = (TRAIN_FIXED, VALIDATION, IMPROVEMENT_TRAIN, IMPROVEMENT_VALIDATION)


def band(name: str, t: int) -> str:
    return f"{name}/t{t:04d}"


def band_of(name: str) -> tuple[str, int] | None:
    """(the banded name, t) of a per-timestep name, else None."""
    head, _, tail = name.rpartition("/t")
    if head in BANDED and len(tail) == 4 and tail.isdigit():
        return head, int(tail)
    return None


def tensorboard_only(name: str) -> bool:
    """Logged to TensorBoard but not as a dvclive series of its own: the per-timestep
    curves (dvc plots draws them as one chart, dvclive/plots/custom/improvement.json) and the
    running best (the dvc plots overlay marks the best step itself)."""
    return name == VALIDATION_BEST or band_of(name) is not None
