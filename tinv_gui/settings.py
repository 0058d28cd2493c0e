"""The settings of every job, each field described once (tinv_gui.schema): its type, default,
range or choices, label, help and the methods that use it. The command line's flags, the
app's option controls and the checks are all made from these descriptions.

Why dataclasses with field metadata rather than pydantic models: the settings are plain values
that methods copy with `dataclasses.replace` (a phase of a two-phase run) and check once, when a
job is submitted, raising the project's own SettingsError with the field's name; the engine and
the command line then need nothing beyond the standard library, and `--help` stays fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from .data import MAX_REPEATS
from .methods import DIFFUSION_METHODS, METHOD_NAMES, METHODS, method_named
from .schema import SettingsError, check_fields, setting

__all__ = ["SettingsError", "TrainSettings", "PromptSettings", "EvalSettings", "GenerateSettings", "METHOD_DEFAULTS"]

MethodName = Literal[METHOD_NAMES]
Schedule = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
Style = Literal["object", "style"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]  # device.PRECISIONS
TrainEncoders = Literal["all", "clip", "t5"]  # Family.trained_encoders
Tracker = Literal["tensorboard", "wandb", "both", "none"]  # tracking.TRACKERS
ScoreWhen = Literal["off", "after", "during", "during-2", "during-5", "during-10"]  # checkpoint_scores.scored_saves
SCHEDULES = get_args(Schedule)
STYLES = get_args(Style)
METHOD_DEFAULTS: dict[str, dict] = {name: m.defaults for name, m in METHODS.items()}  # published defaults per method
CLIP_METHODS = tuple(name for name, m in METHODS.items() if "clip" in m.loads)
MAX_STEPS = 1_000_000
MAX_SEED = 2**32 - 1  # what every Stable Diffusion tool takes, and exact in a browser's numbers
MAX_PROMPT_LENGTH = 75  # tokens: 77 positions less the start and end markers
DEFAULT_PROMPT_LENGTH = 16
SEARCH_MODES = ("continuous", "hard")

# Settings several classes share.
MODEL_HELP = "Hub id, diffusers folder, .safetensors/.ckpt file, or an offline demo model: 'demo', 'demo-sdxl', 'demo-sd3', 'demo-flux'"
# The numbers are the families' pipelines' own defaults (Family.default_guidance; a test keeps them so).
GUIDANCE_HELP = "how closely to follow the prompt (default: the model's own: SD 1.x/2.x 7.5, SDXL 5, SD 3.x 7, Flux.1 3.5)"


def _model(**extra):
    return setting("demo", label="Model", help=MODEL_HELP, form=False, **extra)


def _seed():
    return setting(0, label="Seed", help="Makes a run repeatable: the same seed and settings give the same result.", ge=0, le=MAX_SEED)


def _device():
    return setting(
        "auto", label="Device", help="auto picks the GPU when there is one. Or cpu, cuda, cuda:1, mps.", max_length=32,
        suggestions=("auto", "cpu", "cuda", "mps"),
    )


def _precision():
    return setting("auto", label="Precision", help="auto picks the fastest safe choice for the device.")


def _fp8_weights(**extra):
    return setting(
        False, label="8-bit weights",
        help="Stores the denoiser's (UNet's or transformer's) and T5's linear weights in 8-bit floats: half their bf16 bytes, so SD 3.5 "
        "Large and Flux.1-dev fit a 24 GB GPU. Costs one rounding of those frozen weights (scaled per row); the learned word is "
        "used later with the full-precision model. Not on Apple's MPS.",
        **extra,
    )


def _output_dir(what: str):
    return setting("output", label="Output folder", help=f"folder for {what}", flag="--output", required=True, path="folder",
                   if_blank="name a folder for the results", form=False)


def _log_jsonl():
    return setting(None, label="Step log", help="write one JSON object per step to this file", path="output_file", form=False)


def _clip_model(help_text: str, **extra):
    return setting(None, label="CLIP model", help=help_text, **extra)


def _clip_model_g(help_text: str, **extra):
    return setting(None, label="Second CLIP model (SDXL)", help=help_text, **extra)


@dataclass
class TrainSettings:
    """Everything a training job needs. None means "the method's default" (METHOD_DEFAULTS)."""

    images: object = setting(None, label="Pictures", help="a folder of pictures, or picture files", repeat="nargs", required=True, form=False)
    token: str = setting("", label="New word (token)", help="the new word, e.g. <my-cat>", required=True, max_length=64, form=False)
    output_dir: str = _output_dir("learned_embeds.safetensors")
    method: MethodName = setting(
        "quick", label="Method", form=False,
        help="quick (QuickEmbedding, CLIP only), textual-inversion (through the UNet), quick-then-ti (QuickEmbedding, then "
        "textual inversion), caption-init (one vector per caption word, then textual inversion)",
    )
    model: str = _model()
    init: str | None = setting(None, label="Starting word", help="a word or phrase to start from (default: random)", form=False)
    log_jsonl: str | None = _log_jsonl()
    # The app's options, in the order it shows them.
    steps: int | None = setting(None, label="Steps", help="How many optimization steps. More steps fit the pictures more closely.", ge=1, le=MAX_STEPS)
    batch_size: int | None = setting(
        None, label="Batch size", help="Prompts (or pictures) per step. Larger is steadier but slower and uses more memory.", ge=1, le=1024
    )
    lr: float | None = setting(
        None, label="Learning rate", help="Size of each update. Too high and the loss jumps around or fails; too low and nothing changes.",
        gt=0, lt=10,
    )
    weight_decay: float | None = setting(
        None, label="Weight decay", help="Pulls the vectors gently towards zero, which keeps them from growing wild.", ge=0, le=10
    )
    lr_schedule: Schedule | None = setting(None, label="Learning-rate schedule", help="How the learning rate changes over the run.")
    warmup_steps: int = setting(0, label="Warm-up steps", help="Steps at the start during which the learning rate climbs from zero.", ge=0, le=MAX_STEPS)
    grad_clip: float | None = setting(None, label="Gradient clipping", help="Caps the size of each update; 0 turns it off.", ge=0, le=1e6)
    grad_accum: int | None = setting(
        None, label="Gradient accumulation", help="Adds up this many batches before each update: a bigger batch without more memory.", ge=1, le=1024
    )
    vectors: int = setting(
        1, label="Vectors per token", help="How many word-slots the new word uses (at most 75 fit in a prompt). 1 is usual; 2 to 4 can hold more detail.",
        ge=1, le=MAX_PROMPT_LENGTH,
    )
    seed: int = _seed()
    style: Style = setting("object", label="Object or style", help="Object: a thing (my cat). Style: a look (my watercolors). Chooses the training prompts.")
    use_captions: bool = setting(False, label="Train on captions", help="Use each picture's caption (photo.txt beside photo.jpg) instead of generic prompts.", flag="--captions")
    crops: int = setting(6, label="Views per picture", help="Crops of each picture averaged into its CLIP embedding.", ge=1, le=64, methods=CLIP_METHODS)
    save_every: int = setting(
        0, label="Save every N steps", help="Also keep a numbered copy every N steps, to pick an earlier one. 0: only the final file.", ge=0, le=MAX_STEPS
    )
    clip_model: str | None = _clip_model("For CLIP-space methods. Empty: the CLIP the chosen model was trained with.", methods=CLIP_METHODS)
    resolution: int | None = setting(
        None, label="Resolution", help="The size pictures are trained at (a multiple of 8); by default the model's own (512 for SD 1.x).",
        ge=64, le=2048, multiple_of=8, methods=DIFFUSION_METHODS,
    )
    flip: bool = setting(
        True, label="Mirror pictures", help="Also train on left-right mirrored pictures. Turn off for text or asymmetric things.", methods=DIFFUSION_METHODS
    )
    train_encoders: TrainEncoders = setting(
        "all", label="Text encoders that learn",
        help="SD 3.x and Flux.1: which text encoders' vectors of the word train. clip: T5's stay at the starting word and T5 runs once "
        "(about 9 GiB less GPU memory, T5 can leave the GPU; the time per step barely changes at 1024 px); t5: the CLIP parts stay. "
        "Other models: all.",
        methods=DIFFUSION_METHODS,
    )
    aspect_buckets: bool = setting(
        True, label="Aspect-ratio buckets", flag="--buckets", methods=DIFFUSION_METHODS,
        help="Train each picture at its own shape: scaled to fill the nearest of buckets of about resolution² pixels "
        "(sides on a 64 px grid; below 512 px, an eighth of the resolution rounded down to 8 px, or to 16 px for SD 3.x and Flux.1) "
        "and center-cropped by the rest. Off: every picture is cropped to its centered square.",
    )
    repeats: int = setting(
        1, label="Repeats", ge=1, le=MAX_REPEATS, methods=DIFFUSION_METHODS,
        help="How many times each picture of the folder counts per epoch. Subfolders named N_name (10_closeups) "
        "are concepts whose pictures count N times each, to weigh a small set against a larger one.",
    )
    gradient_checkpointing: bool = setting(False, label="Gradient checkpointing", help="Uses much less memory, about a third slower.", methods=DIFFUSION_METHODS)
    unmasked_weight: float = setting(
        0.0, label="Weight outside the mask",
        help="How much the parts of a picture outside its mask still count (a mask: the picture's transparency, or photo.mask.png "
        "beside photo.png; white is the subject). 0: only the subject; 1: masks are ignored. QuickEmbedding blanks the rest to white as much.",
        ge=0, le=1,
    )
    noise_offset: float = setting(
        0.0, label="Noise offset", methods=DIFFUSION_METHODS, ge=0, le=1,
        help="Adds a random brightness shift to the training noise (kohya's --noise_offset), so very dark or bright looks can be learned. "
        "0.05 to 0.1 is usual; 0 turns it off.",
    )
    min_snr_gamma: float = setting(
        0.0, label="Min-SNR gamma", methods=DIFFUSION_METHODS, ge=0, le=1000,
        help="Min-SNR loss weighting: the many easy, nearly noise-free steps count less (kohya's --min_snr_gamma; 5 is usual). "
        "0 turns it off. For noise- and v-predicting models (SD 1.x, 2.x, SDXL); SD 3 and Flux train by flow matching, where it does not apply.",
    )
    ema_decay: float = setting(
        0.0, label="EMA decay", ge=0, lt=1,
        help="Also keep an exponential moving average of the vectors (OneTrainer's EMA; 0.99 to 0.999 is usual), saved beside them "
        "as learned_embeds.ema.safetensors and used for the previews. 0 turns it off.",
    )
    quick_steps: int | None = setting(
        None, label="QuickEmbedding steps first", help="CLIP-space steps before the diffusion steps.", ge=1, le=MAX_STEPS,
        methods=("quick-then-ti",),
    )
    preview_every: int = setting(
        0, label="Preview every N steps", help="Draw a picture with the word every N steps to watch it form. 0: no previews.", ge=0, le=MAX_STEPS,
        methods=DIFFUSION_METHODS,
    )
    preview_prompts: list[str] = setting(
        label="Preview prompts", flag="--preview-prompt", repeat="append", default_factory=list, methods=DIFFUSION_METHODS,
        help="What the previews draw, one prompt per line (on the command line, repeat the flag); {} stands for your word. "
        "Each is drawn with a fixed seed, one row per preview. They are also the prompts checkpoints are scored with. "
        "Empty: 'a photo of {}' (object) or 'a painting in the style of {}' (style).",
    )
    preview_steps: int = setting(20, label="Preview quality", help="Denoising steps of each preview picture.", ge=1, le=1000, methods=DIFFUSION_METHODS)
    score_checkpoints: ScoreWhen = setting(
        "off", label="Score checkpoints",
        help="Rate the saved checkpoints (Save every N steps, and the final one) by likeness to your pictures and editability, "
        "from pictures drawn with the preview prompts, and recommend one. after: all of them once training ends; during: "
        "each as it is saved; during-N: every Nth save (the final one is rated at the end).",
    )
    scale_lr: bool | None = setting(
        None, label="Scale learning rate", help="Multiply the learning rate by batch size x accumulation, as diffusers' --scale_lr."
    )
    resume: str | None = setting(
        None, label="Resume from", path="file", methods=tuple(n for n, m in METHODS.items() if m.resumable),
        help="An embedding an earlier run saved (its optimizer state beside it), to continue its run. Empty: start fresh.",
    )
    caption: str | None = setting(
        None, label="Caption", help="The sentence to start from. Empty: the captioning model writes it.", methods=("caption-init",),
        if_blank="the caption is empty; describe the picture in a few words, or leave it out",
    )
    caption_model: str | None = setting(
        None, label="Captioning model", help="The model that writes the caption. Empty: BLIP (Salesforce/blip-image-captioning-base).",
        methods=("caption-init",),
    )
    clip_model_g: str | None = _clip_model_g(
        "SDXL's second text encoder's CLIP, for CLIP-space methods. Empty: OpenCLIP ViT-bigG/14.", methods=CLIP_METHODS
    )
    log_with: Tracker = setting(
        "tensorboard", label="Log to",
        help="Where the run's loss, learning rate, vector norms, previews and checkpoint scores are logged besides the app: TensorBoard "
        "files in the output folder's logs/ (tensorboard --logdir OUTPUT/logs), Weights & Biases (when installed and logged in), both, or none.",
    )
    device: str = _device()
    precision: Precision = _precision()
    fp8_weights: bool = _fp8_weights(methods=DIFFUSION_METHODS)
    extra: dict = dataclasses.field(default_factory=dict)

    def resolved(self) -> TrainSettings:
        """A copy with the method's defaults filled in, checked; raises SettingsError."""
        method = method_named(self.method)
        values = {k: v for k, v in method.defaults.items() if getattr(self, k) is None}
        out = dataclasses.replace(self, **values)
        out.check()
        return out

    @property
    def total_steps(self) -> int:
        """Steps over all phases (quick-then-ti: the CLIP steps, then the diffusion steps)."""
        return sum(int(getattr(self, name) or 0) for name in method_named(self.method).step_settings)

    @property
    def effective_lr(self) -> float:
        """The learning rate the optimizer gets: scaled by the samples per step when scale_lr."""
        return self.lr * self.batch_size * self.grad_accum if self.scale_lr else self.lr

    def check(self) -> None:
        from .embeddings import mentions

        check_fields(self)
        # A preview without the word shows nothing of training, and scores nothing of the checkpoint.
        wordless = [p for p in self.preview_prompts if p.strip() and "{}" not in p and not mentions(p, (self.token or "").strip())]
        if wordless:
            raise SettingsError("preview_prompts", f"{wordless[0]!r} does not use the word: put {{}} where it goes, e.g. 'a photo of {{}} on a beach'")
        if self.resume is not None and not method_named(self.method).resumable:
            raise SettingsError(
                "resume", "QuickEmbedding runs start afresh (they take about a minute); resuming continues textual-inversion, "
                "quick-then-ti and caption-init runs"
            )


# Prompt optimization defaults, continuous and hard. Continuous: the whole prompt moves at once
# and settles within a few dozen steps. Hard: AdamW lr 0.1 and weight decay 0.1 as in "Hard
# Prompts Made Easy"; far fewer steps than its 3000, since the best prompt seen is kept and CPU
# steps are slow.
PROMPT_DEFAULTS = {
    "continuous": dict(steps=40, lr=0.01, weight_decay=0.0),
    "hard": dict(steps=300, lr=0.1, weight_decay=0.1),
}


@dataclass
class PromptSettings:
    """Everything a prompt-from-image job needs. None means "the mode's default" (PROMPT_DEFAULTS)."""

    images: object = setting(None, label="Pictures", help="a picture to describe; repeat for several", flag="--image", repeat="append", required=True)
    image_weights: list[float] | None = setting(None, label="Picture weights", help="weight of each --image, in order (default: equal)",
                                                flag="--image-weight", repeat="append", ge=0, le=1e6)
    output_dir: str = _output_dir("prompt_embeds.safetensors (SD 3.x, Flux.1: and t5_prompt.txt) or prompt.txt, and result.json")
    model: str = _model()
    clip_model: str | None = _clip_model("CLIP model (default: the one matching --model)")
    clip_model_g: str | None = _clip_model_g("SDXL, continuous: CLIP model of its second text encoder (default: OpenCLIP ViT-bigG/14)")
    prompt: str = setting("", label="Starting prompt", help="where to start; empty starts from padding (continuous) or random words (hard)")
    anchor: str | None = setting(None, label="Anchor", help="a prompt whose meaning the result should stay near",
                                 if_blank="is empty; type a prompt to stay near, or leave it out")
    anchor_weight: float = setting(0.5, label="Anchor weight", help="how strongly the result stays near the anchor", ge=0, le=100)
    negative: str | None = setting(None, label="Negative prompt", help="a negative prompt, optimized to move away from the pictures",
                                   if_blank="is empty; type a prompt to move away from, or leave it out")
    length: int | None = setting(None, label="Length", help=f"tokens in the prompt (default {DEFAULT_PROMPT_LENGTH}, or the prompt's own length if longer)",
                                 ge=1, le=MAX_PROMPT_LENGTH)
    hard: bool = setting(False, label="Readable words", help="readable words (Hard Prompts Made Easy) instead of free vectors")
    steps: int | None = setting(None, label="Steps", help="optimization steps (default 40, or 300 with --hard)", ge=1, le=MAX_STEPS)
    lr: float | None = setting(None, label="Learning rate", help="default 0.01, or 0.1 with --hard", gt=0, lt=10)
    weight_decay: float | None = setting(None, label="Weight decay", help="default 0, or 0.1 with --hard", ge=0, le=10)
    crops: int = setting(1, label="Views per picture", help="crops of each picture averaged into its CLIP embedding", ge=1, le=64)
    seed: int = _seed()
    device: str = _device()
    precision: Precision = _precision()
    fp8_weights: bool = _fp8_weights()
    log_jsonl: str | None = _log_jsonl()

    @property
    def mode(self) -> str:
        return "hard" if self.hard else "continuous"

    @property
    def total_steps(self) -> int:
        return int(self.steps or 0)

    def resolved(self) -> PromptSettings:
        """A copy with the mode's defaults filled in, checked; raises SettingsError."""
        values = {k: v for k, v in PROMPT_DEFAULTS[self.mode].items() if getattr(self, k) is None}
        out = dataclasses.replace(self, **values)
        out.check()
        return out

    def check(self) -> None:
        check_fields(self)
        if self.image_weights is not None and not sum(self.image_weights) > 0:
            raise SettingsError("image_weights", "weights must not be negative, and at least one must be above 0")
        if not self.images:
            raise SettingsError("images", "give at least one picture to describe")


@dataclass
class EvalSettings:
    """What to evaluate and how (tinv_gui.evaluate). `init` is the baseline word (default: the
    initializer the embedding file records; with none, the prompt without the token)."""

    model: str = _model()
    embedding: str = setting("", label="Embedding", help="the embedding file (any layout)", required=True, path="file",
                             if_blank="name the embedding file to evaluate")
    images: object = setting(None, label="Pictures", help="the training pictures: a folder or picture files", repeat="nargs", required=True)
    prompt: str = setting("", label="Prompt", help="a prompt using the token, e.g. 'a photo of <my-cat> on a beach'", required=True,
                          if_blank="type a prompt that uses the token, e.g. 'a photo of <my-cat> on a beach'")
    n: int = setting(8, label="Pictures", help="pictures to generate for the token, and as many for the baseline", ge=1, le=1000)
    seed: int = setting(0, label="Seed", help="picture i uses seed + i, for the token and the baseline alike", ge=0, le=MAX_SEED - 1000)
    steps: int = setting(30, label="Steps", help="denoising steps per picture", ge=1, le=1000)
    guidance: float | None = setting(None, label="Guidance", help=GUIDANCE_HELP, ge=0, le=100)
    size: str | None = setting(None, label="Size", help="WIDTHxHEIGHT of the pictures drawn, e.g. 512x512 (default: the model's own size)", max_length=32)
    init: str | None = setting(None, label="Baseline word", help="baseline word (default: the initializer the file records)")
    clip_model: str | None = _clip_model("CLIP model to score with (default: the one matching --model)")
    device: str = _device()
    precision: Precision = _precision()
    fp8_weights: bool = _fp8_weights()
    save_images: str | None = setting(None, label="Keep pictures in", help="keep the generated pictures in this folder", path="folder")
    json_path: str | None = setting(None, label="JSON file", help="write the figures to this JSON file", flag="--json", path="output_file")

    @property
    def total_steps(self) -> int:
        return 2 * self.n

    def check(self) -> None:
        check_fields(self)
        if self.images is None:
            raise SettingsError("images", "give the training pictures to compare with")
        self.dimensions  # noqa: B018 - checks the size

    @property
    def dimensions(self) -> tuple[int, int] | None:
        """(width, height) of `size`, or None for the model's own."""
        return parse_size(self.size) if self.size else None


def parse_size(text: str) -> tuple[int, int]:
    """'512x768' -> (512, 768), width first; both multiples of 8 (the VAE's scale), at most 4096."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise SettingsError("size", f"{text!r} is not WIDTHxHEIGHT, e.g. 512x512") from None
    if not (8 <= width <= 4096 and 8 <= height <= 4096) or width % 8 or height % 8:
        raise SettingsError("size", f"{text!r}: width and height must be multiples of 8, from 8 to 4096")
    return width, height


# The samplers offered by name: diffusers scheduler classes, built from the pipeline's own
# scheduler config for one call. "Model default" keeps the pipeline's scheduler.
SAMPLERS = {
    "Model default": None,
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Euler ancestral": "EulerAncestralDiscreteScheduler",
    "DDIM": "DDIMScheduler",
    "UniPC": "UniPCMultistepScheduler",
}
Sampler = Literal[tuple(SAMPLERS)]


@dataclass
class GenerateSettings:
    """What a generation job (jobs.py, Engine.generate) draws and where it saves it.

    The pictures go to `output` (a .png); with `count` > 1 the others get -1, -2... in their
    names. With `compare`, the same seeds are drawn again without the embeddings, saved with
    -without in their names."""

    model: str = _model()
    embeddings: list[str] = setting(label="Embeddings", flag="--embedding",
                                    help="an embedding file whose name the prompt uses (the name the Playground shows); repeatable. "
                                    "diffusers' SDXL output is two files: give both",
                                    repeat="append", path="file", default_factory=list)
    prompt_embeds: str | None = setting(None, label="Prompt embeddings", help="prompt_embeds.safetensors from optimize-prompt (instead of --prompt)",
                                        path="file", suffixes=(".safetensors",))
    prompt: str | None = setting(None, label="Prompt", help="what to draw; the tokens of --embedding files may be used in it")
    negative: str | None = setting(None, label="Negative prompt", help="what to keep out of the picture")
    strength: float = setting(1.0, label="Strength", help="multiplies the embeddings' vectors: below 1 weaker, above 1 stronger", ge=0, le=10)
    sampler: Sampler = setting("Model default", label="Sampler", help="the diffusers scheduler that draws")
    steps: int = setting(25, label="Steps", help="denoising steps", ge=1, le=1000)
    guidance: float | None = setting(None, label="Guidance", help=GUIDANCE_HELP, ge=0, le=100)
    seed: int = _seed()
    size: str | None = setting(None, label="Size", help="WIDTHxHEIGHT, e.g. 512x512 (default: the model's own size)", max_length=32)
    count: int = setting(1, label="Pictures", help="how many pictures, seeds seed, seed+1, ...", ge=1, le=16)
    compare: bool = setting(False, label="Compare", help="also draw the same seeds without the embeddings (saved as NAME-without.png)")
    output: str = setting("", label="Output", help="the PNG to write", required=True, path="output_file", suffixes=(".png",))
    device: str = _device()
    precision: Precision = _precision()
    fp8_weights: bool = _fp8_weights()

    def check(self) -> GenerateSettings:
        """Raises SettingsError naming the first bad value; returns self."""
        check_fields(self)
        if (self.prompt is None) == (self.prompt_embeds is None):
            raise SettingsError("prompt", "give a prompt or a prompt_embeds file (one of them)")
        self.dimensions  # noqa: B018 - checks the size
        return self

    @property
    def dimensions(self) -> tuple[int, int] | None:
        """(width, height) of `size`, or None for the model's own."""
        return parse_size(self.size) if self.size else None

    def picture_paths(self, without: bool = False) -> list[Path]:
        """Where picture i of the run (with or without the embeddings) is saved."""
        output = Path(self.output)
        stem = output.stem + ("-without" if without else "")
        return [output.with_name(f"{stem}{f'-{i}' if i else ''}{output.suffix}") for i in range(self.count)]
