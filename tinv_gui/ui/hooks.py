"""Where the app meets features of other branches, one marked place each.

- HOOK (issue 3): auto-captioning (offered when tinv_gui.captioning exists; the interface is a guess).
- Issue 4, wired: generation through tinv_gui.generate with a sampler and a strength on top
  (`generate_images`), prompt from an image through Engine.optimize_prompt.
- Issue 6, wired: downloads for every tool (`export_formats`); other tools' files are read by
  formats.read_embedding (SDXL's two-encoder files too) and scored by tinv_gui.evaluate (TinvApp.measure).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path



def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


# ---------------------------------------------------------------------------------------------
# HOOK (issue 3): auto-captioning with BLIP. Guessed interface:
#   tinv_gui.captioning.caption_images(paths: list[str], model: str) -> list[str]
# ---------------------------------------------------------------------------------------------
def auto_caption_available() -> bool:
    return _module_available("tinv_gui.captioning")


def auto_caption(paths: list[str], model: str) -> list[str]:
    from .. import captioning  # noqa: PLC0415 - only present once issue 3 lands

    return captioning.caption_images(paths, model=model)


# ---------------------------------------------------------------------------------------------
# Issue 4 (wired): generation through tinv_gui.generate, with a sampler and a strength on top;
# prompt from an image through Engine.optimize_prompt.
# ---------------------------------------------------------------------------------------------
SAMPLERS = {
    "Model default": None,
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Euler ancestral": "EulerAncestralDiscreteScheduler",
    "DDIM": "DDIMScheduler",
    "UniPC": "UniPCMultistepScheduler",
}


def generate_images(pipe, prompt=None, sampler: str = "Model default", embedding: Path | None = None, strength: float = 1.0, prompt_embeds=None, **options):
    """Pictures from tinv_gui.generate.generate (the CLI's `generate`: same seed, same pictures),
    with the chosen sampler for this call only and the embedding's vectors scaled by `strength`.
    `options` go to generate()."""
    from ..generate import generate

    files = [embedding] if embedding is not None else []
    return generate(pipe, prompt, embeddings=files, prompt_embeds=prompt_embeds, sampler=sampler, strength=strength, **options)


def submit_prompt_search(engine, image: str, model: str, hard: bool, steps: int | None, output_dir: str):
    """A prompt-from-image job for one picture (tinv_gui.methods.prompt_from_image)."""
    from ..settings import PromptSettings

    return engine.optimize_prompt(PromptSettings(images=[image], model=model, hard=hard, steps=steps, output_dir=output_dir))


def similarity_from_loss(loss: float) -> float:
    """Cosine similarity from the spherical distance θ²/2 the CLIP-space methods minimize."""
    return math.cos(math.sqrt(max(2.0 * loss, 0.0)))


# ---------------------------------------------------------------------------------------------
# Issue 6 (wired): every export format for download, and files of every tool for the Playground.
# ---------------------------------------------------------------------------------------------
def export_formats(embedding: Path) -> list[tuple[Path, str]]:
    """The run's embedding and the files other tools load, each with the tools it is for and
    the name to type there. Each file keeps the name its tools call it by; A1111's one-tensor
    .safetensors is left out (the kohya file serves A1111 as well), and OneTrainer's, whose
    name OneTrainer does not use, gets '-onetrainer' in its own."""
    from .. import formats

    written = formats.export_all(embedding)
    run = formats.read_embedding(embedding)
    name = Path(written["kohya"]).stem
    if run.is_sdxl:  # the run's file is SDXL's {clip_l, clip_g}; diffusers' two-file copies stay in export/diffusers
        files = [(embedding, f"this app, diffusers (clip_l and clip_g, one load_textual_inversion call each): type `{run.token}`")]
    else:
        files = [
            (embedding, f"diffusers' load_textual_inversion, this app: type `{run.token}`"),
            (Path(written["diffusers-bin"]), f"diffusers' older .bin layout: type `{run.token}`"),
        ]
    onetrainer = Path(written["onetrainer"])
    files += [
        (Path(written["a1111-pt"]), f"AUTOMATIC1111, Forge, ComfyUI, InvokeAI, kohya: type `{name}` (InvokeAI `<{name}>`, ComfyUI `embedding:{name}`)"),
        (Path(written["kohya"]), f"kohya sd-scripts, InvokeAI, ComfyUI, AUTOMATIC1111: type `{name}` (InvokeAI `<{name}>`, ComfyUI `embedding:{name}`)"),
        (Path(written["a1111-png"]), f"AUTOMATIC1111 / Forge embedding card (a picture with the embedding inside): type `{name}`"),
        (onetrainer.rename(onetrainer.with_name(f"{name}-onetrainer{onetrainer.suffix}")), "OneTrainer: load it as an embedding with the placeholder of your choice"),
    ]
    return files
