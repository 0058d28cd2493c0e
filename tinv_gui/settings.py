"""Training settings: one dataclass for every method, each method's published defaults, and the
checks that turn bad values into a message naming the setting."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

METHODS = ("quick",)

# Published defaults per method; a None field in TrainSettings takes these.
METHOD_DEFAULTS: dict[str, dict] = {
    # QuickEmbedding as Ethan Smith published it: AdamW lr 0.1, weight decay 0.01, linear decay,
    # gradient clip 1.0, batch 32, 100 steps.
    "quick": dict(steps=100, batch_size=32, lr=0.1, weight_decay=0.01, lr_schedule="linear", grad_clip=1.0),
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
    init: str | None = None  # a word or phrase; None starts from random vectors
    vectors: int = 1
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    lr_schedule: str | None = None
    warmup_steps: int = 0
    grad_clip: float | None = None
    grad_accum: int = 1
    seed: int = 0
    style: str = "object"  # which prompt templates: "object" or "style"
    use_captions: bool = False  # train on the pictures' captions instead of templates
    crops: int = 6  # QuickEmbedding: views per picture averaged into its CLIP embedding
    save_every: int = 0  # 0: only at the end
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
        return int(self.steps or 0)

    def check(self) -> None:
        positive_ints = ("steps", "batch_size", "vectors", "grad_accum", "crops")
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
        if self.warmup_steps < 0 or self.save_every < 0:
            raise SettingsError("warmup_steps" if self.warmup_steps < 0 else "save_every", "must not be negative")
        if self.lr_schedule is not None and self.lr_schedule not in SCHEDULES:
            raise SettingsError("lr_schedule", f"{self.lr_schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.style not in STYLES:
            raise SettingsError("style", f"{self.style!r} is not one of {', '.join(STYLES)}")
        if not str(self.output_dir).strip():
            raise SettingsError("output_dir", "name a folder for the results")
