"""Loading Stable Diffusion pipelines and CLIP models, once, and keeping them warm.

A model is named by a Hub id ("stable-diffusion-v1-5/stable-diffusion-v1-5"), a local diffusers
folder, a single .safetensors/.ckpt checkpoint, or "demo" / "demo-vpred" / "demo-sdxl" / "demo-sd3" /
"demo-flux" (the offline demo models, which load through the same code as a local folder).

SD 1.x/2.x, SDXL, SD 3.x and Flux.1 load through the same code; the family is told from the
folder's model_index.json or the checkpoint's keys (model_families.py). Their text encoders (and
tokenizers) are numbered 0, 1, 2 here in the pipeline's order: SDXL's CLIP-L and bigG; SD 3.x's
CLIP-L, bigG and T5; Flux's CLIP-L and T5.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import torch

from .demo_model import DEMO_NAMES, SDXL_DEMO_NAME, demo_model_dir, demo_sdxl_dir
from .demo_sd3_flux import FLUX_DEMO_NAME, SD3_DEMO_NAME, demo_flux_dir, demo_sd3_dir
from .device import Placement
from .model_families import (
    FAMILY_PIPELINES,
    FAMILY_TEXT_ENCODERS,
    FAMILY_TITLES,
    T5_CHECKPOINT_KEY,
    T5_ENCODER,
    TEXT_ENCODER_FOLDERS,
    TOKENIZER_FOLDERS,
    checkpoint_family,
    checkpoint_keys,
    family_of_class_name,
    missing_t5_hint,
)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# The CLIP whose text tower each Stable Diffusion generation was trained with, by text width.
DEFAULT_CLIP_BY_WIDTH = {
    768: "openai/clip-vit-large-patch14",  # SD 1.x
    1024: "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",  # SD 2.x
    1280: "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",  # SDXL's second text encoder (its first is 768's)
}
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says which and what to do."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: kind is "folder", "file" or "hub"; `name` is what the user typed."""

    name: str
    kind: str
    location: str
    clip_locations: tuple[str, ...] = ()  # the demo models ship their CLIPs beside them, one per text encoder


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MODEL_FIELDS = ("model", "clip_model", "clip_model_g", "caption_model")  # settings that name a model


SHARED_MODELS_ONLY = "on this shared server, models come from the Hugging Face Hub (owner/name) or are the demo models"


def is_hub_name(name: str) -> bool:
    """On a shared server, whether `name` may be loaded: a Hub id (owner/name) or a demo model.
    Decided before any look at the server's disk that could answer differently, so a refusal
    never tells an existing path from a missing one."""
    name = (name or "").strip()
    if name in (*DEMO_NAMES, SDXL_DEMO_NAME, SD3_DEMO_NAME, FLUX_DEMO_NAME):
        return True
    # A Hub id also naming something on disk (relative to the server's folder) would load that.
    return bool(HUB_ID.match(name)) and not any(part in (".", "..") for part in name.split("/")) and not Path(name).exists()


def check_hub_name(name: str, what: str = "model") -> None:
    """ModelLoadError unless `is_hub_name(name)`."""
    if not is_hub_name(name):
        raise ModelLoadError(f"{what}: {SHARED_MODELS_ONLY}")


def resolve_source(model: str) -> ModelSource:
    """Turn what the user typed into a ModelSource, building the demo model on first use."""
    model = (model or "").strip()
    if not model:
        raise ModelLoadError("no model given: name a Hub id, a local folder or checkpoint file, or 'demo' / 'demo-sdxl'")
    if model in DEMO_NAMES:
        root = demo_model_dir(model)
        return ModelSource(model, "folder", str(root / "sd"), (str(root / "clip"),))
    if model == SDXL_DEMO_NAME:
        root = demo_sdxl_dir()
        return ModelSource(model, "folder", str(root / "sd"), (str(root / "clip_l"), str(root / "clip_g")))
    if model == SD3_DEMO_NAME:
        root = demo_sd3_dir()
        return ModelSource(model, "folder", str(root / "sd"), (str(root / "clip_l"), str(root / "clip_g")))
    if model == FLUX_DEMO_NAME:
        root = demo_flux_dir()
        return ModelSource(model, "folder", str(root / "sd"), (str(root / "clip_l"),))
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelLoadError(
                f"{model} is a folder but not a diffusers pipeline (it has no model_index.json); "
                "point at the folder that holds model_index.json, or at a single .safetensors/.ckpt file"
            )
        return ModelSource(model, "folder", str(path))
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        if not path.is_file():
            raise ModelLoadError(f"checkpoint file {model} does not exist")
        return ModelSource(model, "file", str(path))
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(
            f"{model} is neither a diffusers folder, a .safetensors/.ckpt file, nor a Hub id like 'owner/name'"
        )
    return ModelSource(model, "hub", model)


def _explain(source: ModelSource, what: str, error: Exception) -> ModelLoadError:
    text = str(error)
    if _is_gated(error):
        return ModelLoadError(
            f"could not load {what} '{source.name}': it comes from a gated Hugging Face Hub repository (SD 3.x and "
            "FLUX.1-dev are). Accept its licence on the repository's page, then log in with a token "
            "(`hf auth login`, or set HF_TOKEN) and try again; or point at a local copy."
        )
    if source.kind == "hub":
        hint = (
            f"could not load {what} '{source.name}' from the Hugging Face Hub and it is not in the local cache "
            f"({type(error).__name__}). If you are offline, download it once with a connection, point at a "
            "local folder or checkpoint file instead, or use the offline demo model ('demo')."
        )
    else:
        hint = f"could not load {what} from {source.location}: it does not look like a Stable Diffusion model ({text[:300]})"
    return ModelLoadError(hint)


def _hub_cache_bytes(cache: Path) -> int:
    """Bytes of every file in the Hub cache's blob folders, finished or still downloading."""
    total = 0
    for blobs in cache.glob("*/blobs"):
        with contextlib.suppress(OSError):
            total += sum(entry.stat().st_size for entry in os.scandir(blobs) if entry.is_file())
    return total


@contextlib.contextmanager
def reporting_downloads(log: Callable[[str], None], every_s: float = 3.0):
    """While the block runs, say every `every_s` seconds how much has been downloaded into the
    Hugging Face cache, if anything: a first use of a model fetches gigabytes, and a page that only
    says "Loading" for minutes looks stuck. Does nothing when the Hub is switched off."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        yield
        return
    cache = Path(constants.HF_HUB_CACHE)
    started, stop = time.monotonic(), threading.Event()
    first = _hub_cache_bytes(cache)

    def watch() -> None:
        last = first
        while not stop.wait(every_s):
            now = _hub_cache_bytes(cache)
            if now > last:
                rate = (now - first) / max(time.monotonic() - started, 1e-6)
                done = now - first
                amount = f"{done / 1e9:.2f} GB" if done >= 1e9 else f"{done / 1e6:.0f} MB"
                log(f"Downloading the model: {amount} so far ({rate / 1e6:.0f} MB/s)")
            last = now

    watcher = threading.Thread(target=watch, name="tinv-download-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


@dataclass
class ClipBundle:
    """A CLIP model with both towers and projections, plus the tokenizer of the pipeline it serves."""

    model: torch.nn.Module  # transformers CLIPModel
    tokenizer: object
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    placement: Placement
    name: str


class ModelStore:
    """Keeps the most recently used pipeline, and the CLIP models serving it, in memory between jobs.

    One pipeline is kept: a second job on the same model reuses it; a job on another model
    replaces it (and its CLIP models), so memory holds one model's worth, not one per model ever used.
    """

    def __init__(self):
        self._lock = threading.RLock()
        self._pipeline: tuple[tuple, object] | None = None
        # The CLIP models of one (model, placement): {(clip name, encoder): bundle}.
        self._clips: tuple[tuple, dict[tuple, ClipBundle]] | None = None
        self._tokenizers: dict[tuple, object] = {}
        self._families: dict[str, str] = {}
        self.loads = 0  # how many times weights were read from disk; tests check reuse with it
        self.hub_only = False  # a shared server: models by Hub id or demo name only (check_hub_name)

    def _source(self, model: str, what: str = "model") -> ModelSource:
        if self.hub_only:
            check_hub_name(model, what)
        return resolve_source(model)

    def family(self, model: str) -> str:
        """The family of `model`, one of FAMILY_PIPELINES ("sd", "sdxl", "sd3", "flux"), told without loading weights."""
        source = self._source(model)
        with self._lock:
            if source.location not in self._families:
                try:
                    self._families[source.location] = _family_of_source(source)
                except Exception as error:  # noqa: BLE001 - turned into a message the user can act on
                    raise _explain(source, "the model's description", error) from error
            return self._families[source.location]

    def is_sdxl(self, model: str) -> bool:
        """Whether `model` is Stable Diffusion XL (two text encoders), told without loading weights."""
        return self.family(model) == "sdxl"

    def text_encoder_count(self, model: str) -> int:
        """1 for SD 1.x/2.x, 2 for SDXL and Flux.1, 3 for SD 3.x."""
        return len(FAMILY_TEXT_ENCODERS[self.family(model)])

    def tokenizer(self, model: str, encoder: int = 0):
        """The tokenizer of the pipeline's text encoder number `encoder`, without loading any weights."""
        from transformers import CLIPTokenizer, T5TokenizerFast

        source = self._source(model)
        key = (source.location, encoder)
        with self._lock:
            if key not in self._tokenizers:
                try:
                    family = self.family(model)
                    if source.kind == "file":
                        self._tokenizers[key] = tokenizers(self._load_pipeline(source, None))[encoder]
                    else:
                        tokenizer_class = T5TokenizerFast if T5_ENCODER.get(family) == encoder else CLIPTokenizer
                        self._tokenizers[key] = tokenizer_class.from_pretrained(source.location, subfolder=TOKENIZER_FOLDERS[encoder])
                except ModelLoadError:
                    raise
                except Exception as error:  # noqa: BLE001 - turned into a message the user can act on
                    raise _explain(source, "the tokenizer", error) from error
            return self._tokenizers[key]

    def text_widths(self, model: str) -> tuple[int, ...]:
        """Widths of the pipeline's text encoders: (768,) for SD 1.x, (1024,) for SD 2.x,
        (768, 1280) for SDXL, (768, 1280, 4096) for SD 3.x, (768, 4096) for Flux.1."""
        from transformers import CLIPTextConfig, T5Config

        source = self._source(model)
        if source.kind == "file":
            return pipeline_text_widths(self.pipeline(model))
        family = self.family(model)
        folders = FAMILY_TEXT_ENCODERS[family]
        config_classes = [T5Config if T5_ENCODER.get(family) == i else CLIPTextConfig for i in range(len(folders))]
        try:
            return tuple(config.from_pretrained(source.location, subfolder=folder).hidden_size for config, folder in zip(config_classes, folders))
        except Exception as error:  # noqa: BLE001
            raise _explain(source, "the text encoder config", error) from error

    def text_width(self, model: str) -> int:
        """Width of the pipeline's (first) text encoder (768 for SD 1.x and SDXL, 1024 for SD 2.x)."""
        return self.text_widths(model)[0]

    def pipeline(self, model: str, placement: Placement | None = None):
        """A diffusers StableDiffusionPipeline (or StableDiffusionXLPipeline) on `placement`'s device
        (default: the automatic choice), loaded once."""
        from .device import choose_placement

        placement = placement or choose_placement()
        source = self._source(model)
        key = (source.location, str(placement))
        with self._lock:
            if self._pipeline is not None and self._pipeline[0] == key:
                return self._pipeline[1]
            self._pipeline = None  # free the old one before loading the next
            pipe = self._load_pipeline(source, placement)
            self._pipeline = (key, pipe)
            return pipe

    def _load_pipeline(self, source: ModelSource, placement: Placement | None):
        import diffusers

        dtype = placement.weight_dtype if placement else torch.float32
        family = self.family(source.name)
        kwargs = dict(dtype=dtype)
        if family == "sdxl":  # it has no safety checker; an invisible watermark is the user's choice
            kwargs.update(add_watermarker=False)
        elif family == "sd":
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        pipeline_class = getattr(diffusers, FAMILY_PIPELINES[family])
        try:
            if source.kind == "file":
                pipe = pipeline_class.from_single_file(source.location, **kwargs)
            else:
                pipe = pipeline_class.from_pretrained(source.location, **kwargs)
        except Exception as error:  # noqa: BLE001
            problem = _explain(source, f"the {FAMILY_TITLES[family]} pipeline", error)
            if source.kind == "file" and family in T5_ENCODER and T5_CHECKPOINT_KEY not in checkpoint_keys(Path(source.location)):
                problem = ModelLoadError(f"{problem} {missing_t5_hint(family)}")
            raise problem from error
        self.loads += 1
        pipe.set_progress_bar_config(disable=True)
        if placement is not None:
            pipe.to(placement.device)
            if placement.device.type == "cuda":
                _try_xformers(pipe)
        for module in (denoiser(pipe), pipe.vae, *text_encoders(pipe)):
            module.requires_grad_(False)
            module.eval()
        if family == "sdxl":
            _pool_at_first_end_token(pipe.text_encoder_2, pipe.tokenizer_2)
        return pipe

    def clip(self, model: str, clip_model: str | None = None, placement: Placement | None = None, encoder: int = 0) -> ClipBundle:
        """The CLIP model whose text tower is `model`'s text encoder number `encoder` (or
        `clip_model` when given), loaded once. SDXL's encoder 0 is OpenAI's CLIP ViT-L/14 and
        encoder 1 is OpenCLIP ViT-bigG/14."""
        from .device import choose_placement

        placement = placement or choose_placement()
        source = self._source(model)
        if encoder >= self.text_encoder_count(model):
            raise ModelLoadError(f"{model} has {self.text_encoder_count(model)} text encoder(s), not {encoder + 1}")
        if T5_ENCODER.get(self.family(model)) == encoder:
            raise ModelLoadError(f"{model}'s text encoder {encoder + 1} is T5, which has no CLIP model (no image tower)")
        if clip_model:
            if self.hub_only:
                check_hub_name(clip_model, "CLIP model")
            clip_name = clip_model
        elif source.clip_locations:
            clip_name = source.clip_locations[encoder]
        else:
            width = self.text_widths(model)[encoder]
            if width not in DEFAULT_CLIP_BY_WIDTH:
                raise ModelLoadError(
                    f"no default CLIP model for a text encoder of width {width}; name one with --clip-model"
                )
            clip_name = DEFAULT_CLIP_BY_WIDTH[width]
        model_key = (source.location, str(placement))
        with self._lock:
            if self._clips is None or self._clips[0] != model_key:
                self._clips = (model_key, {})  # another model's CLIPs are freed
            loaded = self._clips[1]
            if (clip_name, encoder) not in loaded:
                loaded[(clip_name, encoder)] = self._load_clip(clip_name, model, placement, encoder)
            return loaded[(clip_name, encoder)]

    def _load_clip(self, clip_name: str, model: str, placement: Placement, encoder: int) -> ClipBundle:
        from transformers import CLIPModel
        from transformers.image_processing_utils import ImageProcessingMixin

        clip_source = ModelSource(clip_name, "folder" if Path(clip_name).is_dir() else "hub", clip_name)
        try:
            clip = CLIPModel.from_pretrained(clip_name, dtype=placement.weight_dtype)
            processor_config, _ = ImageProcessingMixin.get_image_processor_dict(clip_name)
        except Exception as error:  # noqa: BLE001
            problem = _explain(clip_source, "the CLIP model", error)
            if self.is_sdxl(model):
                raise ModelLoadError(
                    f"{problem} SDXL's CLIP-space methods need the CLIP models both its text encoders come from: "
                    f"{DEFAULT_CLIP_BY_WIDTH[768]} (--clip-model) and {DEFAULT_CLIP_BY_WIDTH[1280]} (--clip-model-g), "
                    "in transformers' format; point at local copies of them, or use a method that trains through the UNet."
                ) from error
            raise problem from error
        self.loads += 1
        tokenizer = self.tokenizer(model, encoder)
        expected = self.text_widths(model)[encoder]
        if clip.config.text_config.hidden_size != expected:
            raise ModelLoadError(
                f"CLIP model {clip_name} has a text tower of width {clip.config.text_config.hidden_size}, but the "
                f"pipeline's text encoder{f' {encoder + 1}' if self.is_sdxl(model) else ''} has width {expected}; "
                "pick the CLIP model the pipeline was trained with"
            )
        clip.requires_grad_(False).eval().to(placement.device)
        crop = processor_config.get("crop_size") or {"height": clip.config.vision_config.image_size}
        size = crop["height"] if isinstance(crop, dict) else int(crop)
        return ClipBundle(
            model=clip,
            tokenizer=tokenizer,
            image_size=size,
            image_mean=tuple(processor_config.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
            image_std=tuple(processor_config.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
            placement=placement,
            name=clip_name,
        )


def text_encoders(pipe) -> list:
    """The pipeline's text encoders, in order (one for SD 1.x/2.x, two for SDXL and Flux.1, three
    for SD 3.x)."""
    return [te for te in (getattr(pipe, name, None) for name in TEXT_ENCODER_FOLDERS) if te is not None]


def tokenizers(pipe) -> list:
    """The pipeline's tokenizers, one per text encoder."""
    return [tok for tok in (getattr(pipe, name, None) for name in TOKENIZER_FOLDERS) if tok is not None]


def denoiser(pipe):
    """The pipeline's denoising network: the UNet of SD 1.x/2.x/XL, the transformer of SD 3.x and Flux.1."""
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def pipeline_text_widths(pipe) -> tuple[int, ...]:
    """Widths of a loaded pipeline's text encoders, as ModelStore.text_widths."""
    return tuple(te.config.hidden_size for te in text_encoders(pipe))


def _family_of_source(source: ModelSource) -> str:
    if source.kind == "file":
        return checkpoint_family(checkpoint_keys(Path(source.location)))
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(source.location)  # model_index.json, from the folder or the Hub
    return family_of_class_name(str(index.get("_class_name", "")))


def _checkpoint_is_sdxl(path: Path) -> bool:
    """Whether a single-file checkpoint is SDXL's, reading only its keys."""
    return checkpoint_family(checkpoint_keys(path)) == "sdxl"


def _is_gated(error: BaseException | None) -> bool:
    """Whether the error, or one it was raised from or while handling (diffusers re-raises the
    Hub's error as an OSError), says the Hub repository is gated."""
    from huggingface_hub.errors import GatedRepoError

    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, GatedRepoError) or "gated repo" in str(error).lower():
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def _pool_at_first_end_token(text_encoder, tokenizer) -> None:
    """SDXL's second text encoder ships an old config (end-of-text id 2) under which transformers
    pools at the largest token id, which is a new token's once a learned one is in the prompt.
    Pool at the first end-of-text token instead, as SDXL itself does: the same for every prompt
    of known words, and right for prompts holding new tokens."""
    eos = tokenizer.eos_token_id
    text_encoder.config.eos_token_id = eos
    model = getattr(text_encoder, "text_model", text_encoder)
    model.eos_token_id = eos


def _try_xformers(pipe) -> None:
    """Use xformers' attention on CUDA when it is installed; PyTorch's SDPA otherwise."""
    try:
        import xformers  # noqa: F401
    except ImportError:
        return
    try:
        pipe.enable_xformers_memory_efficient_attention()
    except Exception:  # noqa: BLE001 - a broken xformers build must not stop training; SDPA remains
        pass
