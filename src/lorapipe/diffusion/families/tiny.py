"""The parts the builtin tiny models share (one place, so no family reaches into another's
module or into the loaders): the seed, CLIP BPE and T5 tokenizers built from a word list, SD's
KL VAE and the flow transformers' 16-channel one with tiny widths. Nothing is downloaded."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTokenizer, T5Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

TINY_SEED = 0

# Measured on data/example at 64 px (tests/test_models.py keeps it true): the random tiny
# VAE's latent means have a std of 0.363 there, so SD's 0.18215 would shrink them to ~0.07 and
# the diffusion loss would barely depend on the image. 1/0.363 = 2.76 gives unit variance.
TINY_VAE_SCALING = 2.76

# Words the builtin tokenizer knows whole (everything else falls back to characters):
# the example captions plus the words most captions are made of.
TINY_WORDS = """
a an the of in on at with and or for to from by is are this that photo picture image
painting drawing illustration render style lpstyle sks art artwork portrait landscape
red blue green yellow purple orange pink black white grey gray brown teal cyan magenta
circle square triangle star shape shapes round bold outline outlined highlight stripes
striped pastel background foreground dark light bright soft sharp simple flat
cat dog man woman person face girl boy tree sky sea water mountain city house car
small large big tiny one two three high quality detailed best
""".split()


def tiny_tokenizer() -> CLIPTokenizer:
    """A real CLIP BPE tokenizer with a small vocabulary made here, so nothing is downloaded."""
    chars = list(bytes_to_unicode().values())  # GPT-2/CLIP byte-level BPE's byte table
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab[token] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in TINY_WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            if (merged, piece) not in merges:
                merges.append((merged, piece))
            merged += piece
            vocab.setdefault(merged, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def tiny_vae() -> AutoencoderKL:
    """SD's KL VAE (8x downsampling, 4 latent channels) with tiny widths, seeded; the tiny
    SDXL shares it (SDXL's VAE has SD's architecture, only its weights and scale differ)."""
    torch.manual_seed(TINY_SEED + 1)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
        sample_size=64, scaling_factor=TINY_VAE_SCALING,
    )


# Measured on data/example at 64 px (tests/test_flux.py keeps it true): the random tiny
# 16-channel VAE's latent means have mean -0.016 and std 0.309 there. As Flux's own
# shift_factor 0.1159 and scaling_factor 0.3611 (SD3's 0.0609 and 1.5305) do on real images,
# these centre them at unit variance.
TINY_VAE16_SHIFT = -0.016
TINY_VAE16_SCALING = 3.24
TINY_T5_TOKENS = 64  # the builtins' T5 reads 64 tokens (captions here are short)


def tiny_vae16() -> AutoencoderKL:
    """The 16-channel KL VAE of the flow-matching transformers (Flux.1, SD3: no quant convs,
    a shift factor) with tiny widths, seeded; the tiny Flux and SD3 share it (their real
    VAEs have this architecture, only weights and scales differ), and with it the measured
    shift and scale above."""
    torch.manual_seed(TINY_SEED + 22)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
        sample_size=64, scaling_factor=TINY_VAE16_SCALING, shift_factor=TINY_VAE16_SHIFT,
        use_quant_conv=False, use_post_quant_conv=False)


def tiny_t5_tokenizer() -> T5Tokenizer:
    """A real T5 (SentencePiece Unigram) tokenizer with a small vocabulary made here: T5's
    special tokens (<pad> 0, </s> 1, <unk> 2), the builtin words whole ("▁word", the
    SentencePiece word-start mark) and every letter, digit and punctuation mark as the
    fallback pieces, scored as log-probabilities so whole words win."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + word, -5.0) for word in TINY_WORDS]
    chars = sorted(set("".join(TINY_WORDS)) | set("abcdefghijklmnopqrstuvwxyz0123456789"
                                                  ",.:;!?'\"()-_/"))
    for char in chars:
        vocab += [(char, -10.0), ("▁" + char, -10.5)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=TINY_T5_TOKENS)
