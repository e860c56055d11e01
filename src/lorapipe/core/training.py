"""The one training loop, for every task, through accelerate.

`Recipe` reads in the order it runs: setup (model, LoRA, optimizer, data, resume, trackers),
train (per step: evaluate, micro-steps, log, checkpoint), loss_step (one micro-batch: the
task's), finish (verdict, and the LoRA in the task's formats). The tasks fill in their parts
through hooks that return what the loop needs (`Data`, `Models`, the evaluation function,
the samples): lorapipe.diffusion.recipe.DiffusionRecipe (task_type sd) and
lorapipe.llm.training.LlmRecipe (task_type llm). The stage picks the class through the task
registry (lorapipe.tasks); this module imports no task.

Randomness is a pure function of (train.seed, position): the data order of epoch e comes from
seed and e, the noise and timesteps of micro-batch k from seed and k. A resumed run therefore
draws exactly what an uninterrupted one would, and on CPU ends with the same bytes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from lorapipe.core import (
    adapters,
    checkpoints,
    examples,
    health,
    optimizers,
    outputs,
    sharding,
    summary,
    threads,
)
from lorapipe.core.errors import LorapipeError
from lorapipe.core.evaluation import EarlyStop, Evaluation, gains, holdout
from lorapipe.core.metrics import (
    EPOCH_AVERAGE,
    STEP_AVERAGE,
    STEP_LOSS,
    TRAIN_FIXED,
    VALIDATION,
    VALIDATION_BEST,
)
from lorapipe.core.plan import Plan
from lorapipe.core.seeds import seeded_generator
from lorapipe.core.tracking import Tracker, remove_partial_runs, run_name

BEST_LORA = "best_lora.safetensors"
METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}
CHECKPOINT_LORA = "lora.safetensors"


class Diverged(LorapipeError):
    """The loss or gradient became non-finite; the weights were not updated with it."""

    def __init__(self, step: int, lr: float, what: str, advice: list[str], command: str):
        super().__init__(
            f"{what} became non-finite at step {step} (lr {lr:.2e}). The last good LoRA "
            f"(before step {step}) was saved. Try: {'; '.join(advice)}. Next run: {command}"
        )
        self.step = step


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
    timing: dict  # wall_time_s, steps_per_s: kept out of the hashed outputs
    # every trained component by name with its LoRA (the best step's after early stopping):
    # the image task's denoiser and any text encoders, the LLM task's model
    models: dict


@dataclass(frozen=True)
class Paths:
    cache: Path
    out: Path
    live: Path
    logs: Path
    checkpoints: Path
    health: Path | None
    examples: Path | None = None  # reports/examples.csv: each evaluated example's losses


def run(params, paths: Paths, recipe_class: type[Recipe]) -> TrainResult:
    """Train, log, diagnose and save with the task's recipe. Raises Diverged on NaN/Inf."""
    recipe = recipe_class(params, paths)
    recipe.setup()
    end_step = recipe.train()
    return recipe.finish(end_step)


@dataclass(frozen=True)
class Data:
    """What a task's load_data returns: the loaded cache's summary for the loop."""

    keys: list[str]  # each training example's key: the held-out split hashes it
    base: str  # the model.base the cache was encoded with
    cache_file: Path  # the cache's file (the checkpoints' fingerprint reads it)


@dataclass
class Models:
    """What a task's build_models returns: the base with its LoRA attached."""

    trained: dict[str, torch.nn.Module]  # the components accelerate prepares, by name
    groups: list[dict]  # the optimizer's parameter groups (the first one's lr is logged first)
    name: str  # the base's family, for the header and model.family in dvc exp show

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [q for g in self.groups for q in g["params"]]


Sample = object  # what a task's samples() returns: a PIL image (a grid) or markdown text


HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def compute_dtype(mixed_precision: str) -> torch.dtype:
    """What the frozen base computes in: train.mixed_precision's half type, else fp32."""
    return HALF.get(mixed_precision, torch.float32)


def half_precision(modules, mixed_precision: str) -> None:
    """With bf16/fp16 mixed precision: the frozen base in half precision, the trainable LoRA
    weights kept in fp32 (as diffusers' training examples). bitsandbytes' 8- and 4-bit
    weights are integers, which module.to(dtype) leaves as they are."""
    half = HALF.get(mixed_precision)
    if half is None:
        return
    for model in modules:
        model.to(half)
        cast_training_params(model, dtype=torch.float32)


class Recipe:
    """One training run, in the shape of torchtune's LoRA recipes: setup() builds everything
    (model, LoRA, optimizer, data, resume state, trackers), train() is the loop, loss_step()
    is one micro-batch's loss, checkpoint() and finish() save.

    This class is what every task shares: the accelerate loop, gradient accumulation, the
    NaN guard, checkpoints and resume, logging, the evaluation rhythm, early stopping, the
    health verdict, and the per-micro-batch shard and seeds (`shard`). A task
    (lorapipe.diffusion.recipe.DiffusionRecipe, lorapipe.llm.training.LlmRecipe) fills in
    the hooks that raise NotImplementedError; each returns what the loop needs, and the loop
    reads nothing else of the task's."""

    unit = "images"  # what one training example is called in messages
    fixed_name = "fixed-noise loss"  # the fixed training loss, in the final line
    # the lr of each optimizer group, in group order (kohya's names: lorapipe.core.metrics)
    lr_names: tuple[str, ...] = ()

    def __init__(self, params, paths: Paths):
        self.params, self.paths = params, paths
        self.p, self.lp = params.train, params.lora

    # -- what a task provides -------------------------------------------------------------
    def load_data(self) -> Data:
        """Load the cache (onto the task's own attributes); say what the loop needs of it."""
        raise NotImplementedError

    @property
    def build_device(self) -> torch.device:
        """Where build_models puts the base: the CPU when it is to be sharded (each block
        goes to the device as its share is cut), else the training device."""
        return torch.device("cpu") if self.sharded else self.accelerator.device

    def build_models(self) -> Models:
        """The base with its LoRA, and the optimizer's groups."""
        raise NotImplementedError

    def plan_groups(self) -> list[list[int]] | None:
        """Training positions per bucket (batches never mix buckets), or None."""
        return None

    def after_prepare(self) -> Callable[[], Evaluation]:
        """Move the data to the device (self.models now holds the prepared components);
        return the evaluation: () -> the fixed losses by metric name, and with
        train.validation.breakdown each example's own, in the order of the sets
        self.train_idx[:fixed_images] and self.val_idx[:max_images] (main process only)."""
        raise NotImplementedError

    def describe(self, i: int) -> tuple[str, str]:
        """Example i for the reports: where it is (file, or line) and its caption or prompt."""
        raise NotImplementedError

    def loss_step(self, micro: int) -> torch.Tensor:
        """The loss of this process's shard of global micro-batch `micro` (see shard)."""
        raise NotImplementedError

    def setup_lines(self) -> list[str]:
        """Lines printed (and logged, except warnings) after the header."""
        return []

    def samples(self, step: int) -> Sample:
        """Samples of the model as it is now (main process): an image or markdown text."""
        raise NotImplementedError

    def export(self, unwrapped: dict, saved_step: int, end_step: int) -> None:
        """The trained LoRA in the task's formats, into self.paths.out."""
        raise NotImplementedError

    def save_partial(self, state: dict, folder: Path) -> None:
        """The last good LoRA of a diverged run (adapter_state() weights) into `folder`."""
        raise NotImplementedError

    # -- what the loop gives a task -------------------------------------------------------
    def shard(self, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        """Global micro-batch `micro`: (its training positions, this process's shard of them,
        the micro-batch's generator). Seeds the global RNG (which LoRA dropout draws from)
        per micro-batch and process, and records the shard (trace_batch). The determinism
        contract rests on this: every draw is a function of (seed, micro, rank)."""
        batch = self.train_pos[self.plan.batch_indices(micro, self.p.seed)]
        idx = batch.chunk(self.world)[self.rank]
        trace_batch(self.rank, micro // self.p.grad_accum, micro, idx)
        gen = seeded_generator(self.p.seed, "micro", micro)
        torch.manual_seed(gen.initial_seed() + self.rank)
        return batch, idx, gen

    # -- set-up ---------------------------------------------------------------------------
    def setup(self) -> None:
        p = self.p
        if p.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise LorapipeError("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no")
        acc = self.accelerator = Accelerator(mixed_precision=p.mixed_precision,
                                             gradient_accumulation_steps=p.grad_accum)
        if acc.distributed_type == DistributedType.FSDP:  # launched by hand with such a config
            raise LorapipeError(f"train.accelerate_config: {sharding.ACCELERATE_FSDP}")
        self.main = acc.is_main_process
        self.world, self.rank = acc.num_processes, acc.process_index
        # train.fsdp: the frozen base in shards; every forward is then collective
        self.sharded = p.fsdp and self.world > 1
        self.threads = None  # a GPU run leaves torch's CPU threads as they are
        if acc.device.type == "cpu":
            self.threads, self.threads_why = threads.share(p.cpu_threads)
            torch.set_num_threads(self.threads)
        self.data = data = self.load_data()
        if data.base != self.params.model.base:
            raise LorapipeError(
                f"the cache in {self.paths.cache} was encoded with {data.base}, "
                f"not model.base {self.params.model.base}; rerun the encode stage")
        self.train_idx, self.val_idx = holdout(data.keys, p.validation.split)
        built = self.build_models()
        self.model_name, self.trainable = built.name, built.trainable
        self.n_trainable = sum(q.numel() for q in self.trainable)
        self.plan = Plan.from_params(p, len(self.train_idx), self.world, self.plan_groups())
        self.facts = health.RunFacts.from_params(self.params, len(self.train_idx))
        optimizer = optimizers.build(p, built.groups)
        lr_scheduler = get_scheduler(
            p.lr_scheduler, optimizer=optimizer,
            num_warmup_steps=p.lr_warmup_steps * self.world,
            num_training_steps=self.plan.max_steps * self.world,
        )
        if self.sharded:  # not DDP: the LoRA whole on each process, gradients averaged here
            self.shard_units = sharding.shard(built.trained, self.trainable, acc.device,
                                              self.world)
            sharding.broadcast(self.trainable)
            self.optimizer, self.lr_scheduler = acc.prepare(optimizer, lr_scheduler)
            self.models = built.trained
        else:
            if self.world > 1:
                _frozen_not_broadcast(built.trained.values())
            *prepared, self.optimizer, self.lr_scheduler = acc.prepare(
                *built.trained.values(), optimizer, lr_scheduler)
            self.models = dict(zip(built.trained, prepared, strict=True))  # as prepared (DDP)
        self.train_pos = torch.tensor(self.train_idx)
        self.evaluate = self.after_prepare()
        _register_lora_hooks(acc, self.unwrapped)
        self._resume()

    def _resume(self) -> None:
        """The newest intact checkpoint of these params and data, if any; the trackers."""
        p, paths = self.p, self.paths
        self.stopper = EarlyStop(p.early_stop.patience)
        self.fp = checkpoints.fingerprint(self.params, self.data.cache_file)
        found, notes = checkpoints.find(paths.checkpoints, self.fp)
        # named after what decides the result, not the clock: a rerun of the same params and
        # data writes the same outputs, TensorBoard run name included
        state = {"run_name": run_name(f"run-{self.fp[:8]}"), "history": [], "wall_time": 0.0}
        if found:
            _load_checkpoint(self.accelerator, found, paths.checkpoints)
            state = checkpoints.read_state(found)
            if self.threads and state.get("cpu_threads"):
                # the thread count moves the last bits on CPU: the resumed run keeps the
                # count it started with, so it ends with the bytes it would have
                self.threads = state["cpu_threads"]
                self.threads_why = "as when this run started: its checkpoint says"
                torch.set_num_threads(self.threads)
            self.stopper = EarlyStop(p.early_stop.patience, **state["early_stop"],
                                     best_state=checkpoints.read_tensors(found, BEST_LORA))
        self.state, self.start_step = state, state.get("step", 0)
        # the base's evaluation (the reference of every gain) and each evaluation's
        # per-example losses, as [step, {set: losses}]
        self.reference = (Evaluation.from_state(state["reference"])
                          if state.get("reference") else None)
        self.example_history = [(s, e) for s, e in state.get("examples", [])]
        self.step_losses = [v[STEP_LOSS] for _, v in state["history"] if STEP_LOSS in v]
        self.epoch_losses = list(state.get("epoch_losses", []))
        self.t0 = time.perf_counter() - state["wall_time"]
        self.tracker = None
        if not self.main:
            return
        for note in notes:
            print(f"train: {note}")
        if notes and not found:
            print("train: no usable checkpoint: starting from step 0")
        if not found:
            for gone in remove_partial_runs(paths.logs, checkpoints.run_names(paths.checkpoints),
                                            state["run_name"]):
                print(f"train: removed TensorBoard run {gone}: unfinished, or this run's "
                      "own earlier one")
        self.tracker = Tracker(paths.live, paths.logs, state["run_name"], flat_params(self.params),
                               history=state["history"], resume_step=self.start_step,
                               images=[(step, found / name)
                                       for step, name in state.get("images", [])])
        header = self._header() + (f"; resumed from {found} at step {self.start_step}"
                                   if found else "")
        for line in [header, *self.setup_lines()]:
            print(line)
            if not line.startswith("train: warning:"):  # warnings: the terminal only
                self.tracker.text(line)
        if not self.val_idx:
            print("train: warning: train.validation.split is 0, so overfitting cannot be seen")

    def _header(self) -> str:
        p, lp, plan = self.p, self.lp, self.plan
        return (
            f"train: {self.model_name} base {self.params.model.base}; {len(self.train_idx)} "
            f"training + {len(self.val_idx)} validation {self.unit}, batch {p.batch_size} x "
            f"grad_accum {p.grad_accum} x {self.world} process(es) = global batch "
            f"{p.batch_size * p.grad_accum * self.world}; {plan.max_steps} steps "
            f"({plan.steps_per_epoch} per epoch, ~{plan.max_steps / plan.steps_per_epoch:.1f} "
            f"epochs); {self.n_trainable:,} trainable {METHOD_NAMES[lp.method]} parameters (rank "
            f"{lp.rank}, alpha {lp.alpha:g}"
            + (f"; LoCon convolutions at rank {lp.conv_rank}, alpha {lp.conv_alpha:g}"
               if lp.conv_rank and self.params.task_type == "sd" else "")
            + f"); optimizer {optimizers.describe(p)}; TensorBoard run {self.state['run_name']}"
            + (f"; {self.threads} CPU thread{'s' if self.threads > 1 else ''} per process "
               f"({self.threads_why})" if self.threads else "")
            + (f"; frozen base sharded over {self.world} processes (train.fsdp: FSDP2, "
               f"{self.shard_units} units)" if self.sharded else "")
        )

    # -- the loop -------------------------------------------------------------------------
    def train(self) -> int:
        """Steps from the resume point to the end (or an early stop); returns the last."""
        p, acc, plan = self.p, self.accelerator, self.plan
        self.timed_from, self.timed_steps = time.perf_counter(), 0
        bar = tqdm(total=plan.max_steps, initial=self.start_step, desc="train", unit="step",
                   dynamic_ncols=True, disable=not self.main, mininterval=1.0)
        for model in self.models.values():
            model.train()
        try:
            for step in range(self.start_step, plan.max_steps):
                lrs = optimizers.rates_before(self.optimizer, self.lr_scheduler.get_last_lr())
                lr = lrs[0]
                with optimizers.eval_weights(self.optimizer):  # schedule-free: its average
                    if step % p.validation.every == 0 and self._evaluate(step):
                        acc.set_trigger()  # every process stops at this step
                    if p.early_stop.patience and acc.check_trigger():
                        return step
                    if p.sample_every and step % p.sample_every == 0:
                        self._log_samples(step)
                # micro-steps: forward, backward; accelerate syncs and steps on the last one
                losses = [self.optimizer_micro_step(micro, step, lr)
                          for micro in range(step * p.grad_accum, (step + 1) * p.grad_accum)]
                self._log_step(step, sum(losses) / len(losses),
                               optimizers.rates_after(self.optimizer, lrs))
                bar.set_postfix(loss=f"{self.step_losses[-1]:.4f}", lr=f"{lr:.1e}")
                bar.update()
                if p.checkpoint_every and (step + 1) % p.checkpoint_every == 0 \
                        and step + 1 < plan.max_steps:
                    self.checkpoint(step + 1)
        finally:
            bar.close()
        return plan.max_steps

    def unwrapped(self) -> dict[str, torch.nn.Module]:
        """The trained components without their DDP wrappers."""
        return {name: self.accelerator.unwrap_model(m) for name, m in self.models.items()}

    def optimizer_micro_step(self, micro: int, step: int, lr: float) -> float:
        """Forward and backward of one micro-batch; clip and step on the last of a step.
        Non-finite loss or gradient: save the last good LoRA and raise Diverged."""
        acc = self.accelerator
        with acc.accumulate(*self.models.values()), acc.autocast():
            loss = self.loss_step(micro)
            if not torch.isfinite(loss):
                raise self._diverged(step, lr, "the loss")
            acc.backward(loss)
            if acc.sync_gradients:
                if self.sharded:
                    sharding.average_gradients(self.trainable, self.world)
                norm = acc.clip_grad_norm_(self.trainable, self.p.max_grad_norm or math.inf)
                if not torch.isfinite(norm):
                    raise self._diverged(step, lr, "the gradient")
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return acc.reduce(loss.detach(), "mean").item()

    def _evaluate(self, step: int) -> bool:
        """The fixed-noise losses before this step's update; True to stop early."""
        if not (self.main or self.sharded):  # (sharded: every process takes part)
            return False
        metrics = self._measure(step)
        return self.main and bool(self.val_idx) and self.stopper.update(
            step, metrics[VALIDATION], self.unwrapped())

    def _measure(self, step: int) -> dict[str, float]:
        """One evaluation, logged with its gains over the base and the best validation so
        far; the first is the base's own (at step 0 the LoRA is a no-op; after lora.init the
        base is measured with the LoRA switched off)."""
        ev = self.evaluate()
        if self.reference is None:
            self.reference = ev
            if self.lp.init:
                with adapters.switched_off(self.unwrapped()):
                    self.reference = self.evaluate()
        metrics = {**ev.metrics, **gains(ev.metrics, self.reference.metrics)}
        if VALIDATION in metrics:  # the stopper holds the best before this evaluation
            metrics[VALIDATION_BEST] = min(metrics[VALIDATION], self.stopper.best)
        if not self.main:  # (a sharded run's other processes: their part of the forwards)
            return metrics
        self.tracker.log(step, metrics)
        self.example_history.append((step, ev.examples))
        return metrics

    def _log_samples(self, step: int) -> None:
        """The main process's samples; a sharded run's others take part in the forwards."""
        if not (self.main or self.sharded):
            return
        sample = self.samples(step)
        if not self.main:
            return
        if isinstance(sample, str):
            self.tracker.log_text(step, sample)
        else:
            self.tracker.log_image(step, sample)

    def _log_step(self, step: int, step_loss: float, lrs: list[float]) -> None:
        plan = self.plan
        self.step_losses.append(step_loss)
        self.epoch_losses.append(step_loss)
        window = self.step_losses[-plan.steps_per_epoch:]  # moving mean over an epoch of steps
        average = sum(window) / len(window)
        self.timed_steps += 1
        if not self.main:
            return
        lr = lrs[0]
        metrics = {STEP_LOSS: step_loss, STEP_AVERAGE: average, self.lr_names[0]: lr,
                   **optimizers.extra_metrics(self.optimizer)}
        if len(lrs) > 1:  # kohya's name; every text encoder shares this rate
            metrics[self.lr_names[1]] = lrs[1]
        if plan.epoch_of(step) != plan.epoch_of(step + 1) or step + 1 == plan.max_steps:
            metrics[EPOCH_AVERAGE] = sum(self.epoch_losses) / len(self.epoch_losses)
            self.epoch_losses = []
        self.tracker.log(step + 1, metrics)
        self.tracker.text(f"step {step + 1}/{plan.max_steps} loss {step_loss:.5f} "
                          f"average {average:.5f} lr {lr:.3e}")

    # -- saving ---------------------------------------------------------------------------
    def checkpoint(self, step: int) -> None:
        """Everything a resume needs, after optimizer step `step`."""
        self.accelerator.wait_for_everyone()
        if not self.main:
            return
        images = [(s, f"samples/{file.name}", file) for s, file in self.tracker.images]
        checkpoints.save(self.accelerator, self.paths.checkpoints, step, {
            "fingerprint": self.fp, "run_name": self.state["run_name"],
            "history": self.tracker.history, "epoch_losses": self.epoch_losses,
            "early_stop": self.stopper.to_state(),
            "reference": self.reference.to_state() if self.reference else None,
            "examples": self.example_history,
            "images": [(s, name) for s, name, _ in images],
            "wall_time": time.perf_counter() - self.t0, "cpu_threads": self.threads,
        }, tensors={BEST_LORA: self.stopper.best_state},
            files={name: file for _, name, file in images})

    def finish(self, end_step: int) -> TrainResult:
        """Last evaluation, verdict, summary and the LoRA in both formats (the best
        validation step's after an early stop)."""
        p, plan, acc = self.p, self.plan, self.accelerator
        acc.wait_for_everyone()
        optimizers.to_eval(self.optimizer)  # schedule-free: evaluate and save its average
        unwrapped = self.unwrapped()
        stopped_early = end_step < plan.max_steps
        # the last evaluation and samples (on every process of a sharded run: collective)
        metrics = None
        if (self.main or self.sharded) and not stopped_early:
            metrics = self._measure(end_step)
        if p.sample_every:
            self._log_samples(end_step)
        if not self.main:
            return TrainResult({}, {}, unwrapped)
        tracker, stopper = self.tracker, self.stopper
        steps_per_s = self.timed_steps / max(time.perf_counter() - self.timed_from, 1e-9)
        if metrics and self.val_idx:
            stopper.update(end_step, metrics[VALIDATION], unwrapped)
        saved_step = end_step
        if stopped_early:  # the LoRA to keep is the one from the best validation step
            adapters.load_adapter_state(unwrapped, stopper.best_state, "the best step's LoRA")
            saved_step = stopper.best_step
        verdict = summary.diagnose(tracker.history, self.facts, self.params.health)
        fixed = [v[TRAIN_FIXED] for _, v in tracker.history if TRAIN_FIXED in v]
        averages = summary.averages(self.step_losses, plan.steps_per_epoch)
        values = summary.summary(verdict, tracker.history, end_step, self.model_name, {
            "final_average_loss": averages[-1], "min_average_loss": min(averages),
            "fixed_loss_start": fixed[0], "fixed_loss_end": fixed[-1],
            "steps": end_step, "epochs": round(end_step / plan.steps_per_epoch, 2),
            "trainable_params": self.n_trainable,
        })
        if self.val_idx:
            values["early_stop"] = {"stopped": stopped_early, "best_step": stopper.best_step,
                                     "saved_step": saved_step}
        self.export(unwrapped, saved_step, end_step)
        # Wall times go to TensorBoard and the terminal only: the outputs DVC hashes
        # (dvclive, the LoRA, train.log, health.md) stay byte-identical for identical runs.
        timing = {"wall_time_s": round(time.perf_counter() - self.t0, 2),
                  "steps_per_s": round(steps_per_s, 3)}
        tracker.summary(end_step, values, timing)
        if stopped_early:
            print(f"train: early stop at step {end_step}: no better validation loss for "
                  f"{p.early_stop.patience} evaluations; saved the LoRA of step "
                  f"{stopper.best_step}, the best validation loss ({stopper.best:.4f})")
        print(f"train: {end_step} steps in {timing['wall_time_s']} s "
              f"({timing['steps_per_s']} steps/s); average loss {averages[-1]:.4f}; "
              f"{self.fixed_name} {fixed[0]:.4f} -> {fixed[-1]:.4f}; LoRA in {self.paths.out}")
        tracker.hparams(flat_params(self.params), {"health.status": verdict.status})
        sections = self._examples_report(saved_step)
        summary.report_health(tracker, verdict, self.paths.health, end_step,  # the last line
                              sections)
        tracker.text(f"done: {values}")
        tracker.close()
        checkpoints.clear(self.paths.checkpoints)
        return TrainResult(values, timing, unwrapped)

    def _examples_report(self, saved_step: int) -> list[tuple[str, list[str]]]:
        """reports/examples.csv (each evaluated example: base and saved LoRA's loss,
        improvement, rank, outlier) and the health report's section on them."""
        p = self.p
        sets = {"train": self.train_idx[:p.validation.fixed_images],
                "validation": self.val_idx[:p.validation.max_images]}
        # the saved LoRA's (the best step's after an early stop)
        measured = dict(self.example_history)
        final = Evaluation({}, measured.get(saved_step, self.example_history[-1][1]))
        rows = examples.table(self.reference, final, sets, self.describe, self.params.health)
        if self.paths.examples is not None:
            outputs.write_text(self.paths.examples, examples.to_csv(rows))
        what = health.DATA_ADVICE[self.params.task_type]["outlier"]
        return [("Examples", examples.report(rows, sets, self.unit, what))]

    def _diverged(self, step: int, lr: float, what: str) -> Diverged:
        """Save the last good LoRA (the weights before this step), record the health, and
        return the error to raise."""
        facts = self.facts
        verdict = health.Verdict(
            "diverged", f"{what} became non-finite at step {step} (lr {lr:.2e})",
            [f"{what} at step {step} was NaN or Inf"], health.diverged_remedies(facts),
            numbers={"step": step, "lr": lr})
        error = Diverged(step, lr, what, verdict.advice, verdict.command)
        if self.main:
            tracker = self.tracker
            optimizers.to_eval(self.optimizer)  # schedule-free: its averaged weights
            state = adapters.adapter_state(self.unwrapped())
            if all(torch.isfinite(t).all() for t in state.values()):
                with outputs.atomic_dir(self.paths.out) as tmp:
                    self.save_partial(state, tmp)
            tracker.summary(step, summary.summary(verdict, tracker.history, step,
                                                        self.model_name, {}))
            summary.report_health(tracker, verdict, self.paths.health, step)
            tracker.text(f"diverged: {error}")
            tracker.close()
        return error


def _load_checkpoint(accelerator, path: Path, ckpt_dir: Path) -> None:
    """Resume from a checkpoint whose files all passed their digests (checkpoints.find)."""
    try:
        accelerator.load_state(str(path))
    except Exception as exc:  # torch/accelerate raise many types for a file they cannot use
        raise LorapipeError(
            f"checkpoint {path} passed its checksums but could not be loaded "
            f"({type(exc).__name__}: {exc}); delete {ckpt_dir} to start this run afresh"
        ) from None


def _frozen_not_broadcast(models) -> None:
    """DDP sends every parameter from the main process to the others when it wraps a model;
    the frozen base is already the same everywhere (the same file or seeded builtin, the
    same quantization), and gloo cannot send float8 (model.quantize fp8: "Invalid scalar
    type"). torch's own switch for that (a private DDP helper: accelerate's prepare builds
    the DDP and takes no such argument) leaves the base out; the LoRA is still sent from the
    main process and its gradients averaged."""
    from torch.nn.parallel import DistributedDataParallel

    for model in models:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, [n for n, q in model.named_parameters() if not q.requires_grad])


def trace_batch(rank: int, step: int, micro: int, idx: torch.Tensor) -> None:
    """With LORAPIPE_TRACE_BATCHES=<folder>, each process records the images it trained on
    (rank<r>.jsonl): how the tests prove processes see distinct data."""
    folder = os.environ.get("LORAPIPE_TRACE_BATCHES")
    if folder:
        with open(Path(folder) / f"rank{rank}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "micro": micro, "images": idx.tolist()}) + "\n")


def _register_lora_hooks(accelerator: Accelerator, unwrapped) -> None:
    """Checkpoints hold the LoRA weights only, of every trained component in one file, not
    the whole models (MBs, not GBs). unwrapped(): the components by name."""

    def save_hook(models, weights, folder):
        if accelerator.is_main_process:
            save_file(adapters.adapter_state(unwrapped()), str(Path(folder) / CHECKPOINT_LORA))
        weights.clear()

    def load_hook(models, folder):
        models.clear()  # loaded here, not by accelerate
        adapters.load_adapter_state(unwrapped(), load_file(str(Path(folder) / CHECKPOINT_LORA)),
                                    f"checkpoint {folder}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
