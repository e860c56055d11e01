"""The one training loop: LoRA on the UNet over cached latents, through accelerate.

Reads in the order it runs: set up, derive and print the plan, resume, then per step:
evaluate, micro-steps (forward, backward), clip, optimizer step, log, checkpoint; finally
save the LoRA in both formats.

Randomness is a pure function of (train.seed, position): the data order of epoch e comes from
seed and e, the noise and timesteps of micro-batch k from seed and k. A resumed run therefore
draws exactly what an uninterrupted one would, and on CPU ends with the same bytes.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from lorapipe import checkpoints, health, lora, outputs, webui
from lorapipe.cache import CACHE_FILE, load_cache
from lorapipe.errors import LorapipeError
from lorapipe.evaluation import EarlyStop, Evaluator, holdout
from lorapipe.losses import diffusion_loss, seeded_generator
from lorapipe.models import load_pipeline, training_scheduler
from lorapipe.sampling import SampleSettings, make_scheduler, sample_grid
from lorapipe.tracking import Tracker, remove_partial_runs, run_name

# The fixed training loss uses the first FIXED_IMAGES training images; validation uses up to
# VALIDATION_IMAGES held-out ones. Each evaluation costs len(timesteps) forward passes.
FIXED_IMAGES = 8
VALIDATION_IMAGES = 32
BEST_LORA = "best_lora.safetensors"
CHECKPOINT_LORA = "lora.safetensors"
# Images logged during training (train.sample_every): Euler ancestral at SD's usual guidance;
# params.yaml says so beside train.sample_steps.
TRAIN_SAMPLER = "euler_a"
TRAIN_GUIDANCE = 7.5


class Diverged(LorapipeError):
    """The loss or gradient became non-finite; the weights were not updated with it."""

    def __init__(self, step: int, lr: float, what: str, advice: list[str], command: str):
        super().__init__(
            f"{what} became non-finite at step {step} (lr {lr:.2e}). The last good LoRA "
            f"(before step {step}) was saved. Try: {'; '.join(advice)}. Next run: {command}"
        )
        self.step = step


@dataclass(frozen=True)
class Plan:
    """How micro-batches tile the data stream; every count derived once, here.

    batch_size is the global micro-batch: train.batch_size per process x processes."""

    images: int
    batch_size: int
    grad_accum: int
    max_steps: int

    @classmethod
    def from_params(cls, p, images: int, processes: int = 1) -> Plan:
        per_step = p.batch_size * processes * p.grad_accum
        steps = p.max_steps or math.ceil(p.epochs * images / per_step)
        return cls(images, p.batch_size * processes, p.grad_accum, steps)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.images / (self.batch_size * self.grad_accum)))

    def epoch_of(self, step: int) -> int:
        """The epoch the last image of optimizer step `step` (0-based) belongs to."""
        last = (step + 1) * self.batch_size * self.grad_accum - 1
        return last // self.images

    def batch_indices(self, micro: int, seed: int) -> torch.Tensor:
        """Image indices of micro-batch `micro`: epochs are seeded permutations, batches
        run across epoch ends so every batch is full."""
        positions = range(micro * self.batch_size, (micro + 1) * self.batch_size)
        return torch.tensor([_epoch_order(seed, pos // self.images, self.images)[pos % self.images]
                             for pos in positions])


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, images: int) -> tuple[int, ...]:
    """The seeded image order of one epoch, drawn once per epoch instead of once per image."""
    return tuple(torch.randperm(images, generator=seeded_generator(seed, "epoch", epoch)).tolist())


def flat_params(params) -> dict:
    out = {}
    for section in ("model", "lora", "train"):
        for key, value in asdict(getattr(params, section)).items():
            out[f"{section}.{key}"] = (",".join(map(str, value)) if isinstance(value, list)
                                       else value)
    return out


@dataclass
class TrainResult:
    summary: dict  # the metrics written to dvclive's metrics.json (empty off the main process)
    unet: torch.nn.Module  # the trained UNet with its LoRA (the best one after early stopping)
    timing: dict  # wall_time_s, steps_per_s: kept out of the hashed outputs


def run(params, cache_dir: Path, out_dir: Path, live_dir: Path, logs_dir: Path,
        ckpt_dir: Path, health_report: Path | None = None) -> TrainResult:
    """Train, log, diagnose and save. Raises Diverged on NaN/Inf."""
    p, lp = params.train, params.lora
    if p.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise LorapipeError("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no")
    accelerator = Accelerator(mixed_precision=p.mixed_precision,
                              gradient_accumulation_steps=p.grad_accum)
    main = accelerator.is_main_process
    cache = load_cache(cache_dir)
    if cache.meta["base"] != params.model.base:
        raise LorapipeError(f"the cache in {cache_dir} was encoded with {cache.meta['base']}, "
                            f"not model.base {params.model.base}; rerun the encode stage")
    train_idx, val_idx = holdout(cache.files, p.validation.split)
    pipe = load_pipeline(params.model.base, params.model.config)
    unet, scheduler = pipe.unet, training_scheduler(pipe)
    base = webui.base_version(unet.config.cross_attention_dim, scheduler.config.prediction_type)
    if p.sample_every:  # sample images need the whole pipeline, on the same UNet object
        pipe.scheduler = make_scheduler(TRAIN_SAMPLER, pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
    else:
        del pipe  # the VAE and text encoder are not needed: their outputs are cached

    torch.manual_seed(p.seed)  # the LoRA's Gaussian init
    config = lora.lora_config(lp.rank, lp.alpha, lp.dropout, lp.targets)
    lora.attach_lora(unet, config)
    if lp.init:
        lora.load_init(unet, lp.init, config)
    if accelerator.mixed_precision in ("fp16", "bf16"):
        # frozen base in half precision, trainable LoRA weights in fp32 (diffusers' recipe)
        unet.to(torch.float16 if accelerator.mixed_precision == "fp16" else torch.bfloat16)
        cast_training_params(unet, dtype=torch.float32)
    if p.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = [q for q in unet.parameters() if q.requires_grad]
    n_trainable = sum(q.numel() for q in trainable)

    world, rank = accelerator.num_processes, accelerator.process_index
    plan = Plan.from_params(p, len(train_idx), world)
    facts = health.RunFacts.from_params(params, len(train_idx))
    optimizer = torch.optim.AdamW(trainable, lr=p.learning_rate, weight_decay=p.adam_weight_decay)
    lr_scheduler = get_scheduler(
        p.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=p.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=plan.max_steps * accelerator.num_processes,
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    _register_lora_hooks(accelerator)
    latents = cache.latents.to(accelerator.device)
    text = cache.text_states.to(accelerator.device)
    train_pos = torch.tensor(train_idx)
    # evaluations run on the main process only, so on the bare module (no DDP collectives)
    evaluate = Evaluator(accelerator.unwrap_model(unet), scheduler, latents, text,
                         train_idx[:FIXED_IMAGES],
                         val_idx[:VALIDATION_IMAGES], p.seed, p.validation.timesteps)
    stopper = EarlyStop(p.early_stop.patience)

    fp = checkpoints.fingerprint(params, Path(cache_dir) / CACHE_FILE)
    found, notes = checkpoints.find(ckpt_dir, fp)
    # named after what decides the result, not the clock: a rerun of the same params and data
    # writes the same outputs, TensorBoard run name included
    state = {"run_name": run_name(f"run-{fp[:8]}"), "history": [], "wall_time": 0.0}
    if found:
        _load_checkpoint(accelerator, found, ckpt_dir)
        state = checkpoints.read_state(found)
        stopper = EarlyStop(p.early_stop.patience, **state["early_stop"],
                            best_state=checkpoints.read_tensors(found, BEST_LORA))
    start_step = state.get("step", 0)

    tracker = None
    if main:
        for note in notes:
            print(f"train: {note}")
        if notes and not found:
            print("train: no usable checkpoint: starting from step 0")
        if not found:
            for gone in remove_partial_runs(logs_dir, checkpoints.run_names(ckpt_dir),
                                            state["run_name"]):
                print(f"train: removed TensorBoard run {gone}: unfinished, or this run's "
                      "own earlier one")
        tracker = Tracker(live_dir, logs_dir, state["run_name"], flat_params(params),
                          history=state["history"], resume_step=start_step,
                          images=[(step, found / name) for step, name in state.get("images", [])])
        header = (
            f"train: {len(train_idx)} training + {len(val_idx)} validation images, batch "
            f"{p.batch_size} x grad_accum {p.grad_accum} x {accelerator.num_processes} "
            f"process(es) = global batch {p.batch_size * p.grad_accum * accelerator.num_processes}"
            f"; {plan.max_steps} steps ({plan.steps_per_epoch} per epoch, "
            f"~{plan.max_steps / plan.steps_per_epoch:.1f} epochs); {n_trainable:,} trainable "
            f"LoRA parameters (rank {lp.rank}, alpha {lp.alpha:g}); TensorBoard run "
            f"{state['run_name']}"
        )
        if found:
            header += f"; resumed from {found} at step {start_step}"
        print(header)
        tracker.text(header)
        if not val_idx:
            print("train: warning: train.validation.split is 0, so overfitting cannot be seen")

    step_losses = [v["loss/current"] for _, v in state["history"] if "loss/current" in v]
    epoch_losses = list(state.get("epoch_losses", []))
    t0 = time.perf_counter() - state["wall_time"]
    timed_from, timed_steps = time.perf_counter(), 0
    end_step = plan.max_steps
    bar = tqdm(total=plan.max_steps, initial=start_step, desc="train", unit="step",
               dynamic_ncols=True, disable=not main, mininterval=1.0)
    unet.train()
    try:
        for step in range(start_step, plan.max_steps):
            lr = lr_scheduler.get_last_lr()[0]
            # evaluate: the fixed-noise losses before this step's update; maybe stop early
            stop = False
            if main and step % p.validation.every == 0:
                metrics = evaluate()
                tracker.log(step, metrics)
                if val_idx:
                    stop = stopper.update(step, metrics["loss/validation/step_average"],
                                          accelerator.unwrap_model(unet))
            if p.early_stop.patience and _any_process(accelerator, stop):
                end_step = step
                break
            if main and p.sample_every and step % p.sample_every == 0:
                tracker.log_image(step, _samples(pipe, unet, accelerator, p, cache.meta))

            # micro-steps: forward and backward; accelerate syncs and steps on the last one
            micro_losses = []
            for micro in range(step * p.grad_accum, (step + 1) * p.grad_accum):
                # this process's shard of the global micro-batch
                idx = train_pos[plan.batch_indices(micro, p.seed)].chunk(world)[rank]
                _trace(rank, step, micro, idx)
                gen = seeded_generator(p.seed, "micro", micro)
                # LoRA dropout draws from the global RNG: seeded per micro-batch and process
                torch.manual_seed(gen.initial_seed() + rank)
                with accelerator.accumulate(unet), accelerator.autocast():
                    loss = diffusion_loss(unet, scheduler, latents[idx], text[idx], gen,
                                          p.noise_offset, p.min_snr_gamma, shard=(rank, world))
                    if not torch.isfinite(loss):
                        raise _diverged(accelerator, unet, config, out_dir, tracker, step, lr,
                                        "the loss", health_report, facts)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        norm = accelerator.clip_grad_norm_(trainable, p.max_grad_norm or math.inf)
                        if not torch.isfinite(norm):
                            raise _diverged(accelerator, unet, config, out_dir, tracker, step,
                                            lr, "the gradient", health_report, facts)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                micro_losses.append(accelerator.reduce(loss.detach(), "mean").item())

            # log
            step_loss = sum(micro_losses) / len(micro_losses)
            step_losses.append(step_loss)
            epoch_losses.append(step_loss)
            window = step_losses[-plan.steps_per_epoch:]  # moving mean over one epoch of steps
            average = sum(window) / len(window)
            timed_steps += 1
            if main:
                metrics = {"loss/current": step_loss, "loss/average": average, "lr/unet": lr}
                if plan.epoch_of(step) != plan.epoch_of(step + 1) or step + 1 == plan.max_steps:
                    metrics["loss/epoch_average"] = sum(epoch_losses) / len(epoch_losses)
                    epoch_losses = []
                tracker.log(step + 1, metrics)
                tracker.text(f"step {step + 1}/{plan.max_steps} loss {step_loss:.5f} "
                             f"average {average:.5f} lr {lr:.3e}")
                bar.set_postfix(loss=f"{average:.4f}", lr=f"{lr:.1e}")
            bar.update()

            # checkpoint
            if p.checkpoint_every and (step + 1) % p.checkpoint_every == 0 \
                    and step + 1 < plan.max_steps:
                accelerator.wait_for_everyone()
                if main:
                    images = [(s, f"samples/{file.name}", file) for s, file in tracker.images]
                    checkpoints.save(accelerator, ckpt_dir, step + 1, {
                        "fingerprint": fp, "run_name": state["run_name"],
                        "history": tracker.history, "epoch_losses": epoch_losses,
                        "early_stop": stopper.to_state(),
                        "images": [(s, name) for s, name, _ in images],
                        "wall_time": time.perf_counter() - t0,
                    }, tensors={BEST_LORA: stopper.best_state},
                        files={name: file for _, name, file in images})
    finally:
        bar.close()

    accelerator.wait_for_everyone()
    summary = {}
    unwrapped = accelerator.unwrap_model(unet)
    if main:
        steps_per_s = timed_steps / max(time.perf_counter() - timed_from, 1e-9)
        stopped_early = end_step < plan.max_steps
        if not stopped_early:
            metrics = evaluate()
            tracker.log(end_step, metrics)
            if val_idx:
                stopper.update(end_step, metrics["loss/validation/step_average"], unwrapped)
        if p.sample_every:
            tracker.log_image(end_step, _samples(pipe, unet, accelerator, p, cache.meta))
        saved_step = end_step
        if stopped_early:  # the LoRA to keep is the one from the best validation step
            set_peft_model_state_dict(unwrapped, stopper.best_state, adapter_name="default")
            saved_step = stopper.best_step
        verdict = _diagnose(tracker.history, facts, params.health)
        fixed = [v["loss/train/fixed"] for _, v in tracker.history if "loss/train/fixed" in v]
        averages = _averages(step_losses, plan.steps_per_epoch)
        summary = _summary(verdict, tracker.history, end_step, {
            "final_average_loss": averages[-1], "min_average_loss": min(averages),
            "fixed_loss_start": fixed[0], "fixed_loss_end": fixed[-1],
            "steps": end_step, "epochs": round(end_step / plan.steps_per_epoch, 2),
            "trainable_params": n_trainable,
        })
        if val_idx:
            summary["early_stop"] = {"stopped": stopped_early, "best_step": stopper.best_step,
                                     "saved_step": saved_step}
        save_lora(unwrapped, config, params, plan, out_dir, cache.meta, base,
                  [cache.captions[i] for i in train_idx], saved_step, tracker.name)
        # Wall times go to TensorBoard and the terminal only: the outputs DVC hashes
        # (dvclive, the LoRA, train.log, health.md) stay byte-identical for identical runs.
        timing = {"wall_time_s": round(time.perf_counter() - t0, 2),
                  "steps_per_s": round(steps_per_s, 3)}
        tracker.summary(end_step, summary, timing)
        if stopped_early:
            print(f"train: early stop at step {end_step}: no better validation loss for "
                  f"{p.early_stop.patience} evaluations; saved the LoRA of step "
                  f"{stopper.best_step}, the best validation loss ({stopper.best:.4f})")
        print(f"train: {end_step} steps in {timing['wall_time_s']} s "
              f"({timing['steps_per_s']} steps/s); average loss {averages[-1]:.4f}; "
              f"fixed-noise loss {fixed[0]:.4f} -> {fixed[-1]:.4f}; LoRA in {out_dir}")
        tracker.hparams(flat_params(params), {"health.status": verdict.status})
        _report_health(tracker, verdict, health_report, end_step)  # the last line
        tracker.text(f"done: {summary}")
        tracker.close()
        checkpoints.clear(ckpt_dir)
    return TrainResult(summary, unwrapped, timing if main else {})


def _load_checkpoint(accelerator, path: Path, ckpt_dir: Path) -> None:
    """Resume from a checkpoint whose files all passed their digests (checkpoints.find)."""
    try:
        accelerator.load_state(str(path))
    except Exception as exc:  # torch/accelerate raise many types for a file they cannot use
        raise LorapipeError(
            f"checkpoint {path} passed its checksums but could not be loaded "
            f"({type(exc).__name__}: {exc}); delete {ckpt_dir} to start this run afresh"
        ) from None


def _trace(rank: int, step: int, micro: int, idx: torch.Tensor) -> None:
    """With LORAPIPE_TRACE_BATCHES=<folder>, each process records the images it trained on
    (rank<r>.jsonl): how the tests prove processes see distinct data."""
    folder = os.environ.get("LORAPIPE_TRACE_BATCHES")
    if folder:
        with open(Path(folder) / f"rank{rank}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "micro": micro, "images": idx.tolist()}) + "\n")


def _any_process(accelerator, flag: bool) -> bool:
    """True on every process when the main process says so (a collective: all must call)."""
    if accelerator.num_processes == 1:
        return flag
    from accelerate.utils import broadcast

    return bool(broadcast(torch.tensor([int(flag)], device=accelerator.device)).item())


def _series(history, name: str) -> health.Series:
    return [(step, m[name]) for step, m in history if name in m]


def _diagnose(history, facts: health.RunFacts, thresholds) -> health.Verdict:
    return health.diagnose(_series(history, "loss/train/fixed"),
                           _series(history, "loss/validation/step_average"),
                           _series(history, "loss/current"), facts, thresholds)


def _summary(verdict: health.Verdict, history, step: int, rest: dict) -> dict:
    """dvclive's metrics.json, in the order `dvc exp show` shows its columns: first what
    decides between runs (verdict, the last fixed-noise losses, the best validation step),
    then the rest; the verdict's evidence last. Short names (loss.train, loss.val: the
    fixed-noise losses), so all four fit 120 columns beside DVC's own."""
    last = {}
    for key, name in (("loss/train/fixed", "train"), ("loss/validation/step_average", "val")):
        values = [m[key] for _, m in history if key in m]
        if values:
            last[name] = values[-1]
    best = {} if verdict.best_step is None else {"best_step": verdict.best_step}
    return {"health": verdict.summary(), "loss": last, **best, "step": step, **rest,
            "verdict_numbers": verdict.numbers}


def _report_health(tracker, verdict: health.Verdict, path: Path | None, step: int) -> None:
    """The verdict as reports/health.md, TensorBoard text at the run's last step, and the
    stage's last line of output."""
    text = health.to_markdown(verdict, tracker.name)
    if path is not None:
        outputs.write_text(path, text)
    tracker.tb.add_text("health", text, step)
    print(f"train: health: {verdict.status}: {verdict.headline}"
          + (f"; {verdict.advice[0]}" if verdict.status != "healthy" else "")
          + (f"; try: {verdict.command}" if verdict.command else ""))


def _samples(pipe, unet, accelerator, p, meta):
    """A base-vs-LoRA grid of train.sample_prompts at the train seed, with the UNet as it is
    now. Draws only from its own seeded generators, so training is unaffected."""
    height, width = meta["image_size"]
    settings = SampleSettings(steps=p.sample_steps, guidance_scale=TRAIN_GUIDANCE,
                              negative_prompt="", width=width, height=height, lora_scale=1.0)
    was_training = unet.training
    unet.eval()
    with accelerator.autocast():
        image, _ = sample_grid(pipe, p.sample_prompts, [p.seed], settings)
    unet.train(was_training)
    return image


def _averages(losses: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(losses)):
        chunk = losses[max(0, i + 1 - window):i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def _diverged(accelerator, unet, config, out_dir, tracker, step, lr, what,
              health_report, facts: health.RunFacts) -> Diverged:
    """Save the last good LoRA (the weights before this step), record the health, and return
    the error to raise."""
    verdict = health.Verdict(
        "diverged", f"{what} became non-finite at step {step} (lr {lr:.2e})",
        [f"{what} at step {step} was NaN or Inf"], health.diverged_advice(facts),
        numbers={"step": step, "lr": lr})
    verdict.command = health.try_next(verdict, facts)
    error = Diverged(step, lr, what, verdict.advice, verdict.command)
    if accelerator.is_main_process:
        state = lora.peft_state(accelerator.unwrap_model(unet))
        if all(torch.isfinite(t).all() for t in state.values()):
            with outputs.atomic_dir(out_dir) as tmp:
                lora.save_diffusers(state, config, tmp, tracker.name)
        tracker.summary(step, _summary(verdict, tracker.history, step, {}))
        _report_health(tracker, verdict, health_report, step)
        tracker.text(f"diverged: {error}")
        tracker.close()
    return error


def save_lora(unet, config, params, plan: Plan, out_dir: Path, meta: dict, base: dict,
              captions: list[str], steps: int, run: str) -> None:
    """Both formats into out_dir, atomically; refuses non-finite weights. `steps` is the
    step whose weights these are (the best one after early stopping)."""
    state = lora.peft_state(unet)
    bad = [k for k, t in state.items() if not torch.isfinite(t).all()]
    if bad:
        raise LorapipeError(f"refusing to save non-finite LoRA weights ({bad[0]})")
    name = webui.output_name(params.lora.name)
    height, width = meta["image_size"]
    metadata = webui.build_metadata(
        params, name, base, (width, height), captions, plan.max_steps,
        math.ceil(plan.max_steps / plan.steps_per_epoch), steps)
    with outputs.atomic_dir(out_dir) as tmp:
        lora.save_diffusers(state, config, tmp, run)
        lora.save_webui(state, params.lora.alpha, metadata, tmp / webui.file_name(name))


def _register_lora_hooks(accelerator: Accelerator) -> None:
    """Checkpoints hold the LoRA weights only, not the whole UNet (MBs, not GBs)."""

    def save_hook(models, weights, folder):
        if accelerator.is_main_process:
            for model in models:
                save_file(lora.peft_state(accelerator.unwrap_model(model)),
                          str(Path(folder) / CHECKPOINT_LORA))
        weights.clear()

    def load_hook(models, folder):
        while models:
            model = accelerator.unwrap_model(models.pop())
            set_peft_model_state_dict(model, load_file(str(Path(folder) / CHECKPOINT_LORA)),
                                      adapter_name="default")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
