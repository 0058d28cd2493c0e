"""The optimization loop every method shares: AdamW on the new vectors only, diffusers'
learning-rate schedules, gradient clipping and accumulation, progress events, stop within one
step, and a guard that keeps the last good vectors when the loss blows up."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .events import Reporter


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class LoopSettings:
    steps: int
    lr: float
    weight_decay: float = 0.0
    schedule: str = "constant"  # any name diffusers' get_scheduler knows
    warmup_steps: int = 0
    grad_clip: float | None = None
    grad_accum: int = 1
    phase: str = "train"


@dataclass
class LoopResult:
    steps_done: int
    stopped_early: bool
    last_loss: float | None


def make_optimizer(vectors: torch.Tensor, settings: LoopSettings, state: dict | None = None):
    """AdamW over the new vectors and its schedule (diffusers' get_scheduler)."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW([vectors], lr=settings.lr, weight_decay=settings.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state)
        for group in optimizer.param_groups:  # the new run's settings win over the saved ones
            group["lr"] = group["initial_lr"] = settings.lr
            group["weight_decay"] = settings.weight_decay
    scheduler = get_scheduler(
        settings.schedule, optimizer, num_warmup_steps=settings.warmup_steps, num_training_steps=settings.steps
    )
    return optimizer, scheduler


def optimize(
    vectors: torch.Tensor,
    compute_loss: Callable[[int], torch.Tensor],
    settings: LoopSettings,
    reporter: Reporter,
    on_step: Callable[[int], None] | None = None,
    optimizer_state: dict | None = None,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[LoopResult, torch.optim.Optimizer]:
    """Run `settings.steps` optimizer steps on `vectors` (a float32 leaf tensor).

    `compute_loss(micro_step)` returns a scalar loss for one micro-batch; it is called
    `grad_accum` times per step. `on_step(step)` runs after each step (checkpoints, previews).
    A stop request ends the loop after the current step. On a NaN/inf loss, `vectors` is reset
    to the last good values and TrainingDiverged is raised.

    With `project` (hard prompts), each step evaluates the loss and its gradient at
    `project(vectors)` and applies that gradient to the unprojected vectors.
    """
    optimizer, scheduler = make_optimizer(vectors, settings, optimizer_state)
    last_good = vectors.detach().clone()
    last_loss = None
    step = 0
    for step in range(1, settings.steps + 1):
        if reporter.should_stop():
            return LoopResult(step - 1, True, last_loss), optimizer
        reporter.step_started()
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        try:
            if project is not None:
                with torch.no_grad():
                    vectors.copy_(project(vectors))
            for micro in range(settings.grad_accum):
                loss = compute_loss(micro)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingDiverged(
                        f"the loss became {value} at step {reporter.steps_done + 1}; lower the learning rate "
                        "(--lr) or train in full precision (--precision fp32). The last good embedding was kept."
                    )
                (loss / settings.grad_accum).backward()
                total += value / settings.grad_accum
            if project is not None:  # step from where the vectors were, with the projected gradient
                with torch.no_grad():
                    vectors.copy_(last_good)
            if settings.grad_clip:
                torch.nn.utils.clip_grad_norm_([vectors], settings.grad_clip)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            if not bool(torch.isfinite(vectors).all()):
                raise TrainingDiverged(
                    f"the embedding became NaN or infinite at step {reporter.steps_done + 1}; lower the learning "
                    "rate (--lr). The last good embedding was kept."
                )
        except BaseException:
            with torch.no_grad():
                vectors.copy_(last_good)
            raise
        with torch.no_grad():
            last_good.copy_(vectors)
        last_loss = total
        reporter.step_finished(total, lr, settings.phase)
        if on_step is not None:
            on_step(step)
    return LoopResult(step, False, last_loss), optimizer


EMBEDDING_FILE = "learned_embeds.safetensors"


class EmbeddingWriter:
    """Writes a run's embedding into its output folder: `learned_embeds.safetensors` (always the
    latest) and, every `save_every` steps, a numbered copy. Nothing is written before the first
    step, so a run that fails at once never overwrites an earlier good file. With SDXL's two text
    encoder `widths`, the vectors hold both parts side by side and are saved in SDXL's layout."""

    def __init__(self, output_dir, token: str, save_every: int, metadata: dict, reporter: Reporter, widths: tuple[int, ...] | None = None):
        from pathlib import Path

        self.output_dir = Path(output_dir)
        self.token = token
        self.save_every = save_every
        self.metadata = metadata
        self.reporter = reporter
        self.widths = widths
        self.outputs: dict[str, str] = {}

    def save(self, vectors: torch.Tensor, step: int) -> str | None:
        """Write the latest embedding (after `step` steps in all); returns its path."""
        from .embeddings import save_embedding

        if step <= 0:
            return None
        path = save_embedding(self.output_dir / EMBEDDING_FILE, self.token, vectors, {**self.metadata, "steps": step}, self.widths)
        self.outputs["embedding"] = str(path)
        return str(path)

    def checkpoint(self, vectors: torch.Tensor, step: int) -> None:
        """Called after every step: a numbered copy every `save_every` steps."""
        from .embeddings import save_embedding

        if self.save_every and step % self.save_every == 0:
            numbered = self.output_dir / f"learned_embeds-step{step:05d}.safetensors"
            save_embedding(numbered, self.token, vectors, {**self.metadata, "steps": step}, self.widths)
            self.save(vectors, step)
            self.reporter.log(f"saved {numbered.name}")
