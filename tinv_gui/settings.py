"""Training settings: one dataclass for every method, each method's published defaults, and the
checks that turn bad values into a message naming the setting."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

METHODS = ("quick", "textual-inversion", "quick-then-ti", "caption-init")
DIFFUSION_METHODS = ("textual-inversion", "quick-then-ti", "caption-init")  # they load the whole pipeline

# Published defaults per method; a None field in TrainSettings takes these.
METHOD_DEFAULTS: dict[str, dict] = {
    # QuickEmbedding as Ethan Smith published it: AdamW lr 0.1, weight decay 0.01, linear decay,
    # gradient clip 1.0, batch 32, 100 steps.
    "quick": dict(steps=100, batch_size=32, lr=0.1, weight_decay=0.01, lr_schedule="linear", grad_clip=1.0, grad_accum=1, scale_lr=False),
    # Textual inversion as diffusers documents its example script (examples/textual_inversion):
    # batch 1 with 4 accumulated, lr 5e-4 scaled by the batch (so 2e-3), constant, 3000 steps,
    # AdamW weight decay 1e-2 (the script's default). About half an hour on a recent GPU.
    "textual-inversion": dict(
        steps=3000, batch_size=1, grad_accum=4, lr=5e-4, scale_lr=True, weight_decay=1e-2, lr_schedule="constant"
    ),
    # The published QuickEmbedding recipe: 100 CLIP steps (QuickEmbedding's own defaults above),
    # then 50 diffusion steps at batch 4, lr 1.5e-3.
    "quick-then-ti": dict(
        quick_steps=100, steps=50, batch_size=4, grad_accum=1, lr=1.5e-3, scale_lr=False, weight_decay=0.0, lr_schedule="constant"
    ),
    # Caption-initialized inversion: every caption word starts where it means something already, so
    # ~100 diffusion steps at the diffusion phase settings of the recipe above suffice.
    "caption-init": dict(
        steps=100, batch_size=4, grad_accum=1, lr=1.5e-3, scale_lr=False, weight_decay=0.0, lr_schedule="constant"
    ),
}
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
STYLES = ("object", "style")


class SettingsError(ValueError):
    """A setting is out of range; `field` names it."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


@dataclass
class TrainSettings:
    """Everything a training job needs. None means "the method's default"."""

    images: object = None  # a folder, a file, or a list of files
    token: str = ""
    output_dir: str = "output"
    method: str = "quick"
    model: str = "demo"
    clip_model: str | None = None
    clip_model_g: str | None = None  # SDXL: the CLIP of its second text encoder (default OpenCLIP bigG)
    init: str | None = None  # a word or phrase; None starts from random vectors
    vectors: int = 1
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    lr_schedule: str | None = None
    warmup_steps: int = 0
    grad_clip: float | None = None
    grad_accum: int | None = None
    scale_lr: bool | None = None  # multiply lr by batch size x accumulation, as diffusers' --scale_lr
    seed: int = 0
    style: str = "object"  # which prompt templates: "object" or "style"
    use_captions: bool = False  # train on the pictures' captions instead of templates
    crops: int = 6  # QuickEmbedding: views per picture averaged into its CLIP embedding
    save_every: int = 0  # 0: only at the end
    # Diffusion methods:
    resolution: int | None = None  # None: the model's native size (512 for SD 1.x, 768 for SD 2.x 768)
    flip: bool = True  # also train on the mirrored pictures
    gradient_checkpointing: bool = False  # recompute UNet activations in backward: less memory, slower
    resume: str | None = None  # an embedding saved by an earlier run (its optimizer state beside it)
    preview_every: int = 0  # 0: no previews; else a preview picture every N steps
    preview_prompt: str | None = None  # "{}" stands for the token; default "a photo of {}"
    preview_steps: int = 20  # denoising steps of a preview
    quick_steps: int | None = None  # quick-then-ti: QuickEmbedding steps before the diffusion steps
    caption: str | None = None  # caption-init: the caption; None asks the captioning model
    caption_model: str | None = None  # caption-init: None picks BLIP (or the demo captioner for demo models)
    device: str = "auto"
    precision: str = "auto"
    extra: dict = field(default_factory=dict)

    def resolved(self) -> "TrainSettings":
        """A copy with the method's defaults filled in, checked; raises SettingsError."""
        if self.method not in METHOD_DEFAULTS:
            raise SettingsError("method", f"{self.method!r} is not one of {', '.join(METHOD_DEFAULTS)}")
        values = {k: v for k, v in METHOD_DEFAULTS[self.method].items() if getattr(self, k) is None}
        out = dataclasses.replace(self, **values)
        out.check()
        return out

    @property
    def total_steps(self) -> int:
        """Steps over all phases (quick-then-ti: the CLIP steps, then the diffusion steps)."""
        clip_steps = self.quick_steps or 0 if self.method == "quick-then-ti" else 0
        return int(self.steps or 0) + int(clip_steps)

    @property
    def effective_lr(self) -> float:
        """The learning rate the optimizer gets: scaled by the samples per step when scale_lr."""
        return self.lr * self.batch_size * self.grad_accum if self.scale_lr else self.lr

    def check(self) -> None:
        positive_ints = ("steps", "batch_size", "vectors", "grad_accum", "crops", "preview_steps", "quick_steps")
        for name in positive_ints:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise SettingsError(name, f"must be a whole number of at least 1, not {value!r}")
        if self.vectors > 75:
            raise SettingsError("vectors", "at most 75 vectors fit in a 77-token prompt")
        if self.lr is not None and not (0 < self.lr < 10):
            raise SettingsError("lr", f"the learning rate must be above 0 and below 10, not {self.lr!r}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise SettingsError("weight_decay", "must not be negative")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise SettingsError("grad_clip", "must not be negative")
        for name in ("warmup_steps", "save_every", "preview_every"):
            if getattr(self, name) < 0:
                raise SettingsError(name, "must not be negative")
        if self.resolution is not None and (self.resolution < 64 or self.resolution % 8):
            raise SettingsError("resolution", f"must be a multiple of 8 and at least 64, not {self.resolution!r}")
        if self.resume is not None and not Path(self.resume).is_file():
            raise SettingsError("resume", f"{self.resume} is not a file; give an embedding saved by an earlier run")
        if self.resume is not None and self.method == "quick":
            raise SettingsError(
                "resume", "QuickEmbedding runs start afresh (they take about a minute); resuming continues textual-inversion, "
                "quick-then-ti and caption-init runs"
            )
        if self.caption is not None and not self.caption.strip():
            raise SettingsError("caption", "the caption is empty; describe the picture in a few words, or leave it out")
        if self.lr_schedule is not None and self.lr_schedule not in SCHEDULES:
            raise SettingsError("lr_schedule", f"{self.lr_schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.style not in STYLES:
            raise SettingsError("style", f"{self.style!r} is not one of {', '.join(STYLES)}")
        if not str(self.output_dir).strip():
            raise SettingsError("output_dir", "name a folder for the results")


# Prompt optimization defaults, continuous and hard. Continuous: the whole prompt moves at once
# and settles within a few dozen steps. Hard: AdamW lr 0.1 and weight decay 0.1 as in "Hard
# Prompts Made Easy"; far fewer steps than its 3000, since the best prompt seen is kept and CPU
# steps are slow.
PROMPT_DEFAULTS = {
    "continuous": dict(steps=40, lr=0.01, weight_decay=0.0),
    "hard": dict(steps=300, lr=0.1, weight_decay=0.1),
}
DEFAULT_PROMPT_LENGTH = 16
MAX_PROMPT_LENGTH = 75  # 77 positions less the start and end markers


@dataclass
class PromptSettings:
    """Everything a prompt-from-image job needs. None means "the mode's default"."""

    images: object = None  # a folder, a file, or a list of files
    image_weights: list[float] | None = None  # one per picture; None weighs them equally
    output_dir: str = "output"
    model: str = "demo"
    clip_model: str | None = None
    clip_model_g: str | None = None  # SDXL, continuous: the CLIP of its second text encoder (default OpenCLIP bigG)
    prompt: str = ""  # where to start; empty starts from padding (continuous) or random words (hard)
    anchor: str | None = None  # a prompt whose meaning the result should stay near
    anchor_weight: float = 0.5
    negative: str | None = None  # optimized to move away from the pictures
    length: int | None = None  # tokens in the prompt; None: 16, or the prompt's own length if longer
    hard: bool = False  # readable vocabulary tokens instead of free vectors
    steps: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    crops: int = 1  # views per picture averaged into its CLIP embedding
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"

    @property
    def mode(self) -> str:
        return "hard" if self.hard else "continuous"

    @property
    def total_steps(self) -> int:
        return int(self.steps or 0)

    def resolved(self) -> "PromptSettings":
        """A copy with the mode's defaults filled in, checked; raises SettingsError."""
        values = {k: v for k, v in PROMPT_DEFAULTS[self.mode].items() if getattr(self, k) is None}
        out = dataclasses.replace(self, **values)
        out.check()
        return out

    def check(self) -> None:
        for name in ("steps", "crops", "length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise SettingsError(name, f"must be a whole number of at least 1, not {value!r}")
        if self.length is not None and self.length > MAX_PROMPT_LENGTH:
            raise SettingsError("length", f"at most {MAX_PROMPT_LENGTH} tokens fit in a 77-token prompt")
        if self.lr is not None and not (0 < self.lr < 10):
            raise SettingsError("lr", f"the learning rate must be above 0 and below 10, not {self.lr!r}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise SettingsError("weight_decay", "must not be negative")
        if not (0 <= self.anchor_weight <= 100):
            raise SettingsError("anchor_weight", f"must be between 0 and 100, not {self.anchor_weight!r}")
        if self.anchor is not None and not self.anchor.strip():
            raise SettingsError("anchor", "is empty; type a prompt to stay near, or leave it out")
        if self.negative is not None and not self.negative.strip():
            raise SettingsError("negative", "is empty; type a prompt to move away from, or leave it out")
        if self.image_weights is not None:
            if any(not (w >= 0) for w in self.image_weights) or not sum(self.image_weights) > 0:
                raise SettingsError("image_weights", "weights must not be negative, and at least one must be above 0")
        if not self.images:
            raise SettingsError("images", "give at least one picture to describe")
        if not str(self.output_dir).strip():
            raise SettingsError("output_dir", "name a folder for the results")
