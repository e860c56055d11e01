"""The LLM task's part of the training recipe: LoRA on a causal LM over cached token ids.

lorapipe.core.training.Recipe runs the loop, checkpoints, logging, health and early stopping;
this class gives it the data (the token cache), the model (peft's get_peft_model), the
loss (next-token cross-entropy on the trained tokens only), the fixed losses (on a fixed
subset of the training examples and on the held-out ones: no noise to fix, so they are
deterministic as they are), the text samples and the export (a peft adapter folder).

The loss of a step is the mean over every trained token of the whole global batch (all
processes, all accumulated micro-batches), as one process with one big batch would compute
it: each shard's summed loss is divided by the global token count, which every process
knows from the seeded plan without a collective.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch
from peft import PeftModel, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer

from lorapipe.core import compat as core_compat
from lorapipe.core import outputs, quantize
from lorapipe.core.adapters import RUN_KEY
from lorapipe.core.errors import LorapipeError
from lorapipe.core.evaluation import Evaluation, evaluating
from lorapipe.core.metrics import (
    LR_LORA,
    PERPLEXITY_TRAIN,
    PERPLEXITY_VALIDATION,
    TRAIN_FIXED,
    VALIDATION,
    VALIDATION_DIVERGENCE,
)
from lorapipe.core.training import Data, Models, Recipe, compute_dtype, half_precision
from lorapipe.llm import compat, gguf_export
from lorapipe.llm.adapter import ADAPTER_FILE, CONFIG_FILE, attach, bake_rslora, load_adapter
from lorapipe.llm.data import CACHE_FILE, Example, load_token_cache
from lorapipe.llm.models import KEEP, load_llm
from lorapipe.llm.packing import pack, slots
from lorapipe.llm.sampling import GenerationSettings, base_and_lora, base_only, to_markdown

MERGED_DIR = "merged"
IGNORE = -100  # the label of a token outside the loss (torch's cross_entropy default)


class LlmRecipe(Recipe):
    unit = "examples"
    fixed_name = "fixed training loss"
    lr_names = (LR_LORA,)

    def load_data(self) -> Data:
        self.cache = load_token_cache(self.paths.cache)
        return Data(self.cache.keys, self.cache.meta["base"],
                    Path(self.paths.cache) / CACHE_FILE)

    def build_models(self) -> Models:
        p, lp = self.p, self.lp
        model, self.tokenizer = load_llm(self.params.model.base)
        self.base_config = model.config
        model.config.use_cache = False  # training: no key/value cache
        # what adapter_config.json's base_model_name_or_path says: model.base as written
        model.name_or_path = self.params.model.base
        self.settings = GenerationSettings.from_params(self.params.llm, p.seed)
        self.base_answers = None
        if lp.init_weights != "default" and p.sample_every:
            # PiSSA / OLoRA change the base's weights: with the adapter off the model is the
            # residual, not the base, so the base's answers are taken before attaching
            self.base_answers = base_only(model, self.tokenizer, p.sample_prompts, self.settings)
        mode = self.params.model.quantize
        compute = compute_dtype(self.accelerator.mixed_precision)
        self.n_quantized = quantize.before_adapter(model.to(self.build_device), mode,
                                                   compute, KEEP)
        if self.n_quantized:  # QLoRA's preparation: the rest of the base frozen in fp32
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=p.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(p.seed)  # the LoRA's init
        model = attach(model, lp, self.params.model.base)
        self.initial = None
        if lp.init_weights != "default":  # what the export converts against
            self.initial = tempfile.TemporaryDirectory(prefix="lorapipe-initial-")
            model.peft_config["default"].init_lora_weights = True  # as peft's docs say
            model.save_pretrained(self.initial.name, safe_serialization=True)
            model.peft_config["default"].init_lora_weights = lp.init_weights
        self.init_notes = [load_adapter(model, lp.init)] if lp.init else []
        if gguf_export.formats(self.params.llm.export_gguf):  # refused before training
            problem = gguf_export.refusal(model.peft_config["default"].to_dict(),
                                          self.base_config.to_dict())
            if problem:
                raise LorapipeError(f"llm.export_gguf: {problem}")
        if mode not in quantize.BITSANDBYTES:  # (prepared for them: their rest stays fp32)
            half_precision([model], self.accelerator.mixed_precision)
        self.n_quantized += quantize.after_adapter(model, mode, compute, KEEP)
        if p.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        trainable = [q for q in model.parameters() if q.requires_grad]
        self.n_modules = sum(isinstance(m, BaseTunerLayer) for m in model.modules())
        return Models({"model": model}, [{"params": trainable, "lr": p.learning_rate}],
                      f"llm:{self.base_config.model_type}")

    def after_prepare(self):
        p = self.p
        self.model = self.models["model"]
        self.device = self.accelerator.device
        # trained tokens per example (the first token is never predicted)
        self.tokens_of = [int(self.cache.example(i)[1][1:].sum()) for i in range(len(self.cache))]
        self.fixed_sets = (self.train_idx[:p.validation.fixed_images],
                           self.val_idx[:p.validation.max_images])
        return self._fixed_losses

    def setup_lines(self) -> list[str]:
        lp, meta = self.lp, self.cache.meta
        self.compat_facts = compat.from_params(self.params, Path.cwd())
        self.compat_rows = compat.rows(self.compat_facts)
        where = (f"preset {lp.targets}" if isinstance(lp.targets, str)
                 else "list " + ",".join(lp.targets))
        lengths = (self.cache.offsets[1:] - self.cache.offsets[:-1]).tolist()
        lines = [f"train: lora.targets {where}: {self.n_modules} modules; examples of "
                 f"{min(lengths)}-{max(lengths)} tokens, {int(self.cache.trained.sum())} of "
                 f"{len(self.cache.ids)} trained ("
                 + ("prompts too" if meta["train_on_prompt"] else "answers only")
                 + ")", *quantize.line(self.params.model.quantize, self.n_quantized, "model",
                                       compute_dtype(self.accelerator.mixed_precision)),
                 core_compat.line(self.compat_rows), *self.init_notes, self._padding_line(lengths)]
        return lines

    def _padding_line(self, lengths: list[int]) -> str:
        """What padding costs over the first epoch's micro-batches, packed and not."""
        p, cap = self.p, self.params.llm.max_length
        micro = max(1, round(self.plan.steps_per_epoch * p.grad_accum))
        batches = [[lengths[self.train_idx[pos]] for pos in
                    self.plan.batch_indices(m, p.seed).chunk(self.world)[self.rank].tolist()]
                   for m in range(micro)]
        tokens = sum(map(sum, batches))
        padded = {packed: sum(slots(b, cap, packed) for b in batches) for packed in (False, True)}

        def share(packed):
            return f"{100 * (1 - tokens / padded[packed]):.0f}% padding"

        if self.params.llm.packing:
            return (f"train: llm.packing: an epoch's batches in {padded[True]:,} token slots "
                    f"({share(True)}) instead of {padded[False]:,} unpacked ({share(False)})")
        return (f"train: batches padded to their longest example: {share(False)} over an "
                f"epoch; llm.packing: true would leave {share(True)}")

    # -- batches and the loss -------------------------------------------------------------
    def _collate_packed(self, idx: list[int]) -> tuple[torch.Tensor, ...]:
        """Packed rows (lorapipe.llm.packing): ids, labels (each example's first token out of
        the loss, as unpacked, where nothing predicts it), no mask, and position ids that
        restart with each example (the trailing padding a block of its own)."""
        examples = [self.cache.example(i) for i in idx]
        rows = pack([len(ids) for ids, _ in examples], self.params.llm.max_length)
        width = max(sum(len(examples[j][0]) for j in row) for row in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for j in row:
                tokens, trained = examples[j]
                n = len(tokens)
                ids[r, at:at + n] = tokens
                labels[r, at + 1:at + n] = torch.where(trained[1:], tokens[1:], IGNORE)
                positions[r, at:at + n] = torch.arange(n)
                at += n
            positions[r, at:] = torch.arange(width - at)
        return ids.to(self.device), labels.to(self.device), None, positions.to(self.device)

    def _collate(self, idx: list[int]) -> tuple[torch.Tensor, ...]:
        """Right-padded ids, labels (IGNORE outside the loss), the attention mask and no
        position ids (the model counts them)."""
        examples = [self.cache.example(i) for i in idx]
        width = max(len(ids) for ids, _ in examples)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, (tokens, trained) in enumerate(examples):
            n = len(tokens)
            ids[row, :n] = tokens
            labels[row, :n] = torch.where(trained, tokens, IGNORE)
            mask[row, :n] = 1
        return ids.to(self.device), labels.to(self.device), mask.to(self.device), None

    def _summed_loss(self, model, idx: list[int], per_example: bool = False,
                     packed: bool = False) -> torch.Tensor:
        """Cross-entropy summed over the trained tokens of these examples (per_example: one
        sum per example, from unpacked rows)."""
        ids, labels, mask, positions = (self._collate_packed if packed else self._collate)(idx)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        # each position predicts the next token: the labels shifted left, not the logits (a
        # slice of the logits would copy the step's largest tensor, batch x length x vocab)
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
        if not per_example:
            return torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                reduction="sum")
        return torch.nn.functional.cross_entropy(
            logits.transpose(1, 2).float(), targets, ignore_index=IGNORE,
            reduction="none").sum(dim=1)

    def _step_tokens(self, micro: int) -> int:
        """Trained tokens in the whole optimizer step that micro-batch `micro` belongs to."""
        accum = self.p.grad_accum
        first = micro - micro % accum
        return sum(self.tokens_of[self.train_idx[pos]]
                   for m in range(first, first + accum)
                   for pos in self.plan.batch_indices(m, self.p.seed).tolist())

    def loss_step(self, micro: int) -> torch.Tensor:
        _, idx, _ = self.shard(micro)
        # DDP averages over processes and accelerate divides by grad_accum: scaled back, the
        # step's gradient is that of the mean over all its trained tokens
        scale = self.world * self.p.grad_accum / max(self._step_tokens(micro), 1)
        return self._summed_loss(self.model, idx.tolist(),
                                 packed=self.params.llm.packing) * scale

    @torch.no_grad()
    def _fixed_losses(self) -> Evaluation:
        """Mean token loss on the fixed training subset and on the held-out examples, their
        perplexities, and each example's own mean token loss; eval mode (no dropout), the
        global RNG untouched."""
        model = self.unwrapped()["model"]
        ev = Evaluation({})
        with torch.random.fork_rng(devices=[]), evaluating(model), self.accelerator.autocast():
            for (name, perplexity, part), idx in zip(
                    ((TRAIN_FIXED, PERPLEXITY_TRAIN, "train"),
                     (VALIDATION, PERPLEXITY_VALIDATION, "validation")),
                    self.fixed_sets, strict=True):
                if not idx:
                    continue
                sums = torch.cat([
                    self._summed_loss(model, idx[i:i + self.p.batch_size], per_example=True)
                    for i in range(0, len(idx), self.p.batch_size)]).double().cpu()
                tokens = torch.tensor([max(self.tokens_of[i], 1) for i in idx],
                                      dtype=torch.float64)
                loss = (sums.sum() / max(sum(self.tokens_of[i] for i in idx), 1)).item()
                ev.metrics[name] = loss
                ev.metrics[perplexity] = math.exp(min(loss, 50.0))
                if self.p.validation.breakdown:
                    ev.examples[part] = (sums / tokens).tolist()
        if VALIDATION in ev.metrics:
            ev.metrics[VALIDATION_DIVERGENCE] = ev.metrics[VALIDATION] - ev.metrics[TRAIN_FIXED]
        return ev

    def describe(self, i: int) -> tuple[str, str]:
        """Where example i is (its line in the data file) and its prompt, for the reports."""
        example = Example.from_json(self.cache.lines[i], self.cache.keys[i])
        if example.messages:
            text = next((m["content"] for m in example.messages if m["role"] == "user"),
                        example.messages[0]["content"])
        else:
            text = example.text or ""
        return f"line {example.line}", text

    # -- samples and export ---------------------------------------------------------------
    def samples(self, step: int) -> str:
        rows = base_and_lora(self.unwrapped()["model"], self.tokenizer, self.p.sample_prompts,
                             self.settings)
        if self.base_answers is not None:  # PiSSA / OLoRA: the base's own answers
            rows = [{**row, **base} for row, base in zip(rows, self.base_answers, strict=True)]
        return to_markdown(rows, self.settings, f"samples at step {step}")

    def _save_adapter(self, folder: Path) -> None:
        """The peft adapter folder (adapter_config.json, adapter_model.safetensors), the
        layout PeftModel.from_pretrained and vLLM's LoRA loader read."""
        model = self.unwrapped()["model"]
        # PiSSA / OLoRA: converted by peft into a LoRA of twice the rank on the unchanged base
        convert = {"path_initial_model_for_weight_conversion": self.initial.name} \
            if self.initial else {}
        model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False,
                              **convert)
        (folder / "README.md").unlink(missing_ok=True)  # peft's model-card stub
        # target_modules is a set, written in the process's hash order: sorted, the same
        # run writes the same bytes
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
        if convert:  # the converted adapter starts from zero like any other LoRA
            config["init_lora_weights"] = True
        config = bake_rslora(config)
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                          encoding="utf-8")
        outputs.canonical_safetensors(folder / ADAPTER_FILE, {RUN_KEY: self.tracker.name})

    def export(self, unwrapped: dict, saved_step: int, end_step: int) -> None:
        with outputs.atomic_dir(self.paths.out) as tmp:
            self._save_adapter(tmp)
            if kinds := gguf_export.formats(self.params.llm.export_gguf):
                gguf_export.write(tmp, self.base_config.to_dict(), kinds, self.tracker.name)
            if self.params.llm.merge:
                merge(self.params.model.base, tmp, tmp / MERGED_DIR)
        saved = compat.from_files(self.paths.out, self.compat_facts)
        print(core_compat.checked(self.compat_rows, compat.rows(saved)))

    def save_partial(self, state: dict, folder: Path) -> None:
        self._save_adapter(folder)


def merge(base: str, adapter: Path, out: Path) -> None:
    """The base with the adapter merged in, as a model folder (llm.merge), in the base's own
    dtype: loaded afresh, so the merge is of exactly the saved adapter."""
    model, tokenizer = load_llm(base)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    dtype = getattr(merged.config, "dtype", None) or getattr(merged.config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        merged.to(dtype)
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    for leftover in out.glob("*.md"):
        leftover.unlink()
