"""Which model family a pipeline, a diffusers folder or a single-file checkpoint belongs to, and
what loading it needs to know: its diffusers pipeline class, its text encoders (and which is
T5), and how its single files are recognised. Families: "sd" (SD 1.x/2.x), "sdxl", "sd3"
(SD 3 / 3.5) and "flux" (Flux.1 dev / schnell)."""

from __future__ import annotations

from pathlib import Path

import torch

# Each text encoder's subfolders in a diffusers pipeline (and the pipeline's attributes), by encoder number.
TEXT_ENCODER_FOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
# A key only SDXL (base) checkpoints have: its second text encoder, OpenCLIP bigG.
SDXL_CHECKPOINT_KEY_PREFIX = "conditioner.embedders.1."
# The families, by the diffusers pipeline that loads them; "sd" is SD 1.x/2.x.
FAMILY_PIPELINES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}
FAMILY_TITLES = {"sd": "Stable Diffusion", "sdxl": "Stable Diffusion XL", "sd3": "Stable Diffusion 3", "flux": "Flux.1"}
# model_index.json's `_class_name` prefix of each family other than "sd" (the first match wins).
FAMILY_INDEX_PREFIXES = (("StableDiffusion3", "sd3"), ("Flux", "flux"), ("StableDiffusionXL", "sdxl"))
# The transformer's tensor names in single-file SD 3.x and Flux.1 checkpoints, with or without the
# "model.diffusion_model." prefix (the names diffusers' single-file loader recognizes them by).
SD3_CHECKPOINT_BLOCK = "joint_blocks.0.context_block.adaLN_modulation.1.bias"
FLUX_CHECKPOINT_BLOCK = "double_blocks.0.img_attn.norm.key_norm.scale"
CHECKPOINT_MODEL_PREFIX = "model.diffusion_model."
T5_CHECKPOINT_KEY = "text_encoders.t5xxl.transformer.shared.weight"  # a single file that holds T5-XXL
# Which of a flow-matching family's text encoders is T5 (the others are CLIPs).
T5_ENCODER = {"sd3": 2, "flux": 1}
FAMILY_TEXT_ENCODERS = {"sd": TEXT_ENCODER_FOLDERS[:1], "sdxl": TEXT_ENCODER_FOLDERS[:2], "sd3": TEXT_ENCODER_FOLDERS, "flux": TEXT_ENCODER_FOLDERS[:2]}


def pipeline_family(pipe) -> str:
    """The family (a key of FAMILY_PIPELINES) of a loaded pipeline."""
    return family_of_class_name(type(pipe).__name__)


def family_of_class_name(class_name: str) -> str:
    """The family of a diffusers pipeline class name, as model_index.json's `_class_name` gives it."""
    return next((family for prefix, family in FAMILY_INDEX_PREFIXES if class_name.startswith(prefix)), "sd")


def checkpoint_keys(path: Path) -> list[str]:
    """The tensor names of a single-file checkpoint, without reading its tensors."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: the tensors are not read
    return list(data.get("state_dict", data).keys())


def checkpoint_family(keys) -> str:
    """The family of a single-file checkpoint from its tensor names: SD 3.x by its MMDiT's joint
    blocks, Flux.1 by its double-stream blocks, SDXL by its second text encoder, else SD 1.x/2.x."""
    names = {key.removeprefix(CHECKPOINT_MODEL_PREFIX) for key in keys}
    if SD3_CHECKPOINT_BLOCK in names:
        return "sd3"
    if FLUX_CHECKPOINT_BLOCK in names:
        return "flux"
    if any(name.startswith(SDXL_CHECKPOINT_KEY_PREFIX) for name in names):
        return "sdxl"
    return "sd"


def missing_t5_hint(family: str) -> str:
    """What to do about a single SD 3.x / Flux.1 file that failed to load and holds no T5."""
    return (
        f"This {FAMILY_TITLES[family]} file holds no T5 text encoder ({T5_CHECKPOINT_KEY.rsplit('.', 2)[0]}.*): diffusers "
        "takes it, and the pipeline's configs, from the model's Hub repository, which is gated (log in with a token after "
        "accepting its licence) and must be in the local cache when offline. Use a file that includes T5, or the model's "
        "diffusers folder."
    )
