"""Measuring helpers shared by the benchmarks: each configuration runs in its own subprocess (so
its peak resident memory is its own), reports one JSON line, and the parent prints the table."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULT_PREFIX = "RESULT "


def rss_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (the kernel's own count)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class RssSampler:
    """Polls resident memory on a thread; `reset()` starts a new peak (e.g. once steps begin)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def reset(self) -> None:
        self.peak = rss_bytes()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


class StepClock:
    """Wall and CPU seconds of each step after `warmup` steps; call `tick()` when a step ends."""

    def __init__(self, warmup: int, sampler: RssSampler):
        self.warmup = warmup
        self.sampler = sampler
        self.ticks = 0
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._last = (time.perf_counter(), cpu_seconds())

    def tick(self) -> None:
        now = (time.perf_counter(), cpu_seconds())
        self.ticks += 1
        if self.ticks > self.warmup:
            self.wall.append(now[0] - self._last[0])
            self.cpu.append(now[1] - self._last[1])
        elif self.ticks == self.warmup:
            self.sampler.reset()  # the steady-state peak, without model loading and first-step setup
        self._last = now

    def start(self) -> None:
        """Call right before the first step when the clock was made earlier."""
        self._last = (time.perf_counter(), cpu_seconds())

    def result(self, **extra) -> dict:
        return {
            "s_per_step": statistics.median(self.wall) if self.wall else None,
            "cpu_s_per_step": statistics.median(self.cpu) if self.cpu else None,
            "step_times": [round(t, 3) for t in self.wall],
            "steps_peak_rss_gb": self.sampler.stop() / 2**30,
            "process_peak_rss_gb": peak_rss_bytes() / 2**30,
            **extra,
        }


def report(result: dict) -> None:
    """Print the child's result line for the parent."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(script: Path, args: list[str], timeout: float = 1800) -> dict:
    """Run one configuration in a fresh process and return its result (or the error)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
            result["child_wall_s"] = time.perf_counter() - started
            return result
    return {"error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}


class WholeTableAdamW:
    """How the reference scripts train one new token: AdamW over the whole token-embedding table,
    then every row but the new one put back after each step."""

    def __init__(self, table, new_row: int, lr: float, weight_decay: float):
        import torch

        self.table = table.requires_grad_(True)
        self.optimizer = torch.optim.AdamW([table], lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, eps=1e-8)
        self.original = table.detach().clone()
        self.keep = torch.ones(table.shape[0], dtype=torch.bool)
        self.keep[new_row] = False

    def step(self) -> None:
        import torch

        self.optimizer.step()
        self.optimizer.zero_grad()
        with torch.no_grad():
            self.table[self.keep] = self.original[self.keep]


def compare(script: Path, names: tuple[str, ...], passed: list[str]) -> dict[str, dict]:
    """Run each named configuration of `script` (its `--child NAME` mode) in its own process."""
    rows = {}
    for name in names:
        rows[name] = run_child(script, ["--child", name, *passed])
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
    return rows


def make_pictures(folder: Path, count: int, size: int) -> Path:
    """`count` pictures of `size` pixels with a few coloured shapes each, in `folder`."""
    import random

    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = random.Random(i)
        image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(5):
            x, y, r = rng.randrange(size), rng.randrange(size), rng.randrange(size // 8, size // 3)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        image.save(folder / f"picture{i}.png")
    return folder


def print_table(rows: dict[str, dict], columns: list[tuple[str, str, str]]) -> None:
    """A plain table: one row per configuration; columns are (key, heading, format)."""
    width = max(14, *(len(name) + 1 for name in rows))
    print("configuration".ljust(width) + "".join(heading.rjust(20) for _, heading, _ in columns))
    for name, result in rows.items():
        if "error" in result:
            print(name.ljust(width) + "  failed: " + result["error"][-400:])
            continue
        cells = [(fmt.format(result[key]) if result.get(key) is not None else "-").rjust(20) for key, _, fmt in columns]
        print(name.ljust(width) + "".join(cells))
