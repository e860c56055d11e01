"""The typed schema of params.yaml and its checker: load, check every key, say exactly what
is wrong (every problem at once, naming the key, with the nearest valid name).

Every hyperparameter lives in params.yaml; this module only knows each key's type and
allowed range, and the rules across keys every task shares. What a task adds (its builtins,
lora.targets presets, the switches it refuses) comes in as a `TaskRules` per task, and the
model-file check as a function, both from the registry (lorapipe.tasks): this core module
imports no task. Loading is cheap and happens before any heavy import or work, so a typo
costs the user a second, not a half-finished run.

Why a hand-written checker and not pydantic (installed with DVC): pydantic's errors would
have to be translated back into these messages (its "Input should be a valid integer" and
"Extra inputs are not permitted" give neither the dotted key's nearest valid name nor what
the key is for); its lax mode turns true into 1 and "1" into an int, and its strict mode
refuses the int 1 for a float, where YAML 1.2's types are what a user wrote; and the path
and model-file checks need params.yaml's folder. The engine below (Rule, _check_value,
_build: about 150 lines) is what that translation layer would replace.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ruamel.yaml import YAML, YAMLError

from lorapipe.core.errors import LorapipeError

BUILTIN_PREFIX = "builtin:"
METHODS = ("lora", "dora", "loha", "lokr")  # lora.method
INIT_WEIGHTS = ("default", "pissa", "olora")  # lora.init_weights
QUANTIZE_MODES = ("none", "int8", "fp8", "nf4")  # model.quantize (lorapipe.core.quantize)
GGUF_TYPES = ("f16", "bf16", "f32")  # llm.export_gguf (lorapipe.llm.gguf_export)
# model.prediction_type and model.noise_schedule (lorapipe.diffusion.families.unet): "auto"
# takes what the base says (its scheduler config, or a single file's v_pred / ztsnr marks)
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
NOISE_SCHEDULES = ("auto", "default", "zero_terminal_snr")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "schedulefree")  # train.optimizer
TASKS = ("sd", "llm")  # task_type's values; lorapipe.tasks names each one's package


class ParamsError(LorapipeError):
    """params.yaml is missing, unreadable or breaks the schema; lists every problem."""


@dataclass(frozen=True)
class Rule:
    """What one key accepts, beyond its Python type."""

    help: str
    minimum: float | None = None  # inclusive
    above: float | None = None  # exclusive
    maximum: float | None = None  # inclusive
    multiple_of: int | None = None
    choices: tuple[str, ...] | None = None
    path: str | None = None  # "dir": an existing folder; "model": builtin:... or exists;
    #                          "any": must exist
    optional: bool = False  # for paths: "" means none
    allow_empty: bool = False  # for lists: [] is allowed
    pattern: str | None = None  # for strings: a regex the whole value must match
    pattern_help: str = ""  # what that pattern allows, in words
    presets: bool = False  # for str | list[str]: a string names a preset (of some task)


def key(help: str, **rule) -> typing.Any:
    """A required schema field; params.yaml must set it (no hidden defaults in code)."""
    return dataclasses.field(metadata={"rule": Rule(help, **rule)})


@dataclass(frozen=True)
class DataParams:
    dir: str = key("folder with the images and their metadata.csv", path="dir")


@dataclass(frozen=True)
class ValidateParams:
    min_side: int = key("smallest allowed image side in pixels", minimum=1)
    max_pixels: int = key("pixel count above which an image is refused", minimum=1)
    on_error: str = key("what to do with bad rows", choices=("fail", "skip"))


@dataclass(frozen=True)
class PreprocessParams:
    resolution: int = key("square side in pixels; with buckets, each bucket's area is at "
                          "most resolution squared", minimum=8, multiple_of=8)
    workers: int = key("worker processes, 0 = one per CPU core", minimum=0)
    buckets: bool = key("aspect-ratio buckets instead of square centre crops")
    bucket_step: int = key("bucket sides are multiples of this", minimum=8, multiple_of=8)
    min_side: int = key("shortest bucket side in pixels", minimum=8, multiple_of=8)
    max_side: int = key("longest bucket side in pixels", minimum=8, multiple_of=8)
    upscale: bool = key("enlarge images smaller than their bucket (kohya: not "
                        "bucket_no_upscale)")


@dataclass(frozen=True)
class ModelParams:
    base: str = key("a builtin (builtin:tiny-sd, -sdxl, -flux, -sd3, -chroma), a diffusers "
                    "folder or a .safetensors file; with task_type llm builtin:tiny-llm "
                    "(-llama3, -qwen3, -gemma3, -mistral, -smollm2) or a Hugging Face folder",
                    path="model")
    config: str = key("diffusers folder with configs for a single-file base", path="dir",
                      optional=True)
    quantize: str = key("the frozen base's weights while training and sampling: none, int8, "
                        "fp8 or nf4 (the LoRA stays fp32)", choices=QUANTIZE_MODES)
    prediction_type: str = key("what a DDPM base predicts: auto (as the base says), epsilon or "
                               "v_prediction", choices=PREDICTION_TYPES)
    noise_schedule: str = key("a DDPM base's noise schedule: auto (as the base says), default "
                              "or zero_terminal_snr (the last step pure noise)",
                              choices=NOISE_SCHEDULES)


@dataclass(frozen=True)
class EncodeParams:
    batch_size: int = key("images per VAE / text-encoder batch", minimum=1)


@dataclass(frozen=True)
class LoraParams:
    name: str = key("the LoRA's name: WebUI file and ss_output_name; \"\" = experiment name",
                    pattern=r"(?!\.)[\w.-]*", pattern_help="a plain file name (letters, digits, "
                    "'.', '-', '_'; not starting with '.'); it names the WebUI file")
    rank: int = key("LoRA rank (dimension)", minimum=1)
    alpha: float = key("LoRA alpha; the update is scaled by alpha / rank", above=0)
    dropout: float = key("dropout on the LoRA path", minimum=0, maximum=0.9)
    targets: str | list[str] = key("a preset (attn, kohya; llm: attn, all-linear) or a list "
                                   "of module names",
                                   presets=True)
    text_encoder: bool = key("also train a LoRA on the text encoder(s)")
    init: str = key("existing LoRA to continue from", path="any", optional=True)
    method: str = key("the adapter: lora, dora (weight-decomposed), loha (LyCORIS Hadamard), "
                      "lokr (LyCORIS Kronecker)", choices=METHODS)
    conv_rank: int = key("LoCon: also adapt the UNet's 3x3 convolutions at this rank (kohya's "
                         "conv_dim); 0 = off", minimum=0)
    conv_alpha: float = key("alpha of those convolutions (kohya's conv_alpha)", above=0)
    lokr_factor: int = key("LoKr: the Kronecker factor's size (LyCORIS's factor); -1 = as "
                           "square as possible", minimum=-1)
    decompose_both: bool = key("LoKr: also low-rank the smaller Kronecker factor (LyCORIS's "
                               "decompose_both)")
    rslora: bool = key("llm: scale the update by alpha / sqrt(rank) (rank-stabilised LoRA)")
    init_weights: str = key("llm: how the LoRA starts: default (B = 0), pissa or olora "
                            "(from the base's SVD / QR)", choices=INIT_WEIGHTS)


@dataclass(frozen=True)
class ValidationParams:
    split: float = key("fraction of images held out; 0 = off", minimum=0, maximum=0.5)
    every: int = key("steps between evaluations", minimum=1)
    timesteps: list[int] = key("fixed timesteps of the evaluation losses")
    fixed_images: int = key("training images in the fixed training loss", minimum=1)
    max_images: int = key("held-out images in the validation loss, at most", minimum=1)
    breakdown: bool = key("also log the fixed losses per timestep and per example")


@dataclass(frozen=True)
class CaptionParams:
    shuffle: bool = key("shuffle the comma-separated tags of each caption every time")
    keep_tokens: int = key("leading tags kept in place when shuffling", minimum=0)
    dropout: float = key("probability of an empty caption", minimum=0, maximum=1)
    tag_dropout: float = key("probability of dropping each (not kept) tag", minimum=0,
                             maximum=1)


@dataclass(frozen=True)
class EarlyStopParams:
    patience: int = key("evaluations without a better validation loss; 0 = off", minimum=0)


@dataclass(frozen=True)
class FlowParams:
    timestep_sampling: str = key("how flow matching draws noise levels",
                                 choices=("uniform", "logit_normal", "sigmoid"))
    logit_mean: float = key("logit_normal's mean")
    logit_std: float = key("logit_normal's standard deviation", above=0)
    sigmoid_scale: float = key("sigmoid's scale (kohya's sigmoid_scale)", above=0)
    shift: float = key("static shift of the noise levels (kohya's discrete_flow_shift); 1 = "
                       "none", above=0)
    resolution_shift: bool = key("the base's own shift in the place of shift: Flux's from "
                                 "the image's token count (kohya's flux_shift), SD3's fixed")
    weighting: str = key("loss weighting of the noise levels",
                         choices=("none", "sigma_sqrt", "cosmap"))
    guidance: float = key("guidance fed to a guidance-distilled base (Flux.1-dev) while "
                          "training", minimum=0)


@dataclass(frozen=True)
class ProdigyParams:
    d_coef: float = key("Prodigy's d_coef: multiplies its step-size estimate", above=0)
    use_bias_correction: bool = key("Adam's bias correction in Prodigy's estimate")
    safeguard_warmup: bool = key("keep the estimate from growing during a warm-up")


@dataclass(frozen=True)
class AdafactorParams:
    relative_step: bool = key("Adafactor's own time-dependent rate in the place of "
                              "train.learning_rate")
    scale_parameter: bool = key("scale the step by each weight's root mean square")
    warmup_init: bool = key("with relative_step: warm the rate up from 0")


@dataclass(frozen=True)
class ScheduleFreeParams:
    warmup_steps: int = key("schedule-free AdamW's own linear warm-up in steps", minimum=0)


SAMPLERS = ("ddim", "euler", "euler_a", "dpm++_2m")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
PRECISIONS = ("no", "fp16", "bf16")


@dataclass(frozen=True)
class TrainParams:
    seed: int = key("seed for LoRA init, data order, noise and timesteps", minimum=0)
    learning_rate: float = key("AdamW learning rate", above=0)
    text_encoder_lr: float = key("learning rate of the text-encoder LoRA", above=0)
    lr_scheduler: str = key("learning-rate schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = key("steps of linear warm-up", minimum=0)
    adam_weight_decay: float = key("AdamW weight decay", minimum=0)
    optimizer: str = key("the optimizer: adamw, adamw8bit, prodigy, adafactor or "
                         "schedulefree", choices=OPTIMIZERS)
    batch_size: int = key("images per micro-batch", minimum=1)
    grad_accum: int = key("micro-batches per optimizer step", minimum=1)
    max_steps: int = key("optimizer steps; 0 = use train.epochs", minimum=0)
    epochs: int = key("passes over the data when max_steps is 0", minimum=0)
    mixed_precision: str = key("no, fp16 or bf16", choices=PRECISIONS)
    num_processes: int = key("data-parallel processes (accelerate launch); 1 = plain", minimum=1)
    accelerate_config: str = key("accelerate config file (multi-node); \"\" = none",
                                 path="any", optional=True)
    fsdp: bool = key("shard the frozen base across the processes (FSDP2); the LoRA stays "
                     "whole on each")
    devices: list[int] = key("GPU indices this run may use; [] = all", allow_empty=True)
    gradient_checkpointing: bool = key("recompute activations to save memory")
    cpu_threads: int = key("torch CPU threads of a CPU run; 0 = the cores shared among the "
                           "lorapipe runs on this machine", minimum=0)
    noise_offset: float = key("offset-noise strength", minimum=0)
    min_snr_gamma: float = key("Min-SNR loss weighting gamma; 0 = off", minimum=0)
    max_grad_norm: float = key("gradient clipping norm; 0 = off", minimum=0)
    checkpoint_every: int = key("checkpoint every N steps; 0 = off", minimum=0)
    sample_every: int = key("log sample images every N steps; 0 = off", minimum=0)
    sample_prompts: list[str] = key("prompts of the images logged during training")
    sample_steps: int = key("denoising steps of those images", minimum=1)
    sample_scheduler: str = key("sampler of those images", choices=SAMPLERS)
    sample_guidance_scale: float = key("guidance scale of those images", minimum=0)
    prodigy: ProdigyParams
    adafactor: AdafactorParams
    schedulefree: ScheduleFreeParams
    captions: CaptionParams
    flow: FlowParams
    validation: ValidationParams
    early_stop: EarlyStopParams


@dataclass(frozen=True)
class HealthParams:
    min_steps: int = key("steps before a run can be called not_learning", minimum=0)
    min_improvement: float = key("fall of the fixed training loss a learning run shows",
                                 minimum=0, maximum=1)
    explode_factor: float = key("a loss above this multiple of its minimum = diverged",
                                above=1)
    explode_window: int = key("steps the step loss is averaged over for that check",
                              minimum=1)
    swing: float = key("a rise of the fixed training loss between evaluations", above=0)
    swing_count: int = key("that many such rises = unstable", minimum=1)
    overfit_evals: int = key("evaluations in a row validation stays above its best",
                             minimum=1)
    overfit_margin: float = key("how far above its best validation must be", minimum=0)
    outlier_z: float = key("robust standard deviations from its set's median that make an "
                           "example an outlier", above=0)
    outlier_gap: float = key("how far short of its set's median improvement an outlier's "
                             "must also be, as a fraction of that median", minimum=0,
                             maximum=1)
    outlier_loss: float = key("how many times its set's median loss an outlier's final loss "
                              "must also be", above=1)


@dataclass(frozen=True)
class SampleParams:
    prompts: list[str] = key("prompts to generate, one grid row each")
    negative_prompt: str = key("what to steer away from; empty = none")
    images_per_prompt: int = key("images (seeds) per prompt", minimum=1)
    seed: int = key("first seed; image k of every prompt uses seed + k", minimum=0)
    steps: int = key("denoising steps", minimum=1)
    guidance_scale: float = key("classifier-free guidance scale", minimum=0)
    scheduler: str = key("sampler", choices=SAMPLERS)
    lora_scale: float = key("strength of the LoRA", minimum=0)
    width: int = key("image width in pixels", minimum=8, multiple_of=8)
    height: int = key("image height in pixels", minimum=8, multiple_of=8)


@dataclass(frozen=True)
class LlmParams:
    max_length: int = key("longest example in tokens (prompt and response)", minimum=8)
    too_long: str = key("a longer example: error (validate.on_error decides) or truncate "
                        "its response", choices=("error", "truncate"))
    train_on_prompt: bool = key("also train on the prompt tokens, not only the response")
    merge: bool = key("also write the LoRA merged into the base as a model folder")
    thinking: str = key("<think>...</think> blocks in the answers: keep (trained, as the "
                        "template renders them) or strip", choices=("keep", "strip"))
    packing: bool = key("pack several examples into each sequence of up to llm.max_length "
                        "tokens, attention kept within each")
    export_gguf: bool | list[str] = key(
        "also write the adapter as a llama.cpp LoRA GGUF: true (f16) or a list of f16, bf16, "
        "f32; false = none", choices=GGUF_TYPES, allow_empty=True)
    max_new_tokens: int = key("tokens generated per sample", minimum=1)
    temperature: float = key("temperature of the sampled generations; 0 = greedy only",
                             minimum=0)
    top_p: float = key("nucleus sampling: the smallest token set of this probability",
                       above=0, maximum=1)


@dataclass(frozen=True)
class Params:
    task_type: str = key("sd (Stable Diffusion LoRA) or llm (language-model LoRA)",
                         choices=TASKS)
    data: DataParams
    validate: ValidateParams
    preprocess: PreprocessParams
    model: ModelParams
    encode: EncodeParams
    lora: LoraParams
    train: TrainParams
    health: HealthParams
    sample: SampleParams
    llm: LlmParams


@dataclass(frozen=True)
class TaskRules:
    """What one task adds to the checks (lorapipe.diffusion.rules, lorapipe.llm.rules)."""

    name: str  # its task_type
    builtins: tuple[str, ...]  # its builtin models
    kind: str  # what its models are, in messages: "a Stable Diffusion model"
    base_hint: str  # what to do when model.base is another task's builtin
    presets: tuple[str, ...]  # its lora.targets presets
    unused: tuple[str, ...]  # the keys (or sections) it never reads: the params stage says so
    checks: Callable[[dict[str, object]], list[str]]  # its own rules across keys


@dataclass(frozen=True)
class Checker:
    """Everything the checks need besides the schema: the tasks' rules and the model-file
    check (a folder's or file's kind decides which task's loader would read it)."""

    tasks: dict[str, TaskRules]
    model_problem: Callable[[Path, str], str | None]

    @property
    def builtins(self) -> tuple[str, ...]:
        return tuple(b for rules in self.tasks.values() for b in rules.builtins)

    @property
    def presets(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for rules in self.tasks.values() for p in rules.presets))


def _task_checks(v: dict[str, object], checker: Checker) -> list[str]:
    """task_type against the keys that must agree with it, then the task's own rules."""
    rules = checker.tasks.get(v.get("task_type"))
    if rules is None:
        return []
    problems = []
    base = v.get("model.base")
    if isinstance(base, str) and base.startswith(BUILTIN_PREFIX) and base not in rules.builtins:
        owner = next((r for r in checker.tasks.values() if base in r.builtins), None)
        if owner is not None:
            problems.append(f"model.base {base} is {owner.kind} but task_type is {rules.name}; "
                            f"{rules.base_hint}")
    targets = v.get("lora.targets")
    if isinstance(targets, str) and targets not in rules.presets:
        problems.append(f"lora.targets preset {targets} is not one of task_type {rules.name}'s: "
                        + ", ".join(rules.presets))
    return problems + rules.checks(v)


def _cross_checks(v: dict[str, object]) -> list[str]:
    """Rules that involve more than one key, on the keys that passed their own checks (so a
    problem elsewhere in the file never hides these)."""
    def has(*keys):
        return all(k in v for k in keys)

    problems = []
    if has("train.max_steps", "train.epochs") and v["train.max_steps"] == 0 \
            and v["train.epochs"] == 0:
        problems.append("train.max_steps and train.epochs are both 0; set one of them")
    if has("train.lr_warmup_steps", "train.lr_scheduler") and v["train.lr_warmup_steps"] \
            and v["train.lr_scheduler"] == "constant":
        problems.append("train.lr_warmup_steps is set but train.lr_scheduler is constant; "
                        "use constant_with_warmup, cosine or linear")
    if has("train.early_stop.patience", "train.validation.split") \
            and v["train.early_stop.patience"] and not v["train.validation.split"]:
        problems.append("train.early_stop.patience needs a validation set; set "
                        "train.validation.split above 0 or patience to 0")
    problems += _method_checks(v) + _optimizer_checks(v) + _quantize_checks(v) \
        + _fsdp_checks(v)
    if v.get("model.prediction_type") == "epsilon" \
            and v.get("model.noise_schedule") == "zero_terminal_snr":
        # Lin et al. (2024), section 3.2: at zero SNR the noise is the input, so an epsilon
        # model learns nothing at the last step and cannot sample from it
        problems.append("model.noise_schedule zero_terminal_snr needs v-prediction (at zero "
                        "SNR predicting the noise is predicting the input); set "
                        "model.prediction_type to v_prediction")
    if has("model.config", "model.base") and v["model.config"] \
            and str(v["model.base"]).startswith(BUILTIN_PREFIX):
        problems.append("model.config is only for single-file checkpoints; set it to \"\"")
    if has("preprocess.buckets", "preprocess.min_side", "preprocess.max_side",
           "preprocess.resolution", "preprocess.bucket_step") and v["preprocess.buckets"]:
        lo, hi, res, step = (v[f"preprocess.{k}"] for k in ("min_side", "max_side",
                                                             "resolution", "bucket_step"))
        if not lo <= res <= hi:
            problems.append(f"preprocess.min_side {lo} <= preprocess.resolution {res} <= "
                            f"preprocess.max_side {hi} does not hold; widen the bucket range")
        for name, side in (("min_side", lo), ("max_side", hi)):
            if side % step:
                problems.append(f"preprocess.{name} {side} is not a multiple of "
                                f"preprocess.bucket_step {step}")
    return problems


def _method_checks(v: dict[str, object]) -> list[str]:
    """lora.method against the keys only some methods have (peft's LoHa and LoKr have no
    input dropout and no rsLoRA scale; PiSSA and OLoRA start a plain LoRA from the base)."""
    method = v.get("lora.method")
    problems = []
    if method in ("loha", "lokr"):
        if v.get("lora.dropout"):
            problems.append(f"lora.dropout is LoRA's input dropout, which lora.method {method} "
                            "does not have; set lora.dropout to 0")
        if v.get("lora.rslora"):
            problems.append(f"lora.rslora scales a LoRA or DoRA update, not lora.method "
                            f"{method}; set lora.rslora to false")
    init = v.get("lora.init_weights")
    if init not in (None, "default"):
        if method != "lora":
            problems.append(f"lora.init_weights {init} starts a plain LoRA; set lora.method to "
                            "lora or lora.init_weights to default")
        if v.get("lora.init"):
            problems.append(f"lora.init continues an existing LoRA, which lora.init_weights "
                            f"{init} would replace; set lora.init_weights to default")
    return problems


def _quantize_checks(v: dict[str, object]) -> list[str]:
    """model.quantize against the methods peft cannot train on such a base (each refusal was
    seen failing in peft 0.21: DoRA's weight norm on a float8 weight or on bitsandbytes' CPU
    int8 state, LoHa/LoKr's delta on a packed 4-bit weight), and PiSSA/OLoRA, which rewrite
    the base's weights."""
    mode, method = v.get("model.quantize"), v.get("lora.method")
    if mode in (None, "none"):
        return []
    problems = []
    if method == "dora" and mode in ("int8", "fp8"):
        problems.append(f"lora.method dora needs the base's weights in full for its weight norm, "
                        f"which peft cannot take from a model.quantize {mode} base; use "
                        "model.quantize nf4 (peft dequantizes it) or lora.method lora")
    if method in ("loha", "lokr") and mode == "nf4":
        problems.append(f"lora.method {method} has no layer for a 4-bit base in peft; use "
                        "model.quantize int8 or fp8, or lora.method lora")
    init = v.get("lora.init_weights")
    if init not in (None, "default"):
        problems.append(f"lora.init_weights {init} rewrites the base's weights from their SVD/QR, "
                        f"which a model.quantize {mode} base does not hold in full; set "
                        "lora.init_weights to default or model.quantize to none")
    return problems


def _fsdp_checks(v: dict[str, object]) -> list[str]:
    """train.fsdp against what it cannot shard: bitsandbytes' packed weights and the fp8
    parametrization are not tensors FSDP2 can cut into shards (a quantized base is the
    other way to fit a big base: pick one), and one process has nothing to shard across."""
    if not v.get("train.fsdp"):
        return []
    problems = []
    if v.get("train.num_processes") == 1:  # (the launch passes it over any config's)
        problems.append("train.fsdp shards the base across processes, and train.num_processes "
                        "is 1; set train.num_processes to the GPUs to shard over (2 or more)")
    mode = v.get("model.quantize")
    if mode not in (None, "none"):
        problems.append(f"train.fsdp cannot shard a model.quantize {mode} base (packed or "
                        "parametrized weights); shard a full-precision base (model.quantize "
                        "none) or quantize it on each process (train.fsdp false)")
    return problems


def _optimizer_checks(v: dict[str, object]) -> list[str]:
    """train.optimizer against the rate and schedule keys it reads differently."""
    optimizer = v.get("train.optimizer")
    problems = []
    if optimizer == "prodigy":
        for dotted in ("train.learning_rate", "train.text_encoder_lr"):
            lr = v.get(dotted)
            if dotted == "train.text_encoder_lr" and not v.get("lora.text_encoder"):
                continue
            if isinstance(lr, float) and not 0.1 <= lr <= 10:
                problems.append(
                    f"{dotted} is {lr:g} with train.optimizer prodigy: Prodigy estimates the "
                    f"step size itself and {dotted} multiplies that estimate; set it to 1.0 "
                    "(0.5-2 to scale it)")
    if optimizer == "schedulefree":
        if v.get("train.lr_scheduler") not in (None, "constant"):
            problems.append(f"train.lr_scheduler {v['train.lr_scheduler']} with train.optimizer "
                            "schedulefree: schedule-free AdamW replaces the schedule; set "
                            "train.lr_scheduler to constant (its warm-up: "
                            "train.schedulefree.warmup_steps)")
    elif v.get("train.schedulefree.warmup_steps"):
        problems.append("train.schedulefree.warmup_steps is for train.optimizer schedulefree; "
                        "set it to 0 or use train.lr_warmup_steps")
    if optimizer == "adafactor" and v.get("train.adafactor.relative_step") \
            and v.get("train.lr_scheduler") not in (None, "constant"):
        problems.append("train.adafactor.relative_step is Adafactor's own schedule; set "
                        "train.lr_scheduler to constant or relative_step to false")
    if v.get("train.adafactor.warmup_init") and not v.get("train.adafactor.relative_step"):
        problems.append("train.adafactor.warmup_init warms up Adafactor's relative step; set "
                        "train.adafactor.relative_step to true or warmup_init to false")
    return problems


def _yaml() -> YAML:
    """ruamel.yaml's safe loader, as DVC reads params.yaml: YAML 1.2, so "1e-4" is a float
    and `mixed_precision: no` (as `dvc exp run -S` writes it) the string "no", not False."""
    return YAML(typ="safe", pure=True)


def _fields(cls: type) -> dict[str, tuple[type, Rule | None]]:
    """name -> (type, rule) of a section, in declaration order; subsections have no rule."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.metadata.get("rule")) for f in dataclasses.fields(cls)}


def all_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every dotted key the schema knows, e.g. 'lora.rank', 'train.validation.split'."""
    out = []
    for name, (t, _) in _fields(cls or Params).items():
        if dataclasses.is_dataclass(t):
            out += all_keys(t, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def _all_sections(cls: type | None = None, prefix: str = "") -> list[str]:
    out = []
    for name, (t, _) in _fields(cls or Params).items():
        if dataclasses.is_dataclass(t):
            out += [f"{prefix}{name}", *_all_sections(t, f"{prefix}{name}.")]
    return out


def _did_you_mean(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _type_name(t) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if t == list[int]:
        return "a list of integers >= 0"
    if t == str | list[str]:
        return "a preset name or a list of strings"
    if t == bool | list[str]:
        return "true, false or a list of strings"
    return names.get(t, "a list of strings")


def _check_value(dotted: str, value, t: type, rule: Rule, root: Path, checker: Checker
                 ) -> tuple[object, list]:
    """Return (converted value, problems) for one key."""
    ok = (
        (t is int and isinstance(value, int) and not isinstance(value, bool))
        or (t is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (t is str and isinstance(value, str))
        or (t is bool and isinstance(value, bool))
        or (t in (list[str], str | list[str]) and isinstance(value, list) and bool(value)
            and all(isinstance(v, str) and v for v in value))
        or (t == str | list[str] and isinstance(value, str))
        or (t == bool | list[str] and (isinstance(value, bool) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value))))
        or (t == list[int] and isinstance(value, list) and (bool(value) or rule.allow_empty)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))
    )
    if not ok:
        got = "nothing" if value is None else f"{type(value).__name__} {value!r}"
        return value, [f"{dotted} must be {_type_name(t)}, got {got}"]
    if t is float:
        value = float(value)
    problems = []
    if rule.minimum is not None and value < rule.minimum:
        problems.append(f"{dotted} must be at least {rule.minimum:g}, got {value!r}")
    if rule.above is not None and value <= rule.above:
        problems.append(f"{dotted} must be greater than {rule.above:g}, got {value!r}")
    if rule.maximum is not None and value > rule.maximum:
        problems.append(f"{dotted} must be at most {rule.maximum:g}, got {value!r}")
    if rule.multiple_of and value % rule.multiple_of:
        problems.append(f"{dotted} must be a multiple of {rule.multiple_of}, got {value!r}")
    if rule.pattern and not re.fullmatch(rule.pattern, value):
        problems.append(f"{dotted} {value!r} must be {rule.pattern_help}")
    if rule.presets and isinstance(value, str) and value not in checker.presets:
        problems.append(
            f"{dotted} must be a preset ({', '.join(checker.presets)}) or a list of module "
            f"names, got {value!r}" + _did_you_mean(value, list(checker.presets)))
    if rule.choices and not isinstance(value, bool):  # (true/false of bool | list[str])
        what = "a list of" if isinstance(value, list) else "one of"
        for item in value if isinstance(value, list) else [value]:
            if item not in rule.choices:
                problems.append(f"{dotted} must be {what} {', '.join(rule.choices)}, got "
                                f"{item!r}" + _did_you_mean(str(item), list(rule.choices)))
    if rule.path and not (rule.optional and value == ""):
        problems += _check_path(dotted, value, rule.path, root, checker)
    return value, problems


def _check_path(dotted: str, value: str, kind: str, root: Path, checker: Checker) -> list[str]:
    if kind == "model" and value.startswith(BUILTIN_PREFIX):
        if value in checker.builtins:
            return []
        return [
            f"{dotted}: unknown builtin model {value!r}; the builtin models are "
            + ", ".join(checker.builtins)
        ]
    path = root / value
    if not path.exists():
        return [f"{dotted}: path {value!r} does not exist (relative to {root})"]
    if kind == "dir" and not path.is_dir():
        return [f"{dotted}: {value!r} is not a folder"]
    if kind == "model":
        problem = checker.model_problem(path, value)
        return [f"{dotted}: {problem}"] if problem else []
    return []


def _build(cls: type, values: dict, prefix: str, problems: list[str], root: Path,
           source: str, valid: dict[str, object], checker: Checker):
    """One (sub)section from its mapping; appends problems, records each key that passed its
    own checks in `valid` (dotted -> value); None if the section could not be built."""
    fields = _fields(cls)
    for k in values:
        if k not in fields:
            dotted = f"{prefix}{k}"
            if prefix:
                problems.append(
                    f"unknown key {dotted}{_did_you_mean(dotted, all_keys() + _all_sections())}")
            else:
                problems.append(f"unknown section {k}{_did_you_mean(str(k), list(fields))}")
    kwargs = {}
    for k, (t, rule) in fields.items():
        dotted = f"{prefix}{k}"
        if dataclasses.is_dataclass(t):
            sub = values.get(k)
            if sub is None:
                problems.append(f"missing section {dotted}; add it to {source}")
            elif not isinstance(sub, dict):
                problems.append(f"{dotted} must be a section of keys, got {sub!r}")
            else:
                built = _build(t, sub, f"{dotted}.", problems, root, source, valid, checker)
                if built is not None:
                    kwargs[k] = built
        elif k not in values:
            problems.append(f"missing key {dotted} ({rule.help}); add it to {source}")
        else:
            kwargs[k], found = _check_value(dotted, values[k], t, rule, root, checker)
            problems += found
            if not found:
                valid[dotted] = kwargs[k]
    return cls(**kwargs) if len(kwargs) == len(fields) else None


def parse_params(raw: object, root: Path, checker: Checker, source: str = "params.yaml"
                 ) -> Params:
    """Check a loaded params mapping against the schema; raise ParamsError listing all problems
    (those of single keys and the rules across keys, together)."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected sections like 'lora:' at the top level")
    problems: list[str] = []
    valid: dict[str, object] = {}
    params = _build(Params, raw, "", problems, root, source, valid, checker)
    problems += _cross_checks(valid) + _task_checks(valid, checker)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ParamsError(f"{source} has {len(problems)} problem(s):\n{listing}")
    return params


def load_params(path: str | Path, checker: Checker) -> Params:
    """Read and check params.yaml; relative paths in it are relative to its folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path} not found; run from the repository root") from None
    except UnicodeDecodeError:
        raise ParamsError(f"{path} is not UTF-8 text") from None
    try:
        raw = _yaml().load(text)
    except YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    return parse_params(raw, path.resolve().parent, checker, source=str(path))
