"""Caption augmentation for tag-style captions, as kohya's dataset options do it.

"1girl, red hair, smile" is three tags. Per use of a caption: with probability `dropout` it
becomes "" (kohya's caption_dropout_rate: the unconditional model that classifier-free
guidance needs keeps learning); otherwise the first `keep_tokens` tags stay first, the
rest are shuffled (`shuffle`) and each is then left out with probability `tag_dropout`.

Written here because no library does it: kohya's code lives inside its dataset classes and
draws from Python's global `random`. Here every draw comes from the generator it is given
(training passes one seeded by train.seed and the micro-batch), so a resumed run sees the
same captions an uninterrupted one does.
"""

from __future__ import annotations

import torch


def active(p) -> bool:
    """Whether train.captions changes any caption (then text is encoded per step)."""
    return bool(p.shuffle or p.dropout or p.tag_dropout)


def describe(p) -> str:
    parts = []
    if p.shuffle:
        parts.append("shuffled tags" + (f" (first {p.keep_tokens} kept)" if p.keep_tokens else ""))
    if p.tag_dropout:
        parts.append(f"tag dropout {p.tag_dropout:g}")
    if p.dropout:
        parts.append(f"caption dropout {p.dropout:g}")
    return ", ".join(parts)


def augment(caption: str, p, gen: torch.Generator) -> str:
    """One use of `caption` under train.captions `p`, drawing only from `gen`. The number of
    draws depends only on the caption, never on earlier outcomes' values."""
    drop = torch.rand((), generator=gen).item() < p.dropout
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    kept, rest = tags[:p.keep_tokens], tags[p.keep_tokens:]
    order = torch.randperm(len(rest), generator=gen).tolist()
    keep = (torch.rand(len(rest), generator=gen) >= p.tag_dropout).tolist()
    if drop:
        return ""
    if p.shuffle:
        rest = [rest[i] for i in order]
    return ", ".join(kept + [t for t, k in zip(rest, keep, strict=True) if k])
