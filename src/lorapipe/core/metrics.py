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
PERPLEXITY_TRAIN = "perplexity/train"  # exp of the LLM's fixed training loss
PERPLEXITY_VALIDATION = "perplexity/validation"
