"""The image task's part of the training recipe: LoRA on the family's denoiser (and
optionally the text encoders) over cached latents.

lorapipe.core.training.Recipe runs the loop, checkpoints, logging, health and early stopping;
this class gives it the data (the latent cache), the models (the family's pipeline with
peft adapters), the loss of the family's objective with its conditioning, the fixed-noise
losses, the sample grids and the export in diffusers and WebUI formats.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lorapipe.core import compat as core_compat
from lorapipe.core import quantize
from lorapipe.core.errors import LorapipeError
from lorapipe.core.evaluation import evaluating
from lorapipe.core.metrics import LR_DENOISER, LR_TEXT
from lorapipe.core.seeds import seeded_generator
from lorapipe.core.training import Data, Models, Recipe, compute_dtype, half_precision
from lorapipe.diffusion import captions, compat, lora, webui
from lorapipe.diffusion.cache import CACHE_FILE, load_cache
from lorapipe.diffusion.evaluation import Evaluator
from lorapipe.diffusion.models import load_base
from lorapipe.diffusion.objectives import FlowSettings, diffusion_loss
from lorapipe.diffusion.rules import refusals
from lorapipe.diffusion.sampling import SampleSettings, sample_grid


class DiffusionRecipe(Recipe):
    """LoRA on an image model's denoiser (and optionally its text encoders) over cached
    latents. The model family (SD, SDXL) enters through its objective and conditioning
    (loss_step, evaluation) and the export."""

    lr_names = (LR_DENOISER, LR_TEXT)

    def load_data(self) -> Data:
        self.cache = load_cache(self.paths.cache)
        return Data(self.cache.files, self.cache.meta["base"],
                    Path(self.paths.cache) / CACHE_FILE)

    def build_models(self) -> Models:
        models, self._base_encoders = self._load_base()
        groups = self._attach_lora(models, self._base_encoders)
        return Models(models, groups, self.family.name)

    def plan_groups(self) -> list[list[int]]:
        positions = {i: pos for pos, i in enumerate(self.train_idx)}
        return [[positions[i] for i in group]
                for group in self.cache.latents.groups(self.train_idx)]

    def after_prepare(self) -> Evaluator:
        p, acc, cache = self.p, self.accelerator, self.cache
        self.denoiser = self.models[self.family.denoiser]
        # the text encoders as called per step: the prepared ones where they train
        self.encoders = {name: self.models.get(name, e).to(acc.device)
                         for name, e in self._base_encoders.items()}
        self.latents = cache.latents.to(acc.device)
        self.cond = {k: v.to(acc.device) for k, v in cache.cond.items()}
        self.tokens = {k: v.to(acc.device) for k, v in cache.tokens.items()}
        # evaluations on the bare modules: no DDP collectives (they run on the main process
        # only, or on every process of a sharded run, whose shards gather themselves)
        denoiser = self.unwrapped()[self.family.denoiser]
        return Evaluator(
            denoiser, self.objective, self.latents,
            lambda idx: self.family.predictor(denoiser, self._eval_cond(idx), self.objective),
            self.train_idx[:p.validation.fixed_images], self.val_idx[:p.validation.max_images],
            p.seed, p.validation.timesteps, p.validation.breakdown)

    def describe(self, i: int) -> tuple[str, str]:
        """Image i's file (in data.dir, as metadata.csv names it) and its caption."""
        return self.cache.meta.get("sources", self.cache.files)[i], self.cache.captions[i]

    def _load_base(self) -> tuple[dict, dict]:
        """The base model; returns the components that get a LoRA (the denoiser, and the
        text encoders with lora.text_encoder) and the text encoders that run per step
        (those, or frozen ones when train.captions change captions per step)."""
        p, lp = self.p, self.lp
        m = self.params.model
        base = load_base(m.base, m.config, prediction_type=m.prediction_type,
                         noise_schedule=m.noise_schedule)
        pipe, family = base.pipe, base.family
        self.family = family
        problems = refusals(family.refused, {"train.noise_offset": p.noise_offset,
                                             "train.min_snr_gamma": p.min_snr_gamma},
                            family.title)
        if lp.text_encoder and not family.trained_text_encoders():
            problems.append(f"lora.text_encoder: {family.no_text_lora}; set "
                            "lora.text_encoder: false")
        if problems:
            raise LorapipeError("; ".join(problems))
        # what the base is for the WebUI metadata; kohya's ss_zero_terminal_snr beside it
        self.base = {**family.base_version(pipe), "zero_terminal_snr": bool(
            pipe.scheduler.config.get("rescale_betas_zero_snr"))}
        self.objective = family.objective(pipe, FlowSettings(**vars(p.flow)))
        # otherwise the text encoders' outputs come from the cache
        self.caption_ops = captions.active(p.captions)
        self.text_per_step = lp.text_encoder or self.caption_ops
        encoders = family.encoders_of(pipe) if self.text_per_step else {}
        self.tokenizers = family.tokenizers_of(pipe) if self.caption_ops else {}
        self.pipe = None
        if p.sample_every:  # sample images need the whole pipeline, on the same denoiser
            pipe.scheduler = family.sampler(p.sample_scheduler, pipe.scheduler)
            pipe.set_progress_bar_config(disable=True)
            self.pipe = pipe
        # the rest of the pipeline (the VAE, unused text encoders) goes with `pipe`
        denoiser = getattr(pipe, family.denoiser)
        trained = {name: e for name, e in encoders.items()
                   if lp.text_encoder and name in family.trained_text_encoders()}
        return {family.denoiser: denoiser, **trained}, encoders

    def _attach_lora(self, models: dict, encoders: dict) -> list[dict]:
        """LoRA on every component in `models` (continued from lora.init), precision and
        checkpointing; returns the optimizer's parameter groups, the denoiser's first."""
        p, lp, family = self.p, self.lp, self.family
        denoiser = models[family.denoiser]
        mode = self.params.model.quantize
        compute = compute_dtype(self.accelerator.mixed_precision)
        self.n_quantized = quantize.before_adapter(denoiser.to(self.build_device), mode,
                                                   compute)
        torch.manual_seed(p.seed)  # the LoRA's Gaussian init
        self.configs = lora.configs_for(lp, family, models)
        self.lora_modules = lora.attach(models, self.configs, family)
        # in the family's order: optimizer groups and checkpoints must not depend on set order
        self.text_trained = [name for name in self.configs if name != family.denoiser]
        for name, encoder in encoders.items():
            if name not in self.configs:  # run per step for the captions only: frozen, and
                encoder.requires_grad_(False)  # without dropout (T5's is 0.1), as encode ran it
                encoder.eval()
        self.init_notes = (lora.load_init(models, lp.init, self.configs, self.family)
                           if lp.init else [])
        half_precision([denoiser, *encoders.values()], self.accelerator.mixed_precision)
        self.n_quantized += quantize.after_adapter(denoiser, mode, compute)
        if p.gradient_checkpointing:
            self.family.enable_gradient_checkpointing(denoiser)
            for name in self.text_trained:
                encoders[name].gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
        groups = [{"params": [q for q in denoiser.parameters() if q.requires_grad],
                   "lr": p.learning_rate}]
        groups += [{"params": [q for q in encoders[name].parameters() if q.requires_grad],
                    "lr": p.text_encoder_lr} for name in self.text_trained]
        return groups

    def setup_lines(self) -> list[str]:
        self.compat_facts = compat.from_params(self.params, Path.cwd())
        self.compat_rows = compat.rows(self.compat_facts)
        lines = [self._targets_line(), *quantize.line(
            self.params.model.quantize, self.n_quantized, self.family.denoiser,
            compute_dtype(self.accelerator.mixed_precision)),
            core_compat.line(self.compat_rows), *self.init_notes]
        histogram = self._train_histogram()
        if len(histogram) > 1:
            lines.append(f"train: {len(histogram)} buckets (training images per size): "
                         + ", ".join(f"{size}: {n}" for size, n in histogram.items()))
            lonely = [size for size, n in histogram.items() if n == 1]
            if lonely:
                lines.append(f"train: warning: bucket(s) {', '.join(lonely)} hold a single "
                             "image: its batches repeat that image")
        return lines

    def _targets_line(self) -> str:
        """Where the LoRA sits (lora.targets: the preset and the modules it resolved to), and
        how text conditioning is computed."""
        lp, p = self.lp, self.p
        where = f"preset {lp.targets}" if isinstance(lp.targets, str) else "list " + ",".join(
            lp.targets)
        modules = ", ".join(f"{n} {name}" for name, n in self.lora_modules.items())
        line = f"train: lora.targets {where}: {sum(self.lora_modules.values())} modules ({modules})"
        if lp.text_encoder:
            line += f"; text encoder lr {p.text_encoder_lr:g}"
        if self.caption_ops:
            line += (f"; captions: {captions.describe(p.captions)}, tokenized and encoded "
                     "per step")
        elif lp.text_encoder:
            line += "; text encoded per step from the cached token ids"
        return line

    def loss_step(self, micro: int) -> torch.Tensor:
        """The loss of this process's shard of global micro-batch `micro`."""
        batch, idx, gen = self.shard(micro)
        cond = {k: v[idx] for k, v in self.cond.items()}
        if self.text_per_step:
            cond.update(self._text(micro, batch, idx))
        return diffusion_loss(self.family.predictor(self.denoiser, cond, self.objective),
                              self.objective,
                              self.latents[idx], gen, self.p.noise_offset,
                              self.p.min_snr_gamma, shard=(self.rank, self.world))

    def _text(self, micro: int, batch: torch.Tensor, idx: torch.Tensor) -> dict:
        """This shard's text conditioning, encoded now: from the cached token ids, or with
        train.captions on from captions changed for this micro-batch (drawn for the whole
        global batch, then sliced, as the noise is: the same captions in any process count)."""
        if self.caption_ops:
            gen = seeded_generator(self.p.seed, "caption", micro)
            texts = [captions.augment(self.cache.captions[i], self.p.captions, gen)
                     for i in batch.tolist()]
            mine = texts[self.rank * len(idx):(self.rank + 1) * len(idx)]
            ids = {k: v.to(self.accelerator.device)
                   for k, v in self.family.tokenize(self.tokenizers, mine).items()}
        else:
            ids = {k: v[idx] for k, v in self.tokens.items()}
        with torch.set_grad_enabled(self.lp.text_encoder):
            return self.family.encode_tokens(self.encoders, ids)

    def _eval_cond(self, idx: list[int]) -> dict:
        """The conditioning of these images for the fixed-noise losses: the captions as
        written (no train.captions changes), through the text-encoder LoRA as it is now
        when one trains."""
        cond = {k: v[idx] for k, v in self.cond.items()}
        if self.lp.text_encoder:
            encoders = {name: self.accelerator.unwrap_model(e)
                        for name, e in self.encoders.items()}
            with torch.no_grad(), evaluating(*encoders.values()):
                cond.update(self.family.encode_tokens(
                    encoders, {k: v[idx] for k, v in self.tokens.items()}))
        return cond

    def export(self, unwrapped: dict, saved_step: int, end_step: int) -> None:
        plan, tracker = self.plan, self.tracker
        meta = self.cache.meta
        height, width = meta["image_size"]
        layout = meta.get("layout") or {}
        if layout.get("buckets"):  # kohya writes the base resolution of a bucketed run
            width = height = layout["resolution"]
        lora.save_lora(unwrapped, self.configs, self.family, self.params, self.paths.out,
                       lora.Record(self.base, (width, height),
                                   [self.cache.captions[i] for i in self.train_idx],
                                   [_dataset_dir(self.params.data.dir, self.cache.files[i])
                                    for i in self.train_idx],
                                   plan.max_steps, math.ceil(plan.max_steps / plan.steps_per_epoch),
                                   saved_step, tracker.name, layout,
                                   self._train_histogram(),
                                   self.family.network_args(self.lp)))
        saved = compat.from_files(self.paths.out, self.compat_facts.family,
                                  webui.file_name(webui.output_name(self.lp.name)))
        print(core_compat.checked(self.compat_rows, compat.rows(saved)))

    def save_partial(self, state: dict, folder: Path) -> None:
        lora.save_adapters(state, self.configs, self.family, folder, self.tracker.name,
                           self.lp.method)

    def _train_histogram(self) -> dict[str, int]:
        """Training images per bucket, largest count first."""
        counts: dict[str, int] = {}
        for i in self.train_idx:
            size = self.cache.latents.bucket(i)
            counts[size] = counts.get(size, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def samples(self, step: int):
        """A base-vs-LoRA grid of train.sample_prompts at the train seed, with the denoiser
        as it is now. Draws only from its own seeded generators, so training is unaffected."""
        p = self.p
        height, width = self.cache.meta["image_size"]
        settings = SampleSettings(steps=p.sample_steps, guidance_scale=p.sample_guidance_scale,
                                  negative_prompt="", width=width, height=height, lora_scale=1.0)
        with evaluating(*self.models.values()), self.accelerator.autocast():
            image, _ = sample_grid(self.pipe, p.sample_prompts, [p.seed], settings,
                                   family=self.family)
        return image


def _dataset_dir(data_dir: str, file: str) -> str:
    """kohya's dataset folder of an image: data.dir's name, and the image's subfolder."""
    return str(Path(Path(data_dir).name, file).parent.as_posix())
