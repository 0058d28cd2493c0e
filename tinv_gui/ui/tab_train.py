"""The Train tab: start (or rejoin) the visitor's training, follow it (progress, loss curve,
previews, log), stop it, and offer its files for download."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import gradio as gr

from ..embeddings import TokenError, validate_token
from ..engine import Job
from ..events import TERMINAL_EVENTS
from ..formats import read_embedding
from ..jobs import EXPORTS, recommended_file
from ..methods import method_with_label
from ..models import ModelLoadError, is_hub_name
from ..settings import SettingsError, TrainSettings
from ..vector_norms import tokens_used_text
from . import dataset
from .gpu import MAX_GPU_DURATION_S, ZERO_GPU, on_gpu
from .host import host_number
from .options import settings_from_form
from .progress import (
    POLL_S,
    SCORE_COLOURS,
    RunView,
    loss_colours,
    norm_colours,
    norm_warning,
    score_text,
)
from .tab_dataset import table_rows
from .workspace import Workspace

# A shared server's limits (README, Spaces): steps a run may ask for, and how long a visitor may
# be away from a running job of theirs before it is stopped (a reload within it rejoins the job).
MAX_STEPS = host_number("TINV_GUI_MAX_STEPS")
LEFT_GRACE_S = host_number("TINV_GUI_LEFT_GRACE_SECONDS")


def training_duration(model, token, init, preset, captions, request=None, **options) -> int:
    """Seconds of GPU to ask ZeroGPU for one training: the preset's steps at its rough GPU speed,
    plus loading, within ZeroGPU's limits. A run cut short there keeps its last saved embedding."""
    chosen = method_with_label(preset)
    steps = int(options.get("steps") or chosen.defaults.get("steps") or 0)
    return int(min(max(120 + 1.5 * steps * chosen.preset.s_per_step_gpu, 120), MAX_GPU_DURATION_S))


class TrainTab:
    """The Train tab's controls and handlers (a part of TinvApp)."""

    def start_training(self, model: str, token: str, init: str, preset: str, captions, request: gr.Request, **options):
        """Start (or rejoin) the visitor's training job and follow it until it ends."""
        ws = self.workspace(request)
        job = self.jobs.get(ws.key)
        if job is None or job.done:
            ws.take_stop_request()  # a Stop pressed before this run is not meant for it
            job = self._submit_training(ws, model, token, init, preset, captions, options)
        yield from self._follow(ws, job)

    def _submit_training(self, ws: Workspace, model, token, init, preset, captions, options) -> Job:
        model = (model or "").strip()
        if self.shared and not is_hub_name(model):
            raise gr.Error("On this shared server, models come from the Hugging Face Hub (owner/name) or are the demo model.")
        if not dataset.picture_paths(ws):
            raise gr.Error("There are no pictures to train on: add some on the Dataset tab first.")
        dataset.save_captions(ws, table_rows(captions))
        method = method_with_label(preset).name
        if (options.get("resume") or "").strip():  # only the visitor's own files, named as the Playground lists them
            resume = ws.root / options["resume"].strip()
            if not ws.contains(resume) or not resume.is_file():
                raise gr.Error(f"Resume from: {options['resume'].strip()!r} is not one of your embeddings; pick a name the Playground lists.")
            options = {**options, "resume": str(resume.resolve())}
        try:
            validate_token(token, self.engine.store.tokenizer(model))
            steps = TrainSettings(images=str(ws.pictures), token=token.strip(), method=method, model=model, **settings_from_form(method, options)).resolved().total_steps
            if self.shared and steps > MAX_STEPS:
                raise SettingsError("steps", f"this shared server trains at most {MAX_STEPS} steps a run (this run asks for {steps}); ask for fewer")
            settings = TrainSettings(
                images=str(ws.pictures),
                token=token.strip(),
                output_dir=str(ws.new_run_dir(token)),
                method=method,
                model=model,
                init=(init or "").strip() or None,
                **settings_from_form(method, options),
            )
            job = self.engine.train(settings, export=True)  # the downloads, written once when it ends
        except (TokenError, SettingsError, ModelLoadError, ValueError) as error:
            raise gr.Error(str(error)) from None
        self.jobs[ws.key] = job
        self.job_methods[job.id] = method
        return job

    def _follow(self, ws: Workspace, job: Job):
        """Yield the Train tab's state whenever the job has news, until it ends."""
        self.followers[job.id] = self.followers.get(job.id, 0) + 1
        try:
            yield from self._follow_events(ws, job)
        finally:
            self.followers[job.id] -= 1
            if ZERO_GPU and not job.done:  # the visitor left: end the job while the GPU is still ours
                job.cancel()
                deadline = time.monotonic() + 120
                while not job.done and time.monotonic() < deadline:
                    time.sleep(POLL_S)
            elif self.shared and not job.done:  # the visitor left: stop their job unless they come back soon
                timer = threading.Timer(LEFT_GRACE_S, self._stop_if_unfollowed, (job,))
                timer.daemon = True  # never holds the server's exit
                timer.start()

    def _stop_if_unfollowed(self, job: Job) -> None:
        if not job.done and not self.followers.get(job.id):
            job.cancel()

    def _follow_events(self, ws: Workspace, job: Job):
        seen = -1
        while True:
            if ws.take_stop_request():
                job.cancel()
            history = list(job.history)
            ended = bool(history) and isinstance(history[-1], TERMINAL_EVENTS)
            if len(history) != seen or ended:
                seen = len(history)
                view = RunView.from_events(history, self.engine.position(job), self.engine.expected_wait(job))
                yield self._train_outputs(ws, view)
            if ended:
                if view.progress:
                    last = view.progress[-1]
                    self.speeds[self.job_methods.get(job.id, "")] = last.elapsed_s / max(last.step, 1)
                return
            time.sleep(POLL_S)

    @staticmethod
    def download_files(ws: Workspace, outputs: dict[str, str]) -> list[tuple[Path, str]]:
        """A finished run's files to download, each with the tools it is for and the name to type
        there: the embedding (and its moving average), then the files the job exported for other
        tools (jobs.EXPORTS)."""
        embedding = ws.inside(outputs["embedding"])
        run = read_embedding(embedding)
        token, name = run.token, Path(outputs.get("kohya", embedding)).stem
        where = f"type `{name}` (InvokeAI `<{name}>`, ComfyUI `embedding:{name}`)"
        tools = {
            "diffusers-bin": f"diffusers' older .bin layout: type `{token}`",
            "a1111-pt": f"AUTOMATIC1111, Forge, ComfyUI, InvokeAI, kohya: {where}",
            "kohya": f"kohya sd-scripts, InvokeAI, ComfyUI, AUTOMATIC1111: {where}",
            "a1111-png": f"AUTOMATIC1111 / Forge embedding card (a picture with the embedding inside): type `{name}`",
            "onetrainer": "OneTrainer: load it as an embedding with the placeholder of your choice",
        }
        if "kohya" not in outputs:  # SD 3.x, Flux.1: OneTrainer's file is the one ComfyUI reads too
            tools["onetrainer"] += f"; ComfyUI: type `embedding:{Path(outputs['onetrainer']).stem}`"
        if run.keys:
            files = [(embedding, f"this app, diffusers ({' and '.join(run.keys)}, one load_textual_inversion call each): type `{token}`")]
        else:
            files = [(embedding, f"diffusers' load_textual_inversion, this app: type `{token}`")]
        if outputs.get("ema"):  # the moving average of the vectors (--ema-decay), the same layout
            files.append((ws.inside(outputs["ema"]), f"the vectors' moving average (EMA), as the embedding: type `{token}`"))
        recommended = recommended_file(embedding.parent)  # the scores' pick comes first, listed once
        if recommended == embedding:
            files[0] = (embedding, f"the recommended checkpoint (step {run.metadata.get('steps', '?')}, the last; see the scores); {files[0][1]}")
        elif recommended is not None:
            step = read_embedding(recommended).metadata.get("steps", "?")
            files.insert(0, (recommended, f"the recommended checkpoint (step {step}, see the scores); diffusers, this app: type `{token}`"))
        return files + [(ws.inside(outputs[fmt]), tools[fmt]) for fmt in EXPORTS if fmt in outputs]

    def _train_outputs(self, ws: Workspace, view: RunView) -> dict:
        c = self.components
        embedding = view.outputs.get("embedding")
        files = self.download_files(ws, view.outputs) if view.done and embedding else []
        legend = "".join(f"\n- `{path.name}`: {tools}" for path, tools in files)
        if files and view.metrics.get("prompt_tokens"):
            legend += f"\n\nIn a prompt, {tokens_used_text(int(view.metrics['prompt_tokens']))}."
        return {
            c["progress"]: view.progress_html(),
            c["loss_plot"]: gr.update(value=view.loss_frame(), color_map=loss_colours(view.progress)),
            c["previews"]: gr.update(  # only methods that draw; a row per preview step, a column per prompt
                value=[(ws.served(path), caption) for path, caption in view.previews] or None, visible=bool(view.previews), columns=view.preview_columns
            ),
            c["log"]: view.log_text(),
            c["downloads"]: [ws.served(path) for path, _ in files] or None,
            c["download_help"]: f"**Which file for which tool:**{legend}" if files else "",
            c["start"]: gr.update(interactive=view.done, value="Start training"),
            c["stop"]: gr.update(interactive=not view.done),
            c["norm_plot"]: gr.update(value=view.norm_frame(), color_map=norm_colours(view.norms)),
            c["norm_warning"]: gr.update(value=norm_warning(view.norms), visible=bool(norm_warning(view.norms))),
            c["score_plot"]: gr.update(value=view.score_frame(), visible=bool(view.scores)),
            c["score_text"]: score_text(view.scores),
            c["try_it"]: gr.update(interactive=bool(files)),
            c["embedding"]: gr.update(choices=self.embedding_choices(ws), value=str(files[0][0].relative_to(ws.root))) if files else gr.update(),
        }

    def stop_training(self, request: gr.Request) -> str:
        """Ask the visitor's job to stop; it saves after the current step."""
        ws = self.workspace(request)
        job = self.jobs.get(ws.key)
        if job is not None and not job.done:
            job.cancel()
        elif ZERO_GPU:  # the job runs in ZeroGPU's process, out of this one's reach: leave word
            ws.request_stop()
        else:
            return "Nothing is training."
        return "Stopping after this step; the embedding so far will be saved."

    def build_train_tab(self, c: dict) -> None:
        with gr.Tab("3. Train", id="train"):
            with gr.Row():
                c["start"] = gr.Button("Start training", variant="primary")
                c["stop"] = gr.Button("Stop", variant="stop", interactive=False)
            c["progress"] = gr.HTML(RunView().progress_html())
            with gr.Row():
                c["loss_plot"] = gr.LinePlot(
                    RunView().loss_frame(),
                    x="step",
                    y="loss",
                    color="curve",
                    title="Loss (lower is better)",
                    x_title="step",
                    y_title="loss",
                    height=320,
                    scale=2,
                    elem_id="loss-plot",
                )
                c["previews"] = gr.Gallery(
                    label="Previews: a row per preview step, a column per prompt (each with its own fixed seed)", columns=3, height=320, scale=1, visible=False
                )
            with gr.Row():
                c["norm_plot"] = gr.LinePlot(
                    RunView().norm_frame(),
                    x="step",
                    y="norm",
                    color="curve",
                    title="Length of each learned vector, beside the model's own words (grey: their usual range)",
                    x_title="step",
                    y_title="vector length",
                    height=260,
                    elem_id="norm-plot",
                )
            c["norm_warning"] = gr.Markdown(visible=False, elem_classes="tinv-warning", elem_id="norm-warning")
            with gr.Row():
                c["score_plot"] = gr.LinePlot(
                    RunView().score_frame(),
                    x="step",
                    y="score",
                    color="curve",
                    color_map=SCORE_COLOURS,
                    title="Checkpoints: likeness and editability (scaled: 0 the worst, 1 the best)",
                    x_title="step",
                    y_title="scaled score",
                    height=260,
                    visible=False,
                    elem_id="score-plot",
                    scale=1,
                )
                c["score_text"] = gr.Markdown(elem_id="score-text")
            with gr.Row():
                c["log"] = gr.Textbox(label="Log", lines=8, max_lines=12, autoscroll=True, scale=2)
                with gr.Column(scale=1):
                    c["downloads"] = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")
                    c["download_help"] = gr.Markdown()
                    c["try_it"] = gr.Button("Try it in the Playground", interactive=False)
                    c["stop_status"] = gr.Markdown()

    def train_outputs(self) -> list:
        """The components a training's state is drawn in (welcome and start_training update them)."""
        c = self.components
        names = ("progress", "loss_plot", "previews", "log", "downloads", "download_help", "start", "stop", "try_it", "embedding")
        return [c[k] for k in (*names, "norm_plot", "norm_warning", "score_plot", "score_text")]

    def wire_train_tab(self, c: dict) -> None:
        train_outputs = self.train_outputs()
        # The engine runs one job at a time and tells each visitor their place in its queue, which
        # the page shows; Gradio's own queue would hide that (its position sits in the hidden
        # progress element), so training waits there only on ZeroGPU, where the GPU call must.
        c["start"].click(
            on_gpu(self.start_training, duration=training_duration, outputs=train_outputs),
            [c["model"], c["token"], c["init"], c["preset"], c["captions"]],
            train_outputs,
            inputs_kwargs=c["options"],
            api_name="train",
            show_progress="hidden",  # the page draws its own progress bar
            concurrency_id="gpu" if ZERO_GPU else "train",
            concurrency_limit=1 if ZERO_GPU else None,
        )
        c["stop"].click(self.stop_training, None, c["stop_status"], api_name="stop", queue=False)
        c["try_it"].click(self.try_in_playground, None, [c["tabs"], c["embedding"], c["prompt"]], api_name=False)

