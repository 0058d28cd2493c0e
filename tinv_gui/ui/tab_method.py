"""The Method tab: the methods in plain words (their presets in the registry, tinv_gui.methods),
the model, the new word and its starting word, and every training option under Advanced (made
from the settings schema by options.py, which also turns the form's values back into settings).
"""

from __future__ import annotations

import gradio as gr

from ..demo_model import SDXL_DEMO_NAME
from ..demo_sd3_flux import FLUX_DEMO_NAME, SD3_DEMO_NAME
from ..device import choose_placement
from ..methods import METHODS, method_with_label
from ..models import DEFAULT_MODEL
from ..settings import MAX_PROMPT_LENGTH
from ..vector_norms import tokens_used_text
from .options import option_component, option_defaults, option_fields
from .progress import format_seconds

DEMO_MODEL = "demo"
MODEL_CHOICES = [
    ("Stable Diffusion 1.5 (downloaded from the Hugging Face Hub)", DEFAULT_MODEL),
    ("Stable Diffusion XL 1.0 (downloaded from the Hugging Face Hub)", "stabilityai/stable-diffusion-xl-base-1.0"),
    ("Offline demo model (tiny, random weights: for trying the app)", DEMO_MODEL),
    ("Offline SDXL-shaped demo model (tiny, random weights)", SDXL_DEMO_NAME),
    ("Offline SD 3.5-shaped demo model (tiny, random weights; CLIP-L, bigG and T5)", SD3_DEMO_NAME),
    ("Offline Flux.1-dev-shaped demo model (tiny, random weights; CLIP-L and T5)", FLUX_DEMO_NAME),
]

class MethodTab:
    """The Method tab's controls and handlers (a part of TinvApp)."""

    def method_help(self, label: str) -> str:
        """What the chosen preset does, when to pick it, and how long it should take here."""
        method = method_with_label(label)
        preset = method.preset
        steps = method.defaults.get("steps") or 0
        placement = choose_placement()
        measured = self.speeds.get(method.name)
        per_step = measured or (preset.s_per_step_gpu if placement.device.type == "cuda" else preset.s_per_step_cpu)
        how = "measured on this machine" if measured else f"a rough figure for {placement.describe(why=False)} with Stable Diffusion 1.5"
        return (
            f"**{preset.label}** takes about {format_seconds(steps * per_step)} for its {steps} steps "
            f"({how}; the demo model is much faster)."
        )

    def preset_changed(self, label: str):
        """Show the preset's explanation and fill the Advanced options with its method's defaults."""
        defaults = method_with_label(label).defaults
        updates = [gr.update(value=defaults[name]) if name in defaults else gr.update() for name, _, _ in option_fields()]
        return (self.method_help(label), *updates)

    def build_method_tab(self, c: dict) -> None:
        presets = [m.preset for m in METHODS.values()]
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
                    info="Stable Diffusion 1.x, 2.x, XL, 3.x or Flux.1. You can also type a Hub id (owner/name)"
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
            c["token_room"] = gr.Markdown(self.token_room(presets[0].label, 1), elem_id="token-room")
            with gr.Accordion("Advanced: every training option", open=False):
                c["options"] = {}
                defaults = option_defaults(next(iter(METHODS)))
                fields = option_fields()
                for start in range(0, len(fields), 4):
                    with gr.Row(equal_height=True):
                        for name, spec, kind in fields[start : start + 4]:
                            c["options"][name] = option_component(name, spec, kind, defaults[name])

    @staticmethod
    def token_room(label: str, vectors) -> str:
        """How many of a prompt's tokens the new word will take."""
        if method_with_label(label).name == "caption-init":
            return f"The new word takes one of a prompt's {MAX_PROMPT_LENGTH} tokens per word of the caption (the log says how many)."
        try:
            count = int(vectors)
        except (TypeError, ValueError):
            return ""
        return f"With {count} vector{'s' if count != 1 else ''} per token, {tokens_used_text(count)}."

    def wire_method_tab(self, c: dict) -> None:
        option_components = list(c["options"].values())
        c["preset"].change(self.preset_changed, c["preset"], [c["method_help"], *option_components], api_name=False)
        for source in (c["preset"], c["options"]["vectors"]):
            source.change(self.token_room, [c["preset"], c["options"]["vectors"]], c["token_room"], api_name=False, queue=False)
