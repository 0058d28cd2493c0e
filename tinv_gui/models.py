"""Loading Stable Diffusion pipelines and CLIP models, once, and keeping them warm.

A model is named by a Hub id ("stable-diffusion-v1-5/stable-diffusion-v1-5"), a local diffusers
folder, a single .safetensors/.ckpt checkpoint, or "demo" / "demo-vpred" / "demo-sdxl" / "demo-sd3" /
"demo-flux" (the offline demo models, which load through the same code as a local folder).

Every family loads through the same code; its Family (tinv_gui.families) is told from the folder's
model_index.json or the checkpoint's keys, and says which pipeline class loads it and what its
text encoders (and tokenizers) are, numbered 0, 1, ... here.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .demo_model import DEMO_NAMES, SDXL_DEMO_NAME, demo_model_dir, demo_sdxl_dir
from .demo_sd3_flux import (
    FLUX_DEMO_NAME,
    SD3_DEMO_NAME,
    demo_flux_dir,
    demo_sd3_dir,
    fit_demo_flux,
)
from .device import FP8, Placement, store_in_bf16_between_calls, store_linear_weights
from .families import Family, family_for_checkpoint, family_for_index, family_of

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CLIP_FLAGS = ("--clip-model", "--clip-model-g")  # the settings naming each text encoder's CLIP
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
T5_CHECKPOINT_KEY = "text_encoders.t5xxl.transformer.shared.weight"  # in a single file that holds T5-XXL


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
        raise ModelLoadError("no model given: name a Hub id, a local folder or checkpoint file, or an offline demo model ('demo', 'demo-sdxl', 'demo-sd3', 'demo-flux')")
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
        self._families: dict[str, Family] = {}
        self.loads = 0  # how many times weights were read from disk; tests check reuse with it
        self.hub_only = False  # a shared server: models by Hub id or demo name only (check_hub_name)

    def _source(self, model: str, what: str = "model") -> ModelSource:
        if self.hub_only:
            check_hub_name(model, what)
        return resolve_source(model)

    def family(self, model: str) -> Family:
        """The family of `model` (SD 1.x/2.x, SDXL, ...), told without loading weights."""
        source = self._source(model)
        with self._lock:
            if source.location not in self._families:
                try:
                    self._families[source.location] = _family_of_source(source)
                except Exception as error:  # noqa: BLE001 - turned into a message the user can act on
                    raise _explain(source, "the model's description", error) from error
            return self._families[source.location]

    def text_encoder_count(self, model: str) -> int:
        """How many text encoders the model has (SDXL: 2)."""
        return self.family(model).text_encoder_count

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
                        self._tokenizers[key] = family.tokenizers(self._load_pipeline(source, None))[encoder]
                    else:
                        tokenizer_class = T5TokenizerFast if encoder == family.t5_encoder else CLIPTokenizer
                        self._tokenizers[key] = tokenizer_class.from_pretrained(source.location, subfolder=family.tokenizer_attributes[encoder])
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
        folders = family.text_encoder_attributes  # diffusers' subfolders carry the same names
        configs = [T5Config if i == family.t5_encoder else CLIPTextConfig for i in range(len(folders))]
        try:
            return tuple(config.from_pretrained(source.location, subfolder=folder).hidden_size for config, folder in zip(configs, folders))
        except Exception as error:  # noqa: BLE001
            raise _explain(source, "the text encoder config", error) from error

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
        pipeline_class, kwargs = getattr(diffusers, family.pipeline_class), family.pipeline_kwargs(dtype)
        try:
            if source.kind == "file":
                pipe = pipeline_class.from_single_file(source.location, **kwargs)
            else:
                pipe = pipeline_class.from_pretrained(source.location, **kwargs)
        except Exception as error:  # noqa: BLE001
            problem = _explain(source, f"the {family.title} pipeline", error)
            if source.kind == "file" and family.t5_encoder is not None and T5_CHECKPOINT_KEY not in checkpoint_keys(Path(source.location)):
                problem = ModelLoadError(f"{problem} {_missing_t5_hint(family)}")
            raise problem from error
        self.loads += 1
        pipe.set_progress_bar_config(disable=True)
        for module in (family.denoiser(pipe), pipe.vae, *family.text_encoders(pipe)):
            module.requires_grad_(False)
            module.eval()
        if placement is not None and placement.fp8_weights:
            # Before the pipeline moves: the largest parts reach the device in 8 bits, never whole in bf16.
            t5 = [] if family.t5_encoder is None else [family.text_encoders(pipe)[family.t5_encoder]]
            for module in (family.denoiser(pipe), *t5):
                store_linear_weights(module, FP8, placement.device)
        if placement is not None:
            pipe.to(placement.device)
            if placement.device.type == "cuda":
                _try_xformers(pipe)
        if placement is not None and placement.lean_storage:
            # fp32 compute, half the bytes: the VAE idles during the steps; the text encoders' linear layers
            store_in_bf16_between_calls(pipe.vae)
            for index, text_encoder in enumerate(family.text_encoders(pipe)):
                if index != family.t5_encoder:  # T5 casts its activations to its feed-forward weights' dtype (bf16 then)
                    store_linear_weights(text_encoder, torch.bfloat16)
        family.prepare(pipe)
        if source.name == FLUX_DEMO_NAME:
            fit_demo_flux(pipe)
        return pipe

    def word_table(self, model: str, encoder: int) -> torch.Tensor:
        """Text encoder number `encoder`'s token table [vocabulary, width] (float32, on the CPU):
        from the warm pipeline when it is `model`'s, else read alone from the encoder's weights,
        never loading the encoder (T5-XXL is 9.5 GB in bf16, its table 0.26 GB). For the parts of a
        token that a CLIP-space method cannot learn (T5's), which start from words."""
        from safetensors import safe_open

        source = self._source(model)
        with self._lock:
            if self._pipeline is not None and self._pipeline[0][0] == source.location:
                return text_encoders(self._pipeline[1])[encoder].get_input_embeddings().weight.detach().float().cpu()
        if source.kind == "file":
            return text_encoders(self.pipeline(model))[encoder].get_input_embeddings().weight.detach().float().cpu()
        folder = self.family(model).text_encoder_attributes[encoder]
        try:
            for file in _weight_files(source, folder):
                with safe_open(str(file), framework="pt") as f:
                    found = _token_table_name(f.keys())
                    if found:
                        return f.get_tensor(found).float()
        except Exception as error:  # noqa: BLE001
            raise _explain(source, f"the token table of {folder}", error) from error
        raise ModelLoadError(f"could not find the token table of {source.name}'s {folder} in its weights (a name ending in {', '.join(TOKEN_TABLE_NAMES)})")

    def clip(self, model: str, clip_model: str | None = None, placement: Placement | None = None, encoder: int = 0) -> ClipBundle:
        """The CLIP model whose text tower is `model`'s text encoder number `encoder` (or
        `clip_model` when given), loaded once; by default the one the family names for the
        encoder's width (SDXL's encoder 0 is OpenAI's CLIP ViT-L/14, encoder 1 OpenCLIP ViT-bigG/14)."""
        from .device import choose_placement

        placement = placement or choose_placement()
        source = self._source(model)
        if encoder >= self.text_encoder_count(model):
            raise ModelLoadError(f"{model} has {self.text_encoder_count(model)} text encoder(s), not {encoder + 1}")
        if encoder == self.family(model).t5_encoder:
            raise ModelLoadError(f"{model}'s text encoder {encoder + 1} is T5, which has no CLIP model (no image tower)")
        if clip_model:
            if self.hub_only:
                check_hub_name(clip_model, "CLIP model")
            clip_name = clip_model
        elif source.clip_locations:
            clip_name = source.clip_locations[encoder]
        else:
            width = self.text_widths(model)[encoder]
            defaults = self.family(model).default_clips
            if width not in defaults:
                raise ModelLoadError(
                    f"no default CLIP model for a text encoder of width {width}; name one with {CLIP_FLAGS[min(encoder, len(CLIP_FLAGS) - 1)]}"
                )
            clip_name = defaults[width]
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
            family = self.family(model)
            if family.text_encoder_count > 1:
                needed = " and ".join(f"{name} ({flag})" for name, flag in zip(family.default_clips.values(), CLIP_FLAGS))
                raise ModelLoadError(
                    f"{problem} {family.title}'s CLIP-space methods need the CLIP models its text encoders come from: {needed}, "
                    "in transformers' format; point at local copies of them, or use a method that trains through the UNet."
                ) from error
            raise problem from error
        self.loads += 1
        tokenizer = self.tokenizer(model, encoder)
        expected = self.text_widths(model)[encoder]
        if clip.config.text_config.hidden_size != expected:
            raise ModelLoadError(
                f"CLIP model {clip_name} has a text tower of width {clip.config.text_config.hidden_size}, but the "
                f"pipeline's text encoder{f' {encoder + 1}' if self.text_encoder_count(model) > 1 else ''} has width {expected}; "
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
    """The pipeline's text encoders, in order (one for SD 1.x/2.x, two for SDXL)."""
    return family_of(pipe).text_encoders(pipe)


def tokenizers(pipe) -> list:
    """The pipeline's tokenizers, one per text encoder."""
    return family_of(pipe).tokenizers(pipe)


def pipeline_text_widths(pipe) -> tuple[int, ...]:
    """Widths of a loaded pipeline's text encoders, as ModelStore.text_widths."""
    return tuple(te.config.hidden_size for te in text_encoders(pipe))


def _family_of_source(source: ModelSource) -> Family:
    if source.kind == "file":
        return family_for_checkpoint(checkpoint_keys(Path(source.location)))
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(source.location)  # model_index.json, from the folder or the Hub
    return family_for_index(str(index.get("_class_name", "")))


# A text encoder's token table, by the end of its name: T5's, and CLIP's under whichever prefix the
# transformers version that saved it wrote ("text_model." up to transformers 4, none from 5).
TOKEN_TABLE_NAMES = ("shared.weight", "embed_tokens.weight", "token_embedding.weight")


def _token_table_name(names) -> str | None:
    """The name among a weights file's `names` that holds the token table, or None."""
    names = list(names)
    for ending in TOKEN_TABLE_NAMES:
        found = next((name for name in names if name == ending or name.endswith(f".{ending}")), None)
        if found:
            return found
    return None


def _weight_files(source: ModelSource, folder: str) -> list[Path]:
    """The .safetensors files of a diffusers folder's (or Hub repository's) component `folder`,
    the shard holding the token table first when the component is sharded."""
    import json

    if source.kind == "folder":
        files = sorted((Path(source.location) / folder).glob("*.safetensors"))
        index = next((Path(source.location) / folder).glob("*.safetensors.index.json"), None)
        fetch = None
    else:
        from huggingface_hub import hf_hub_download, list_repo_files

        names = [n for n in list_repo_files(source.location) if n.startswith(f"{folder}/") and n.endswith((".safetensors", ".index.json"))]
        index = next((hf_hub_download(source.location, n) for n in names if n.endswith(".index.json")), None)
        fetch = lambda name: Path(hf_hub_download(source.location, f"{folder}/{name}"))  # noqa: E731
        files = [] if index else [fetch(Path(n).name) for n in names if n.endswith(".safetensors")]
    if index:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        first = weight_map.get(_token_table_name(weight_map))
        shards = [first] if first else sorted(set(weight_map.values()))
        files = [fetch(name) if fetch else Path(source.location) / folder / name for name in shards]
    return files


def checkpoint_keys(path: Path) -> list[str]:
    """The tensor names of a single-file checkpoint, without reading its tensors."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: the tensors are not read
    return list(data.get("state_dict", data).keys())


def _missing_t5_hint(family: Family) -> str:
    return (
        f"This {family.title} file holds no T5 text encoder (text_encoders.t5xxl.*): diffusers takes it, and the "
        "pipeline's configs, from the model's Hub repository, which is gated (log in with a token after accepting its "
        "licence) and must be in the local cache when offline. Use a file that includes T5, or the model's diffusers folder."
    )


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
