"""Loading Stable Diffusion pipelines and CLIP models, once, and keeping them warm.

A model is named by a Hub id ("stable-diffusion-v1-5/stable-diffusion-v1-5"), a local diffusers
folder, a single .safetensors/.ckpt checkpoint, or "demo" / "demo-vpred" (the offline demo model,
which loads through the same code as a local folder).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .demo_model import DEMO_NAMES, demo_model_dir
from .device import Placement

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# The CLIP whose text tower each Stable Diffusion generation was trained with, by text width.
DEFAULT_CLIP_BY_WIDTH = {
    768: "openai/clip-vit-large-patch14",  # SD 1.x
    1024: "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",  # SD 2.x
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
    clip_location: str | None = None  # the demo model ships its matching CLIP beside it


def resolve_source(model: str) -> ModelSource:
    """Turn what the user typed into a ModelSource, building the demo model on first use."""
    model = (model or "").strip()
    if not model:
        raise ModelLoadError("no model given: name a Hub id, a local folder or checkpoint file, or 'demo'")
    if model in DEMO_NAMES:
        root = demo_model_dir(model)
        return ModelSource(model, "folder", str(root / "sd"), str(root / "clip"))
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
    if source.kind == "hub":
        hint = (
            f"could not load {what} '{source.name}' from the Hugging Face Hub and it is not in the local cache "
            f"({type(error).__name__}). If you are offline, download it once with a connection, point at a "
            "local folder or checkpoint file instead, or use the offline demo model ('demo')."
        )
    else:
        hint = f"could not load {what} from {source.location}: it does not look like a Stable Diffusion model ({text[:300]})"
    return ModelLoadError(hint)


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
    """Keeps the most recently used pipeline and CLIP model in memory between jobs.

    One of each is kept: a second job on the same model reuses it; a job on another model
    replaces it, so memory holds one pipeline, not one per model ever used.
    """

    def __init__(self):
        self._lock = threading.RLock()
        self._pipeline: tuple[tuple, object] | None = None
        self._clip: tuple[tuple, ClipBundle] | None = None
        self._tokenizers: dict[str, object] = {}
        self.loads = 0  # how many times weights were read from disk; tests check reuse with it

    def tokenizer(self, model: str):
        """The pipeline's tokenizer, without loading any weights."""
        from transformers import CLIPTokenizer

        source = resolve_source(model)
        with self._lock:
            if source.location not in self._tokenizers:
                try:
                    if source.kind == "file":
                        self._tokenizers[source.location] = self._load_pipeline(source, None).tokenizer
                    else:
                        self._tokenizers[source.location] = CLIPTokenizer.from_pretrained(source.location, subfolder="tokenizer")
                except ModelLoadError:
                    raise
                except Exception as error:  # noqa: BLE001 - turned into a message the user can act on
                    raise _explain(source, "the tokenizer", error) from error
            return self._tokenizers[source.location]

    def text_width(self, model: str) -> int:
        """Width of the pipeline's text encoder (768 for SD 1.x, 1024 for SD 2.x)."""
        from transformers import CLIPTextConfig

        source = resolve_source(model)
        if source.kind == "file":
            return self.pipeline(model).text_encoder.config.hidden_size
        try:
            return CLIPTextConfig.from_pretrained(source.location, subfolder="text_encoder").hidden_size
        except Exception as error:  # noqa: BLE001
            raise _explain(source, "the text encoder config", error) from error

    def pipeline(self, model: str, placement: Placement | None = None):
        """A diffusers StableDiffusionPipeline on `placement`'s device (default: the automatic
        choice), loaded once."""
        from .device import choose_placement

        placement = placement or choose_placement()
        source = resolve_source(model)
        key = (source.location, str(placement))
        with self._lock:
            if self._pipeline is not None and self._pipeline[0] == key:
                return self._pipeline[1]
            self._pipeline = None  # free the old one before loading the next
            pipe = self._load_pipeline(source, placement)
            self._pipeline = (key, pipe)
            return pipe

    def _load_pipeline(self, source: ModelSource, placement: Placement | None):
        from diffusers import StableDiffusionPipeline

        dtype = placement.weight_dtype if placement else torch.float32
        kwargs = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)
        try:
            if source.kind == "file":
                pipe = StableDiffusionPipeline.from_single_file(source.location, **kwargs)
            else:
                pipe = StableDiffusionPipeline.from_pretrained(source.location, **kwargs)
        except Exception as error:  # noqa: BLE001
            raise _explain(source, "the Stable Diffusion pipeline", error) from error
        self.loads += 1
        pipe.set_progress_bar_config(disable=True)
        if placement is not None:
            pipe.to(placement.device)
            if placement.device.type == "cuda":
                _try_xformers(pipe)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
            module.eval()
        return pipe

    def clip(self, model: str, clip_model: str | None = None, placement: Placement | None = None) -> ClipBundle:
        """The CLIP model matching `model`'s text encoder (or `clip_model` when given), loaded once."""
        from .device import choose_placement

        placement = placement or choose_placement()
        source = resolve_source(model)
        if clip_model:
            clip_name = clip_model
        elif source.clip_location:
            clip_name = source.clip_location
        else:
            width = self.text_width(model)
            if width not in DEFAULT_CLIP_BY_WIDTH:
                raise ModelLoadError(
                    f"no default CLIP model for a text encoder of width {width}; name one with --clip-model"
                )
            clip_name = DEFAULT_CLIP_BY_WIDTH[width]
        key = (clip_name, source.location, str(placement))
        with self._lock:
            if self._clip is not None and self._clip[0] == key:
                return self._clip[1]
            self._clip = None
            bundle = self._load_clip(clip_name, model, placement)
            self._clip = (key, bundle)
            return bundle

    def _load_clip(self, clip_name: str, model: str, placement: Placement) -> ClipBundle:
        from transformers import CLIPModel
        from transformers.image_processing_utils import ImageProcessingMixin

        clip_source = ModelSource(clip_name, "folder" if Path(clip_name).is_dir() else "hub", clip_name)
        try:
            clip = CLIPModel.from_pretrained(clip_name, dtype=placement.weight_dtype)
            processor_config, _ = ImageProcessingMixin.get_image_processor_dict(clip_name)
        except Exception as error:  # noqa: BLE001
            raise _explain(clip_source, "the CLIP model", error) from error
        self.loads += 1
        tokenizer = self.tokenizer(model)
        expected = self.text_width(model)
        if clip.config.text_config.hidden_size != expected:
            raise ModelLoadError(
                f"CLIP model {clip_name} has a text tower of width {clip.config.text_config.hidden_size}, but the "
                f"pipeline's text encoder has width {expected}; pick the CLIP model the pipeline was trained with"
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
