"""The typed schema of params.yaml: load, check every key, and say exactly what is wrong.

Every hyperparameter lives in params.yaml; this module only knows each key's type and
allowed range. Loading is cheap and happens before any heavy import or work, so a typo
costs the user a second, not a half-finished run.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path

from ruamel.yaml import YAML, YAMLError

from lorapipe.errors import LorapipeError

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("builtin:tiny-sd", "builtin:tiny-sdxl", "builtin:tiny-llm")
BUILTIN_LLMS = ("builtin:tiny-llm",)
TASKS = ("sd", "llm")
# Checkpoint formats that are Python pickles: loading one can run arbitrary code.
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


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
    presets: tuple[str, ...] | None = None  # for str | list[str]: the names a string may be


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
    base: str = key("builtin:tiny-sd, builtin:tiny-sdxl, a diffusers folder or a .safetensors "
                    "file; with task_type llm builtin:tiny-llm or a Hugging Face folder",
                    path="model")
    config: str = key("diffusers folder with configs for a single-file base", path="dir",
                      optional=True)


@dataclass(frozen=True)
class EncodeParams:
    batch_size: int = key("images per VAE / text-encoder batch", minimum=1)


# lora.targets presets (lorapipe.families.Family.targets resolves them per model; with
# task_type llm, lorapipe.llm.training: attn, all-linear)
TARGET_PRESETS = ("attn", "kohya", "all-linear")
TASK_PRESETS = {"sd": ("attn", "kohya"), "llm": ("attn", "all-linear")}


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
                                   presets=TARGET_PRESETS)
    text_encoder: bool = key("also train a LoRA on the text encoder(s)")
    init: str = key("existing LoRA to continue from", path="any", optional=True)


@dataclass(frozen=True)
class ValidationParams:
    split: float = key("fraction of images held out; 0 = off", minimum=0, maximum=0.5)
    every: int = key("steps between evaluations", minimum=1)
    timesteps: list[int] = key("fixed timesteps of the evaluation losses")
    fixed_images: int = key("training images in the fixed training loss", minimum=1)
    max_images: int = key("held-out images in the validation loss, at most", minimum=1)


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
    batch_size: int = key("images per micro-batch", minimum=1)
    grad_accum: int = key("micro-batches per optimizer step", minimum=1)
    max_steps: int = key("optimizer steps; 0 = use train.epochs", minimum=0)
    epochs: int = key("passes over the data when max_steps is 0", minimum=0)
    mixed_precision: str = key("no, fp16 or bf16", choices=PRECISIONS)
    num_processes: int = key("data-parallel processes (accelerate launch); 1 = plain", minimum=1)
    accelerate_config: str = key("accelerate config file (multi-node); \"\" = none",
                                 path="any", optional=True)
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
    captions: CaptionParams
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


# Switches of one task that the other cannot honour: set under it, they are refused (the
# rest of a task's keys are ignored by the other, as params.yaml holds both tasks' keys).
SD_ONLY_SWITCHES = {
    "lora.text_encoder": "the LLM has no separate text encoder",
    "preprocess.buckets": "buckets are for images",
    "train.captions.shuffle": "caption handling is for image captions",
    "train.captions.dropout": "caption handling is for image captions",
    "train.captions.tag_dropout": "caption handling is for image captions",
    "train.noise_offset": "there is no diffusion noise",
    "train.min_snr_gamma": "there are no diffusion timesteps",
}


# What each task does not read (params.yaml holds both tasks' keys): the params stage says so
UNUSED_BY_TASK = {
    "sd": ("llm",),
    "llm": ("validate.min_side", "validate.max_pixels", "preprocess", "encode", "model.config",
            "train.text_encoder_lr", "train.noise_offset", "train.min_snr_gamma",
            "train.captions", "train.sample_steps", "train.sample_scheduler",
            "train.sample_guidance_scale", "train.validation.timesteps",
            "sample.negative_prompt", "sample.images_per_prompt", "sample.steps",
            "sample.guidance_scale", "sample.scheduler", "sample.width",
            "sample.height"),
}


def _task_checks(v: dict[str, object]) -> list[str]:
    """task_type against the keys that must agree with it."""
    task = v.get("task_type")
    if task not in TASKS:
        return []
    problems = []
    base = v.get("model.base")
    if isinstance(base, str) and base.startswith(BUILTIN_PREFIX):
        is_llm = base in BUILTIN_LLMS
        if task == "llm" and not is_llm:
            problems.append(f"model.base {base} is a Stable Diffusion model but task_type is "
                            f"llm; use {', '.join(BUILTIN_LLMS)} or a local Hugging Face folder")
        if task == "sd" and is_llm:
            problems.append(f"model.base {base} is a language model but task_type is sd; set "
                            "task_type: llm, or model.base to builtin:tiny-sd")
    targets = v.get("lora.targets")
    if isinstance(targets, str) and targets not in TASK_PRESETS[task]:
        problems.append(f"lora.targets preset {targets} is not one of task_type {task}'s: "
                        + ", ".join(TASK_PRESETS[task]))
    if task == "llm":
        for dotted, why in SD_ONLY_SWITCHES.items():
            if v.get(dotted):
                problems.append(f"{dotted} is for task_type sd ({why}); set it to "
                                f"{'false' if v[dotted] is True else 0} for task_type llm")
        if v.get("model.config"):
            problems.append("model.config is for single-file Stable Diffusion checkpoints; "
                            "set it to \"\" for task_type llm")
    return problems


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
    return names.get(t, "a list of strings")


def _check_value(dotted: str, value, t: type, rule: Rule, root: Path) -> tuple[object, list]:
    """Return (converted value, problems) for one key."""
    ok = (
        (t is int and isinstance(value, int) and not isinstance(value, bool))
        or (t is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (t is str and isinstance(value, str))
        or (t is bool and isinstance(value, bool))
        or (t in (list[str], str | list[str]) and isinstance(value, list) and bool(value)
            and all(isinstance(v, str) and v for v in value))
        or (t == str | list[str] and isinstance(value, str))
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
    if rule.presets and isinstance(value, str) and value not in rule.presets:
        problems.append(
            f"{dotted} must be a preset ({', '.join(rule.presets)}) or a list of module "
            f"names, got {value!r}" + _did_you_mean(value, list(rule.presets)))
    if rule.choices and value not in rule.choices:
        problems.append(
            f"{dotted} must be one of {', '.join(rule.choices)}, got {value!r}"
            + _did_you_mean(str(value), list(rule.choices))
        )
    if rule.path and not (rule.optional and value == ""):
        problems += _check_path(dotted, value, rule.path, root)
    return value, problems


def _check_path(dotted: str, value: str, kind: str, root: Path) -> list[str]:
    if kind == "model" and value.startswith(BUILTIN_PREFIX):
        if value in BUILTIN_MODELS:
            return []
        return [
            f"{dotted}: unknown builtin model {value!r}; the builtin models are "
            + ", ".join(BUILTIN_MODELS)
        ]
    path = root / value
    if not path.exists():
        return [f"{dotted}: path {value!r} does not exist (relative to {root})"]
    if kind == "dir" and not path.is_dir():
        return [f"{dotted}: {value!r} is not a folder"]
    if kind == "model":
        problem = model_source_problem(path, value)
        return [f"{dotted}: {problem}"] if problem else []
    return []


def model_source_problem(path: Path, name: str) -> str | None:
    """Why an existing path cannot be a base model, or None. Checked with params.yaml, so a
    pickle or a stray folder is refused in a second, not after the encode stage's imports."""
    if path.is_dir():
        if (path / "config.json").exists() and not (path / "model_index.json").exists():
            return llm_source_problem(path, name)
        if not (path / "model_index.json").exists():
            return (f"{name!r} is a folder but not a diffusers model (no model_index.json) "
                    "nor a Hugging Face language model (no config.json); give a diffusers "
                    "folder (save_pretrained), a .safetensors file or, with task_type llm, a "
                    "Hugging Face model folder")
        # a diffusers folder's components (text_encoder/, tokenizer/, ...) are loaded by
        # transformers, which would ask to run any code their configs name
        for part in sorted(p for p in path.iterdir() if p.is_dir()):
            if problem := remote_code_problem(part, f"{name}/{part.name}"):
                return problem
        return None
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return (f"{name!r} is a pickle checkpoint ({suffix}), which can run code when loaded; "
                "lorapipe loads only .safetensors. Convert it once where you trust the file, "
                "e.g. `StableDiffusionPipeline.from_single_file(path).save_pretrained(dir)`, "
                "and set model.base to dir")
    if suffix != ".safetensors":
        return f"{name!r} is not a .safetensors checkpoint or a diffusers folder"
    return None


def llm_source_problem(path: Path, name: str) -> str | None:
    """Why a path cannot be an LLM base (a Hugging Face save_pretrained folder with
    safetensors weights), or None."""
    if not path.is_dir() or not (path / "config.json").exists():
        return (f"{name!r} is not a Hugging Face model folder (config.json and *.safetensors, "
                "as save_pretrained writes)")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            return (f"{name!r} holds only pickle weights ({', '.join(pickles[:3])}), which can "
                    "run code when loaded; lorapipe loads only .safetensors. Convert once "
                    "where you trust the files: `AutoModelForCausalLM.from_pretrained(dir)"
                    ".save_pretrained(dir2)` writes safetensors; set model.base to dir2")
        return f"{name!r} holds no .safetensors weights"
    return remote_code_problem(path, name)


def remote_code_problem(path: Path, name: str) -> str | None:
    """Why a model folder would need its own Python code to load (an `auto_map` in its
    config.json or tokenizer_config.json: transformers' trust_remote_code, which asks [y/N]
    in a terminal and then runs the folder's code), or None. lorapipe never runs it."""
    for file in ("config.json", "tokenizer_config.json"):
        try:
            body = json.loads((path / file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(body, dict) and "auto_map" in body:
            return (f"{name!r}: its {file} has an auto_map, so loading it would run the "
                    "folder's own Python code (trust_remote_code), which lorapipe never does; "
                    "use a model whose architecture transformers includes (Qwen2/3, Llama, "
                    "Gemma, Mistral, ...), or delete auto_map from that file if the "
                    "architecture is one of those")
    return None


def _build(cls: type, values: dict, prefix: str, problems: list[str], root: Path,
           source: str, valid: dict[str, object]):
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
                built = _build(t, sub, f"{dotted}.", problems, root, source, valid)
                if built is not None:
                    kwargs[k] = built
        elif k not in values:
            problems.append(f"missing key {dotted} ({rule.help}); add it to {source}")
        else:
            kwargs[k], found = _check_value(dotted, values[k], t, rule, root)
            problems += found
            if not found:
                valid[dotted] = kwargs[k]
    return cls(**kwargs) if len(kwargs) == len(fields) else None


def parse_params(raw: object, root: Path, source: str = "params.yaml") -> Params:
    """Check a loaded params mapping against the schema; raise ParamsError listing all problems
    (those of single keys and the rules across keys, together)."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected sections like 'lora:' at the top level")
    problems: list[str] = []
    valid: dict[str, object] = {}
    params = _build(Params, raw, "", problems, root, source, valid)
    problems += _cross_checks(valid) + _task_checks(valid)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ParamsError(f"{source} has {len(problems)} problem(s):\n{listing}")
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
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
    return parse_params(raw, path.resolve().parent, source=str(path))
