"""What every benchmark does at the end: write its JSON result and print a table."""

from __future__ import annotations

import json
import re
from pathlib import Path


def table(title: str, columns: list[tuple[str, str, str]], rows: list[dict]) -> None:
    """Print rows under a title; columns are (header, row key, format spec such as '>8.2f');
    the spec's width also sets the header's."""
    print(f"\n{title}")
    widths = [max(len(h), int(re.match(r"[<>^]?(\d*)", spec).group(1) or 0))
              for h, _, spec in columns]
    aligns = ["<" if spec.startswith("<") else ">" for _, _, spec in columns]
    print(" ".join(f"{h:{a}{w}}" for (h, _, _), a, w in zip(columns, aligns, widths,
                                                             strict=True)))
    for row in rows:
        cells = [format(row[key], spec) if key in row else "-" for _, key, spec in columns]
        print(" ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, aligns, widths, strict=True)))


def write(path: str | Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")


def peak_memory(rss_after_setup_gib: float) -> dict:
    """A child benchmark's peak memory: torch's peak allocated memory on CUDA, else the
    process's peak RSS (and the RSS it had after set-up)."""
    import resource

    import torch

    if torch.cuda.is_available():
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "device_name": torch.cuda.get_device_name()}
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "rss_after_setup_gib": rss_after_setup_gib}


def child_row(script: str, child: str, args: list[str], row: dict) -> dict:
    """Run `script --child <child> <args>` in its own process (one benchmark setting): its
    last stdout line as JSON, else `row` with the error's last line under "failed"."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, script, "--child", child, *args],
                          capture_output=True, text=True, cwd=Path(script).resolve().parents[1])
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return {**row, "failed": tail[:200]}


def limit_address_space(gib: float) -> None:
    """A CPU child's address-space limit, so a setting that does not fit fails with an
    out-of-memory error instead of taking the machine down (CUDA runs: none)."""
    import resource

    import torch

    if not torch.cuda.is_available():
        limit = int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def timed_steps(loss_of, optimizer, steps: int, device: str,
                dtype=None) -> tuple[list[float], float]:
    """One warm-up step and `steps` more (0: the warm-up alone) of loss_of() -> backward ->
    optimizer step, under autocast to `dtype` where given: each step's seconds (CUDA:
    synchronized) and the last loss."""
    import time

    import torch

    times = []
    for _ in range(max(steps, 0) + 1):
        begin = time.perf_counter()
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    return times, loss.item()


def lora_step(model, loss_of, steps: int, device: str, dtype=None) -> dict:
    """Time a LoRA step on `model` (its trainable parameters under AdamW) after its set-up:
    s/step over the steps after the warm-up (--steps 0: the warm-up alone), the model's and
    the LoRA's sizes, the last loss and the peak memory (peak_memory)."""
    import resource

    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, loss = timed_steps(loss_of, opt, steps, device, dtype)
    measured = times[1:] or times
    out = {"device": device, "s_per_step": sum(measured) / len(measured),
           "first_step_only": not times[1:], "warmup_s": times[0],
           "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
           "lora_params": sum(p.numel() for p in params), "loss": loss}
    out.update(peak_memory(rss_setup))
    return out
