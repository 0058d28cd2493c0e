"""The optimization loop every method shares: AdamW on the new vectors only, diffusers'
learning-rate schedules, gradient clipping and accumulation, progress events, stop within one
step, and a guard that keeps the last good vectors when the loss blows up."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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

    @classmethod
    def of(cls, settings, phase: str) -> LoopSettings:
        """The loop part of resolved TrainSettings (lr scaled when scale_lr asks)."""
        return cls(
            steps=settings.steps,
            lr=settings.effective_lr,
            weight_decay=settings.weight_decay,
            schedule=settings.lr_schedule,
            warmup_steps=settings.warmup_steps,
            grad_clip=settings.grad_clip,
            grad_accum=settings.grad_accum,
            phase=phase,
        )


@dataclass
class LoopResult:
    steps_done: int
    stopped_early: bool
    last_loss: float | None


def make_optimizer(vectors: torch.Tensor, settings: LoopSettings, state: dict | None = None, start_step: int = 0):
    """AdamW over the new vectors and its schedule (diffusers' get_scheduler), the schedule
    positioned after `start_step` steps when a run is resumed."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW([vectors], lr=settings.lr, weight_decay=settings.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state)
    for group in optimizer.param_groups:  # the new run's settings win over the saved ones
        group["lr"] = group["initial_lr"] = settings.lr
        group["weight_decay"] = settings.weight_decay
    scheduler = get_scheduler(
        settings.schedule,
        optimizer,
        num_warmup_steps=settings.warmup_steps,
        num_training_steps=settings.steps,
        last_epoch=start_step - 1,
    )
    return optimizer, scheduler


OPTIMIZER_SUFFIX = ".optimizer.safetensors"


def optimizer_state_path(embedding_path) -> Path:
    """Where the optimizer state of an embedding file lives: beside it, `name.optimizer.safetensors`."""
    path = Path(embedding_path)
    return path.with_name(path.name.removesuffix(".safetensors") + OPTIMIZER_SUFFIX)


def save_optimizer_state(path, optimizer: torch.optim.Optimizer, step: int) -> bool:
    """Save AdamW's moments for the one trainable tensor as safetensors (no pickle), recording
    `step` as its embedding does; False when there is nothing to save (no step taken)."""
    from .files import atomic_save_safetensors

    state = optimizer.state_dict()["state"].get(0)
    if not state:
        return False
    tensors = {name: value.reshape(-1) if name == "step" else value for name, value in state.items()}
    atomic_save_safetensors(tensors, path, {"optimizer": type(optimizer).__name__, "steps": str(step)})
    return True


def load_optimizer_state(path, vectors: torch.Tensor, steps: int) -> tuple[dict | None, str]:
    """The optimizer state saved beside an embedding of `steps` steps, as `make_optimizer` takes
    it, and "" ; or None and why not, when there is none or it is not this embedding's partner
    (saved at another step, say by a run killed between the two saves, or of another shape)."""
    from safetensors import safe_open

    if not path.is_file():
        return None, "no optimizer state was saved beside it"
    try:
        with safe_open(str(path), framework="pt", device=str(vectors.device)) as f:
            saved_at = (f.metadata() or {}).get("steps")
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open is no dict
    except Exception as error:  # noqa: BLE001 - a damaged state costs the moments, not the run
        return None, f"{path.name} cannot be read ({type(error).__name__})"
    if saved_at != str(steps):
        return None, _not_a_pair(path, saved_at, steps)
    if tensors.get("exp_avg") is None or tensors["exp_avg"].shape != vectors.shape or tensors.get("exp_avg_sq") is None:
        return None, f"{path.name} does not fit these vectors"
    fresh = torch.optim.AdamW([vectors]).state_dict()
    fresh["state"] = {0: {"step": tensors["step"].reshape(()), "exp_avg": tensors["exp_avg"], "exp_avg_sq": tensors["exp_avg_sq"]}}
    return fresh, ""


def _not_a_pair(path: Path, saved_at, steps: int) -> str:
    return f"{path.name} was saved at step {saved_at}, the embedding at step {steps}, so they are not a pair"


def optimize(
    vectors: torch.Tensor,
    compute_loss: Callable[[int], torch.Tensor],
    settings: LoopSettings,
    reporter: Reporter,
    on_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
    optimizer_state: dict | None = None,
    start_step: int = 0,
    *,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    optimizer: tuple | None = None,
    whole: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[LoopResult, torch.optim.Optimizer]:
    """Run optimizer steps `start_step + 1` to `settings.steps` on `vectors` (a float32 leaf tensor).

    `compute_loss(micro_step)` returns a scalar loss for one micro-batch; it is called
    `grad_accum` times per step. `on_step(step, optimizer)` runs after each step (checkpoints,
    previews). A resumed run passes the saved `optimizer_state` and the steps already done.
    A stop request ends the loop after the current step. On a NaN/inf loss (or any failure),
    `vectors` and the optimizer's moments are reset to those of the last good step and the error
    is raised. `optimizer`, an (optimizer, schedule) pair from `make_optimizer`, lets the caller
    hold the optimizer (to save it) even when the loop fails; `optimizer_state` is then unused.

    With `project` (hard prompts), each step evaluates the loss and its gradient at
    `project(vectors)` and applies that gradient to the unprojected vectors.

    `whole(vectors)` is the whole token when `vectors` holds only some text encoders' parts
    (what the reporter's vector watchers are shown).
    """
    from .distributed import (
        ProcessInfo,
        any_process,
        average_gradient,
        average_value,
        broadcast_from_main,
    )

    process = reporter.process or ProcessInfo(0, 1)
    broadcast_from_main(vectors, process)  # every process starts from the same vectors
    optimizer, scheduler = optimizer or make_optimizer(vectors, settings, optimizer_state, start_step)
    last_good = vectors.detach().clone()
    last_good_state = copy.deepcopy(optimizer.state_dict())  # small: the moments of [n, dim]
    last_loss = None
    step = start_step
    for step in range(start_step + 1, settings.steps + 1):
        if any_process(reporter.should_stop(), process):  # all processes stop at the same step
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
                        "(--lr) or train in full precision (--precision fp32)."
                    )
                (loss / settings.grad_accum).backward()
                total += value / settings.grad_accum
            if project is not None:  # step from where the vectors were, with the projected gradient
                with torch.no_grad():
                    vectors.copy_(last_good)
            average_gradient(vectors, process)
            total = average_value(total, process, vectors.device)
            if settings.grad_clip:
                torch.nn.utils.clip_grad_norm_([vectors], settings.grad_clip)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            if not bool(torch.isfinite(vectors).all()):
                raise TrainingDiverged(
                    f"the embedding became NaN or infinite at step {reporter.steps_done + 1}; lower the learning "
                    "rate (--lr)."
                )
        except BaseException:
            with torch.no_grad():
                vectors.copy_(last_good)
            optimizer.load_state_dict(last_good_state)
            raise
        with torch.no_grad():
            last_good.copy_(vectors)
        last_good_state = copy.deepcopy(optimizer.state_dict())
        last_loss = total
        reporter.step_finished(total, lr, settings.phase)
        reporter.vectors_updated(whole(vectors) if whole else vectors)
        if on_step is not None:
            on_step(step, optimizer)
    return LoopResult(step, False, last_loss), optimizer


EMBEDDING_FILE = "learned_embeds.safetensors"


EMA_SUFFIX = ".ema.safetensors"


def ema_path(embedding_path) -> Path:
    """Where the moving average of an embedding file's vectors lives: beside it, `name.ema.safetensors`."""
    path = Path(embedding_path)
    return path.with_name(path.name.removesuffix(".safetensors") + EMA_SUFFIX)


class EmbeddingWriter:
    """Writes a run's embedding into its output folder: `learned_embeds.safetensors` (always the
    latest) and, every `save_every` steps, a numbered copy. Nothing is written before the first
    step, so a run that fails at once never overwrites an earlier good file. With the family's
    embedding `keys` (SDXL: clip_l, clip_g), the vectors hold one part per text encoder of `widths`
    side by side, and are saved one key per part.

    With `ema_decay`, it also keeps an exponential moving average of the vectors (diffusers'
    EMAModel: the decay at the run's n-th step is min(ema_decay, n / (n + 9)), 0 at the first, so
    a short run's average is not stuck near its start) and saves it beside every embedding it
    writes (`learned_embeds.ema.safetensors`, with how many steps it averaged); `averaged` lends
    it to previews, and `continue_average` takes it up again when a run is resumed."""

    def __init__(
        self, output_dir, token: str, save_every: int, metadata: dict, reporter: Reporter,
        widths: tuple[int, ...] | None = None, keys: tuple[str, ...] = (), ema_decay: float = 0.0,
    ):
        self.output_dir = Path(output_dir)
        self.token = token
        self.save_every = save_every
        self.metadata = metadata
        self.reporter = reporter
        self.widths = widths
        self.keys = keys
        self.ema_decay = ema_decay
        self.ema = None  # the EMAModel, from the first step on
        self.outputs: dict[str, str] = {}
        self.checkpoints: list[tuple[int, str]] = []  # (step, path) of each numbered copy
        self.on_saved: Callable[[str, int], None] | None = None  # called with each numbered copy's path and step
        if self._writes:  # what a run killed mid-save left behind
            for leftover in self.output_dir.glob(".learned_embeds*.tmp"):
                leftover.unlink(missing_ok=True)

    def save(self, vectors: torch.Tensor, step: int, optimizer: torch.optim.Optimizer | None = None) -> str | None:
        """Write the latest embedding (after `step` steps in all), and the optimizer state beside
        it when given, so `--resume` can continue; returns the embedding's path.
        Under `accelerate launch` only the main process writes."""
        if step <= 0 or not self._writes:
            return None
        path = self._write(self.output_dir / EMBEDDING_FILE, vectors, step, optimizer)
        self.outputs["embedding"] = str(path)
        if self.ema is not None:
            self.outputs["ema"] = str(ema_path(path))
        return str(path)

    def checkpoint(self, vectors: torch.Tensor, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Called after every step: the moving average follows the vectors; a numbered copy every
        `save_every` steps."""
        if self.ema_decay:
            from diffusers.training_utils import EMAModel

            # EMAModel averages only tensors that require grad (it copies the others), and the whole
            # token handed here may be a detached join of its parts: averaged as a trainable view.
            trainable = vectors.detach().requires_grad_(True)
            self.ema = self.ema or EMAModel([trainable], decay=self.ema_decay)
            self.ema.step([trainable])
        if self._writes and self.save_every and step % self.save_every == 0:
            numbered = self._write(self.output_dir / f"learned_embeds-step{step:05d}.safetensors", vectors, step, optimizer)
            self.save(vectors, step, optimizer)
            self.reporter.log(f"saved {numbered.name}")
            self.checkpoints.append((step, str(numbered)))
            if self.on_saved is not None:
                self.on_saved(str(numbered), step)

    def continue_average(self, embedding_path, vectors: torch.Tensor, steps: int) -> str:
        """Take up the moving average saved beside the embedding `embedding_path` (of `steps`
        steps), so that a resumed run goes on averaging where the earlier one stopped; returns ""
        or why the average starts afresh. `vectors` (the run's, on its device) give the shape."""
        from diffusers.training_utils import EMAModel

        from .formats import read_embedding

        if not self.ema_decay:
            return ""
        path = ema_path(embedding_path)
        if not path.is_file():
            return "no moving average was saved beside it"
        try:
            saved = read_embedding(path)
            average = saved.joined()
        except (OSError, ValueError) as error:  # a damaged average costs the average, not the run
            return f"{path.name} cannot be read ({type(error).__name__})"
        if saved.metadata.get("steps") != str(steps):
            return _not_a_pair(path, saved.metadata.get("steps"), steps)
        if "ema_steps" not in saved.metadata or average.shape != vectors.shape:
            return f"{path.name} does not fit these vectors"
        self.ema = EMAModel([average.to(vectors.device, torch.float32).requires_grad_(True)], decay=self.ema_decay)
        self.ema.optimization_step = int(saved.metadata["ema_steps"])  # its decay warms up from there, not from 0
        return ""

    @contextlib.contextmanager
    def averaged(self, vectors: torch.Tensor):
        """Within the block `vectors` hold their moving average (when there is one), e.g. to draw
        a preview with it; their own values are back afterwards."""
        if self.ema is None:
            yield
            return
        own = vectors.detach().clone()
        with torch.no_grad():
            vectors.copy_(self.ema.shadow_params[0])
        try:
            yield
        finally:
            with torch.no_grad():
                vectors.copy_(own)

    @property
    def _writes(self) -> bool:
        return self.reporter.process is None or self.reporter.process.is_main

    def _write(self, path, vectors: torch.Tensor, step: int, optimizer: torch.optim.Optimizer | None):
        from .embeddings import save_embedding

        # A pair, each recording its step: a run killed between the two saves leaves files of
        # different steps, which --resume tells apart (load_optimizer_state).
        state_path = optimizer_state_path(path)
        if optimizer is None or not save_optimizer_state(state_path, optimizer, step):
            state_path.unlink(missing_ok=True)  # a state from an earlier save is not these vectors'
        metadata = {**self.metadata, "steps": step}
        if self.ema is not None:
            average = self.ema.shadow_params[0]
            # ema_steps: how many steps it averaged (its decay depends on it), for --resume to go on from.
            ema_metadata = {**metadata, "ema_decay": self.ema_decay, "ema_steps": self.ema.optimization_step}
            save_embedding(ema_path(path), self.token, average, ema_metadata, self.widths, self.keys)
        return save_embedding(path, self.token, vectors, metadata, self.widths, self.keys)
