"""The Method tab: the presets in plain words, the model, the new word and its starting word, and
every training option under Advanced (labels and help in OPTIONS).

`settings_from_form` turns the form's values into TrainSettings arguments.
"""

from __future__ import annotations

import dataclasses

import gradio as gr

from ..demo_model import SDXL_DEMO_NAME
from ..device import PRECISIONS, choose_placement
from ..models import DEFAULT_MODEL
from ..settings import METHOD_DEFAULTS, SCHEDULES, STYLES, SettingsError, TrainSettings
from . import hooks
from .progress import format_seconds

DEMO_MODEL = "demo"
MODEL_CHOICES = [
    ("Stable Diffusion 1.5 (downloaded from the Hugging Face Hub)", DEFAULT_MODEL),
    ("Stable Diffusion XL 1.0 (downloaded from the Hugging Face Hub)", "stabilityai/stable-diffusion-xl-base-1.0"),
    ("Offline demo model (tiny, random weights: for trying the app)", DEMO_MODEL),
    ("Offline SDXL-shaped demo model (tiny, random weights)", SDXL_DEMO_NAME),
]

# Every training option in the Advanced accordion: label and help. A TrainSettings field missing
# here (say, one a new method adds) is still offered, under its own name, until it gets a line.
OPTIONS: dict[str, tuple[str, str]] = {
    "steps": ("Steps", "How many optimization steps. More steps fit the pictures more closely."),
    "batch_size": ("Batch size", "Prompts (or pictures) per step. Larger is steadier but slower and uses more memory."),
    "lr": ("Learning rate", "Size of each update. Too high and the loss jumps around or fails; too low and nothing changes."),
    "weight_decay": ("Weight decay", "Pulls the vectors gently towards zero, which keeps them from growing wild."),
    "lr_schedule": ("Learning-rate schedule", "How the learning rate changes over the run."),
    "warmup_steps": ("Warm-up steps", "Steps at the start during which the learning rate climbs from zero."),
    "grad_clip": ("Gradient clipping", "Caps the size of each update; 0 turns it off."),
    "grad_accum": ("Gradient accumulation", "Adds up this many batches before each update: a bigger batch without more memory."),
    "vectors": ("Vectors per token", "How many word-slots the new word uses. 1 is usual; 2 to 4 can hold more detail."),
    "seed": ("Seed", "Makes a run repeatable: the same seed and settings give the same result."),
    "style": ("Object or style", "Object: a thing (my cat). Style: a look (my watercolors). Chooses the training prompts."),
    "use_captions": ("Train on captions", "Use each picture's caption (Dataset tab) instead of generic prompts."),
    "crops": ("Views per picture", "QuickEmbedding: crops of each picture averaged into its CLIP embedding."),
    "save_every": ("Save every N steps", "Also keep a numbered copy every N steps, to pick an earlier one. 0: only the final file."),
    "clip_model": ("CLIP model", "For CLIP-space methods. Empty: the CLIP the chosen model was trained with."),
    "resolution": ("Resolution", "Textual inversion: the size pictures are trained at (a multiple of 8). 0: the model's own size."),
    "flip": ("Mirror pictures", "Textual inversion: also train on left-right mirrored pictures. Turn off for text or asymmetric things."),
    "gradient_checkpointing": ("Gradient checkpointing", "Textual inversion: uses much less memory, about a third slower."),
    "quick_steps": ("QuickEmbedding steps first", "Balanced: CLIP-space steps before the diffusion steps. 0: the recipe's 100."),
    "preview_every": ("Preview every N steps", "Draw a picture with the word every N steps to watch it form. 0: no previews."),
    "preview_prompt": ("Preview prompt", "What the previews draw; {} stands for your word. Empty: 'a photo of {}'."),
    "preview_steps": ("Preview quality", "Denoising steps of each preview picture."),
    "scale_lr": ("Scale learning rate", "Multiply the learning rate by batch size x accumulation, as diffusers' --scale_lr."),
    "resume": ("Resume from", "One of your embeddings, as the Playground lists it (runs/.../learned_embeds.safetensors), to continue its run. Empty: start fresh."),
    "caption": ("Caption", "From one picture: the sentence to start from. Empty: the captioning model writes it."),
    "caption_model": ("Captioning model", "From one picture: the model that writes the caption. Empty: BLIP."),
    "clip_model_g": ("Second CLIP model (SDXL)", "SDXL's second text encoder's CLIP, for CLIP-space methods. Empty: OpenCLIP ViT-bigG/14."),
    "device": ("Device", "auto picks the GPU when there is one. Or cpu, cuda, cuda:1, mps."),
    "precision": ("Precision", "auto picks the fastest safe choice for the device."),
}
CHOICES = {"lr_schedule": list(SCHEDULES), "style": list(STYLES), "precision": list(PRECISIONS), "device": ["auto", "cpu", "cuda", "mps"]}
NOT_OPTIONS = {"images", "token", "output_dir", "method", "model", "init", "extra"}


def option_fields() -> list[dataclasses.Field]:
    """The TrainSettings fields the Advanced accordion offers, known ones first."""
    fields = {f.name: f for f in dataclasses.fields(TrainSettings) if f.name not in NOT_OPTIONS}
    known = [fields.pop(name) for name in OPTIONS if name in fields]
    return known + [f for f in fields.values() if any(t in str(f.type) for t in ("int", "float", "str", "bool"))]


def settings_from_form(method: str, values: dict) -> dict:
    """TrainSettings keyword arguments from the form: a value equal to the method's default is
    left as None, so the method (not the form) decides, e.g. per phase of a two-phase run."""
    defaults = METHOD_DEFAULTS.get(method, {})
    fields = {f.name: f for f in dataclasses.fields(TrainSettings)}
    out = {}
    for name, value in values.items():
        if name not in fields or value is None or value == "":
            continue
        kind = str(fields[name].type)
        if "int" in kind and "float" not in kind and isinstance(value, float):
            if not value.is_integer():
                raise SettingsError(name, f"must be a whole number, not {value}")
            value = int(value)
        if fields[name].default is None and name in defaults and value == defaults[name]:
            continue
        if fields[name].default is None and value == 0 and name not in defaults:
            continue  # 0 on the form: leave it to the method or the model
        out[name] = value
    return out


def _option_component(field: dataclasses.Field, method_defaults: dict):
    """The Advanced control for one TrainSettings field, with its label and help."""
    label, info = OPTIONS.get(field.name, (field.name.replace("_", " ").capitalize(), None))
    default = method_defaults.get(field.name, None if field.default is dataclasses.MISSING else field.default)
    kind = str(field.type)
    common = dict(label=label, info=info, min_width=220, elem_id=f"option-{field.name}")
    if field.name in CHOICES:
        return gr.Dropdown(CHOICES[field.name], value=default, allow_custom_value=field.name == "device", **common)
    if "bool" in kind:
        return gr.Checkbox(bool(default), **common)
    # A number left to the method or model (None) shows as 0, and 0 is read back as None.
    if "int" in kind and "float" not in kind:
        return gr.Number(0 if default is None else default, precision=0, minimum=0, **common)
    if "float" in kind:
        return gr.Number(0 if default is None else default, minimum=0, step=0.001, **common)
    return gr.Textbox(default or "", **common)


class MethodTab:
    """The Method tab's controls and handlers (a part of TinvApp)."""

    def method_help(self, label: str) -> str:
        """What the chosen preset does, when to pick it, and how long it should take here."""
        preset = hooks.preset_by_label(label)
        steps = METHOD_DEFAULTS[preset.method].get("steps") or 0
        placement = choose_placement()
        measured = self.speeds.get(preset.method)
        per_step = measured or (preset.s_per_step_gpu if placement.device.type == "cuda" else preset.s_per_step_cpu)
        how = "measured on this machine" if measured else f"a rough figure for {placement.describe(why=False)} with Stable Diffusion 1.5"
        return (
            f"**{preset.label}** takes about {format_seconds(steps * per_step)} for its {steps} steps "
            f"({how}; the demo model is much faster)."
        )

    def preset_changed(self, label: str):
        """Show the preset's explanation and fill the Advanced options with its method's defaults."""
        defaults = METHOD_DEFAULTS[hooks.preset_by_label(label).method]
        updates = [gr.update(value=defaults[f.name]) if f.name in defaults else gr.update() for f in option_fields()]
        return (self.method_help(label), *updates)

    def build_method_tab(self, c: dict) -> None:
        presets = hooks.available_presets()
        default_model = DEFAULT_MODEL if self.hub_ok else DEMO_MODEL
        with gr.Tab("2. Method", id="method"):
            gr.Markdown("Choose how to learn the word. You can change every detail under *Advanced*.")
            with gr.Row(equal_height=True):
                for preset in presets:
                    with gr.Column(min_width=200, elem_classes="tinv-card"):
                        gr.Markdown(f"### {preset.label}\n{preset.what}\n\n**Pick it for:** {preset.when}")
            c["preset"] = gr.Radio([p.label for p in presets], value=presets[0].label, label="Method")
            c["method_help"] = gr.Markdown(self.method_help(presets[0].label))
            with gr.Row():
                c["model"] = gr.Dropdown(
                    MODEL_CHOICES,
                    value=default_model,
                    scale=2,
                    label="Model",
                    allow_custom_value=not self.shared,
                    info="Stable Diffusion 1.x or 2.x. You can also type a Hub id (owner/name)"
                    + ("." if self.shared else ", a local diffusers folder, or a .safetensors/.ckpt file."),
                )
                c["token"] = gr.Textbox(
                    "<my-concept>",
                    label="New word (token)",
                    info="A made-up word that is not a real word, e.g. <my-cat>. You will write it in prompts.",
                )
                c["init"] = gr.Textbox(
                    "",
                    label="Starting word",
                    placeholder="e.g. cat, mug, watercolor",
                    info="A real word close to your concept; training starts from its meaning. Empty: start from random.",
                )
            with gr.Accordion("Advanced: every training option", open=False):
                c["options"] = {}
                defaults = METHOD_DEFAULTS[presets[0].method]
                fields = option_fields()
                for start in range(0, len(fields), 4):
                    with gr.Row(equal_height=True):
                        for f in fields[start : start + 4]:
                            c["options"][f.name] = _option_component(f, defaults)

    def wire_method_tab(self, c: dict) -> None:
        option_components = list(c["options"].values())
        c["preset"].change(self.preset_changed, c["preset"], [c["method_help"], *option_components], api_name=False)
