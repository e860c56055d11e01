"""The DDPM families' samplers by name (sample.scheduler, train.sample_scheduler): diffusers'
own schedulers, built from the base model's scheduler config so they share its noise schedule
and prediction type."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

from lorapipe.core.params import (
    SAMPLERS as SCHEDULERS,  # the one list; params.yaml is checked on it
)


def make_scheduler(name: str, config):
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if name == "dpm++_2m":
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)}")
