"""llm.packing: a micro-batch's examples laid out in the fewest rows of up to llm.max_length
tokens, none cut in two. Packing changes how a batch is laid out, not what it holds: the same
examples per step as unpacked, the same loss per trained token, the same gradient (within
floating-point summation order), only less padding to compute.

Each example's position ids restart at 0 and no attention mask is passed: transformers then
builds the block-diagonal causal mask from the position ids (masking_utils'
find_packed_sequence_indices), for SDPA and eager attention alike, and flash-attention takes
the same position ids as its variable-length path. It does so only without a key/value cache,
which training never has (config.use_cache is off). Light: no torch.
"""

from __future__ import annotations


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows of example positions (into `lengths`), each row's lengths summing to at most
    `capacity`: as few rows as first-fit decreasing needs, the examples then dealt longest
    first to the least-filled row they fit in (so the rows come out even and the longest,
    which every row is padded to, short). Ties by position: the same batch always packs the
    same way, and a resumed run packs as the uninterrupted one did."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:  # first-fit decreasing: how many rows
        row = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if row is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[row].append(i)
            room[row] -= lengths[i]
    even: list[list[int]] = [[] for _ in rows]
    load = [0] * len(rows)
    for i in order:
        fits = [r for r in range(len(rows)) if load[r] + lengths[i] <= capacity]
        if not fits:  # dealing evenly would need another row: keep first-fit's
            return rows
        row = min(fits, key=lambda r: (load[r], r))
        even[row].append(i)
        load[row] += lengths[i]
    return even


def slots(lengths: list[int], capacity: int, packed: bool) -> int:
    """Token positions one micro-batch computes: rows x the longest row."""
    if not packed:
        return len(lengths) * max(lengths)
    rows = pack(lengths, capacity)
    return len(rows) * max(sum(lengths[i] for i in row) for row in rows)
