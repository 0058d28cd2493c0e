"""The Prompt from image tab: find the prompt that describes one picture (readable words or a
continuous prompt, Engine.optimize_prompt), watch the similarity rise, and draw from it."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from ..generate import GenerateSettings
from ..settings import PromptSettings, SettingsError
from .gpu import on_gpu
from .limits import QUEUE
from .progress import POLL_S, RunView
from .workspace import sanitize_filename, unique_path


def similarity_from_loss(loss: float) -> float:
    """Cosine similarity from the spherical distance θ²/2 the CLIP-space methods minimize."""
    return math.cos(math.sqrt(max(2.0 * loss, 0.0)))


class PromptTab:
    """The Prompt from image tab's controls and handlers (a part of TinvApp)."""

    def find_prompt(self, model, image, readable, steps, request: gr.Request):
        """Search the prompt that best describes one picture (Engine.optimize_prompt), following
        the job: its progress, the similarity rising, and finally the prompt."""
        ws = self.workspace(request)
        if not image:
            raise gr.Error("Upload a picture first.")
        target = unique_path(ws.root / "prompt-images", sanitize_filename(Path(image).name, "picture"))
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(image, target)
        try:
            settings = PromptSettings(images=[str(target)], model=model, hard=bool(readable), steps=int(steps or 0) or None, output_dir=str(ws.new_run_dir("prompt")))
            job = self.engine.optimize_prompt(settings)
        except (SettingsError, ValueError) as error:
            raise gr.Error(str(error)) from None
        self.prompt_jobs[ws.key] = job
        while True:
            view = RunView.from_events(list(job.history), self.engine.position(job))
            similarity = [(p.step, similarity_from_loss(p.loss)) for p in view.progress]
            frame = pd.DataFrame(similarity, columns=["step", "similarity"]).astype({"step": "int64", "similarity": "float64"})
            prompt = ""
            if view.outputs.get("prompt"):
                prompt = ws.inside(view.outputs["prompt"]).read_text(encoding="utf-8").strip()
            elif view.outputs.get("t5_prompt"):  # SD 3.x, Flux.1
                words = ws.inside(view.outputs["t5_prompt"]).read_text(encoding="utf-8").splitlines()[0]
                prompt = f"(a continuous prompt: its CLIP parts have no words; T5 reads: {words})"
            elif view.outputs.get("prompt_embeds"):
                prompt = "(a continuous prompt has no words: use 'Generate with it' to see it)"
            yield view.progress_html() if not view.done else self._found_summary(view), frame, prompt
            if view.done:
                return
            time.sleep(POLL_S)

    @staticmethod
    def _found_summary(view: RunView) -> str:
        if view.status == "failed":
            return view.progress_html()
        similarity = view.metrics.get("clip_similarity")
        return view.progress_html() + (f"<p>Best CLIP similarity with the picture: <b>{similarity:.3f}</b></p>" if similarity is not None else "")

    def generate_found(self, model, steps, request: gr.Request):
        """A picture from the prompt found last (its words, or its continuous prompt_embeds),
        drawn in the Playground's number of denoising steps."""
        ws = self.workspace(request)
        job = self.prompt_jobs.get(ws.key)
        outputs = job.outputs if job is not None and job.done else {}
        if "prompt" in outputs:
            found = dict(prompt=ws.inside(outputs["prompt"]).read_text(encoding="utf-8").strip())
        elif "prompt_embeds" in outputs:
            found = dict(prompt_embeds=str(ws.inside(outputs["prompt_embeds"])))
        else:
            raise gr.Error("Find a prompt first.")
        out = unique_path(ws.images, time.strftime("%Y%m%d-%H%M%S") + "-found.png")
        final = self.engine.generate(GenerateSettings(model=model, output=str(out), steps=int(steps), **found)).wait()
        if final.kind == "failed":
            raise gr.Error(final.message)
        return [ws.served(final.outputs["image"])]


    def build_prompt_tab(self, c: dict) -> None:
        with gr.Tab("5. Prompt from image", id="prompt-from-image"):
            gr.Markdown(
                "Upload one picture and let the model find the prompt that describes it best, in its own "
                "terms. *Readable* gives words you can copy into any Stable Diffusion tool; *continuous* "
                "matches more closely but has no words, so it only works here. On SD 3.x and Flux.1, whose T5 "
                "text encoder has no image side, the continuous prompt learns the CLIP parts and T5 reads "
                "the words nearest to them (shown below)."
            )
            with gr.Row():
                with gr.Column():
                    c["pfi_image"] = gr.Image(type="filepath", label="Picture")
                    c["pfi_readable"] = gr.Radio(
                        [("Readable words", True), ("Continuous (this app only)", False)], value=True, label="Kind of prompt"
                    )
                    c["pfi_steps"] = gr.Number(
                        0, label="Steps", precision=0, minimum=0, info="0: the default (300 for readable words, 40 for continuous)."
                    )
                    c["pfi_run"] = gr.Button("Find a prompt", variant="primary")
                with gr.Column():
                    c["pfi_progress"] = gr.HTML()
                    c["pfi_plot"] = gr.LinePlot(
                        x="step", y="similarity", title="Similarity to the picture (higher is closer)", height=260
                    )
                    c["pfi_prompt"] = gr.Textbox(label="Prompt found", buttons=["copy"], interactive=False)
                    c["pfi_generate"] = gr.Button("Generate with it")
                    c["pfi_picture"] = gr.Gallery(label="Drawn from the prompt found", columns=1, height=320)

    def wire_prompt_tab(self, c: dict) -> None:
        c["pfi_run"].click(
            self.limited(on_gpu(self.find_prompt)),
            [c["model"], c["pfi_image"], c["pfi_readable"], c["pfi_steps"]],
            [c["pfi_progress"], c["pfi_plot"], c["pfi_prompt"]],
            api_name="find_prompt",
            show_progress="hidden",
            **QUEUE,
        )
        c["pfi_generate"].click(
            self.limited(on_gpu(self.generate_found)), [c["model"], c["gen_steps"]], c["pfi_picture"], api_name="generate_found", **QUEUE
        )
