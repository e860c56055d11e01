"""train.optimizer: the optimizers users pick, built from their own libraries, and the step
size each one actually takes (what `lr/...` logs).

- adamw: torch.optim.AdamW;
- adamw8bit: bitsandbytes' AdamW8bit (8-bit optimizer state; CPU and CUDA);
- prodigy: prodigyopt's Prodigy, which estimates the step size d itself (learning_rate is
  its multiplier, 1.0); the effective rate is d x lr, and d is logged on its own;
- adafactor: transformers' Adafactor, with train.learning_rate or its relative step;
- schedulefree: schedulefree's AdamWScheduleFree, which replaces the schedule: its weights
  for evaluation and saving are the averaged ones of its eval mode (`eval_weights`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lorapipe.core.metrics import PRODIGY_D


def build(p, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer over these parameter groups (each with its own lr), from train.*"""
    name, decay = p.optimizer, p.adam_weight_decay
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=p.learning_rate, weight_decay=decay)
    if name == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, lr=p.learning_rate, weight_decay=decay)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, lr=p.learning_rate, weight_decay=decay,
                       d_coef=p.prodigy.d_coef, use_bias_correction=p.prodigy.use_bias_correction,
                       safeguard_warmup=p.prodigy.safeguard_warmup)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        a = p.adafactor
        # with relative_step its default lr must be None; the groups keep theirs (the
        # schedule reads them), which its relative step then ignores
        return Adafactor(groups, lr=None if a.relative_step else p.learning_rate,
                         relative_step=a.relative_step, scale_parameter=a.scale_parameter,
                         warmup_init=a.warmup_init)
    if name == "schedulefree":
        from schedulefree import AdamWScheduleFree

        optimizer = AdamWScheduleFree(groups, lr=p.learning_rate, weight_decay=decay,
                                      warmup_steps=p.schedulefree.warmup_steps)
        optimizer.train()  # its steps need train mode
        return optimizer
    raise ValueError(f"unknown train.optimizer {name!r}")


def describe(p) -> str:
    """train.optimizer for the run's first line: which, and what sets its step size."""
    if p.optimizer == "prodigy":
        return (f"prodigy (its own step-size estimate d x learning_rate {p.learning_rate:g}, "
                f"d_coef {p.prodigy.d_coef:g})")
    if p.optimizer == "adafactor" and p.adafactor.relative_step:
        return "adafactor (its relative step, not learning_rate)"
    if p.optimizer == "schedulefree":
        return (f"schedulefree (warm-up {p.schedulefree.warmup_steps} steps; evaluated and "
                "saved with its averaged weights)")
    return p.optimizer


def _inner(optimizer) -> torch.optim.Optimizer:
    """The optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _in_train_mode(inner) -> bool:
    """A schedule-free optimizer holding its training weights (`train_mode`, its own flag);
    False for every other optimizer."""
    return bool(inner.param_groups[0].get("train_mode"))


def rates_before(optimizer, scheduled: list[float]) -> list[float]:
    """Each group's step size for the coming step, as known before it: the schedule's rate,
    times Prodigy's estimate d (its step uses the d it starts with)."""
    groups = _inner(optimizer).param_groups
    if all("d" in g for g in groups):
        return [g["d"] * lr for g, lr in zip(groups, scheduled, strict=True)]
    return list(scheduled)


def rates_after(optimizer, before: list[float]) -> list[float]:
    """Each group's step size as the step just taken used it, where the optimizer computes it
    inside step(): schedule-free's warm-up (`scheduled_lr`), Adafactor's relative step."""
    inner = _inner(optimizer)
    groups = inner.param_groups
    if all("scheduled_lr" in g for g in groups):
        return [g["scheduled_lr"] for g in groups]
    if all(g.get("relative_step") for g in groups):
        # transformers' own AdafactorSchedule reads the rate the same way
        return [inner._get_lr(g, inner.state[g["params"][0]]) if inner.state.get(
            g["params"][0]) else 0.0 for g in groups]
    return before


def extra_metrics(optimizer) -> dict[str, float]:
    """What else an optimizer decides per step: Prodigy's d estimate."""
    groups = _inner(optimizer).param_groups
    return {PRODIGY_D: groups[0]["d"]} if "d" in groups[0] else {}


@contextmanager
def eval_weights(optimizer) -> Iterator[None]:
    """Schedule-free AdamW's averaged weights in the parameters while inside (its docs: call
    .eval() before evaluating or saving, .train() before training); other optimizers'
    weights are the parameters themselves."""
    inner = _inner(optimizer)
    if _in_train_mode(inner):
        inner.eval()
        try:
            yield
        finally:
            inner.train()
    else:
        yield


def to_eval(optimizer) -> None:
    """Schedule-free: the averaged weights from now on (training is over)."""
    inner = _inner(optimizer)
    if _in_train_mode(inner):
        inner.eval()
