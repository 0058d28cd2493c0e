"""The Gradio page: five tabs (Dataset, Method, Train, Playground, Prompt from image).

The page holds no training logic. It builds TrainSettings, submits jobs to one shared Engine
(whose ModelStore keeps models warm between runs) and follows each job's events to draw the
progress, the loss curve, the previews, the log and the downloads. Every visitor works in a
folder of their own (see workspace.py); features of other branches come in through hooks.py.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import secrets
import shutil
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import gradio as gr
import pandas as pd

from ..demo_model import ASSETS_DIR, DEMO_NAMES, SDXL_DEMO_NAME
from ..device import choose_placement
from ..embeddings import TokenError, validate_token
from ..formats import read_embedding
from ..engine import Engine, Job
from ..events import TERMINAL_EVENTS
from ..models import DEFAULT_MODEL, ModelLoadError
from ..methods import METHODS, method_with_label
from ..settings import GenerateSettings, SettingsError, TrainSettings
from ..training import EMBEDDING_FILE
from . import dataset, hooks
from .options import option_component, option_defaults, option_fields, settings_from_form, whole_number
from .progress import RunView, format_seconds, loss_colours
from .workspace import Workspace, Workspaces, sanitize_filename, unique_path

TITLE = "tinv-gui: teach Stable Diffusion a new word"
INTRO = (
    "Show the model a few pictures of something (your cat, a mug, a drawing style), give it a new "
    "made-up word such as `<my-cat>`, and tinv-gui learns what that word should mean. The model "
    "itself is not changed: you get a small embedding file (a few kilobytes) that you can use in "
    "prompts here, in diffusers, or in AUTOMATIC1111 and ComfyUI. Work through the tabs from left to "
    "right: add pictures, pick a method, train, then try your word in the Playground."
)
EXAMPLES_DIR = ASSETS_DIR / "examples"
LOGO = ASSETS_DIR / "logo.svg"
DEMO_MODEL = "demo"
MODEL_CHOICES = [
    ("Stable Diffusion 1.5 (downloaded from the Hugging Face Hub)", DEFAULT_MODEL),
    ("Stable Diffusion XL 1.0 (downloaded from the Hugging Face Hub)", "stabilityai/stable-diffusion-xl-base-1.0"),
    ("Offline demo model (tiny, random weights: for trying the app)", DEMO_MODEL),
    ("Offline SDXL-shaped demo model (tiny, random weights)", SDXL_DEMO_NAME),
]
SIZES = {
    "Model default": None,
    "512 × 512": (512, 512),
    "768 × 768": (768, 768),
    "512 × 768 (portrait)": (512, 768),
    "768 × 512 (landscape)": (768, 512),
}
NO_EMBEDDING = "none"
EVAL_PICTURES = 4  # per side when measuring: each is a full generation, so keep it small
MAX_RETURNING = 10_000
MAX_GPU_DURATION_S = int(os.environ.get("TINV_GUI_MAX_GPU_SECONDS", "1500"))  # ZeroGPU's longest call
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
POLL_S = 0.4  # how often a following handler looks at the job's events
# On ZeroGPU Spaces every GPU call runs in a fork of the server, which holds the GPU only while
# the call lasts: a job must start, run and end inside the call that started it.
ZERO_GPU = os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")
CSS = """
.tinv-header {display:flex; gap:1rem; align-items:center}
.tinv-header img {width:64px; height:64px}
.tinv-header h1 {margin:0}
.tinv-progress .tinv-bar {height:14px; border-radius:7px; background:var(--neutral-200); overflow:hidden}
.tinv-progress .tinv-bar > div {height:100%; transition:width .3s}
.tinv-progress p {margin:.4rem 0 0 0}
.tinv-card {border:1px solid var(--border-color-primary); border-radius:var(--radius-lg); padding:0 1rem}
.tinv-warning {border-left:4px solid #d68910; padding:.5rem 1rem; background:rgba(214,137,16,.08)}
"""

def hub_status(model: str = DEFAULT_MODEL, timeout: float = 4.0) -> tuple[bool, str]:
    """Whether `model` can be loaded from the Hub (or its cache): (ok, reason when not)."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "model_index.json"), str):
        return True, ""
    if constants.HF_HUB_OFFLINE:
        return False, "the Hub is switched off on this machine (HF_HUB_OFFLINE=1)"
    try:
        HfApi().model_info(model, timeout=timeout)
        return True, ""
    except Exception as error:  # noqa: BLE001 - any failure means: not reachable from here
        return False, f"the Hugging Face Hub cannot be reached from this computer ({type(error).__name__})"


def on_gpu(fn, duration=120, outputs: list | None = None):
    """`fn` under ZeroGPU's `spaces.GPU` when the `spaces` package is installed; as is otherwise.

    `duration` is seconds, or a function of fn's arguments giving them. ZeroGPU sends every result
    from the GPU process to the server pickled, where a dict keyed by components would arrive as
    copies Gradio does not know: with `outputs`, such dicts are sent as a list in that order."""
    try:
        import spaces
    except ImportError:
        return fn
    if outputs is not None:
        fn = _results_as_lists(fn, outputs)
    return spaces.GPU(duration=duration)(fn)


def _results_as_lists(fn, outputs: list):
    def as_list(result):
        return [result.get(component, gr.skip()) for component in outputs] if isinstance(result, dict) else result

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def following(*args, **kwargs):
            for result in fn(*args, **kwargs):
                yield as_list(result)

        return following

    @functools.wraps(fn)
    def once(*args, **kwargs):
        return as_list(fn(*args, **kwargs))

    return once


def training_duration(model, token, init, preset, captions, request=None, **options) -> int:
    """Seconds of GPU to ask ZeroGPU for one training: the preset's steps at its rough GPU speed,
    plus loading, within ZeroGPU's limits. A run cut short there keeps its last saved embedding."""
    chosen = method_with_label(preset)
    steps = int(options.get("steps") or chosen.defaults.get("steps") or 0)
    return int(min(max(120 + 1.5 * steps * chosen.preset.s_per_step_gpu, 120), MAX_GPU_DURATION_S))


def _embedding_label(ws: Workspace, path: Path) -> str:
    """How an embedding is listed in the Playground: its token, where it came from, how it was made."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - a broken file still gets listed, by name
        meta = {}
    if path.parent.parent == ws.runs:
        where = "trained " + time.strftime("%H:%M:%S", time.localtime(path.stat().st_mtime))
    else:
        where = f"loaded from {path.name}"
    details = ", ".join(x for x in (meta.get("method"), f"{meta['steps']} steps" if meta.get("steps") else None) if x)
    return f"{meta.get('token', path.stem)} · {where}" + (f" ({details})" if details else "")


class TinvApp:
    """The page's state and handlers: one Engine, the visitors' folders, each visitor's job."""

    def __init__(self, engine: Engine | None = None, workspaces: Workspaces | None = None, hub: tuple[bool, str] | None = None):
        self.engine = engine or Engine()
        self.workspaces = workspaces or Workspaces()
        self.workspaces.in_use = lambda key: key in self.jobs and not self.jobs[key].done
        self.hub_ok, self.hub_reason = hub if hub is not None else hub_status()
        self.jobs: dict[str, Job] = {}  # visitor key -> their latest training job
        self.speeds: dict[str, float] = {}  # method -> measured seconds per step on this machine
        self.job_methods: dict[str, str] = {}  # job id -> its method, to file its speed under
        self.prompt_jobs: dict[str, Job] = {}  # visitor key -> their latest prompt-from-image job
        # On a shared server, visitors may name Hub models only, not files of the server.
        self.shared = bool(os.environ.get("SPACE_ID") or os.environ.get("TINV_GUI_SHARED"))
        # Page session -> the visitor's lasting key, kept in their browser, so that coming back
        # (reload, closed tab) finds their folder and their last run again. Oldest dropped first.
        self.returning: OrderedDict[str, str] = OrderedDict()

    def workspace(self, request: gr.Request | None) -> Workspace:
        """The visitor's folder: by the key their browser keeps, else by this page's session."""
        session = getattr(request, "session_hash", None)
        ws = self.workspaces.get(self.returning.get(session, session))
        ws.touch()
        return ws

    def welcome(self, stored_key: str | None, request: gr.Request) -> dict:
        """On page load: give the browser a lasting key (or take back the one it kept), and show
        that visitor's pictures, embeddings and last run, finished or still going."""
        key = stored_key if stored_key and self.workspaces.exists(stored_key) else secrets.token_urlsafe(18)
        self.returning[request.session_hash] = key
        while len(self.returning) > MAX_RETURNING:
            self.returning.popitem(last=False)
        ws = self.workspace(request)
        c = self.components
        gallery, captions, status = self.dataset_view(ws)
        shown = {c["visitor"]: key, c["gallery"]: gallery, c["captions"]: captions, c["dataset_status"]: status}
        shown[c["embedding"]] = gr.update(choices=self.embedding_choices(ws))
        job = self.jobs.get(ws.key)
        if job is not None:
            shown.update(self._train_outputs(ws, RunView.from_events(list(job.history), self.engine.position(job))))
            if not job.done:  # Start rejoins a running job
                shown[c["start"]] = gr.update(interactive=True, value="Follow my running training")
        return shown

    # ----------------------------------------------------------------------------- Dataset
    def dataset_view(self, ws: Workspace, message: str = ""):
        pictures = dataset.list_pictures(ws)
        refused = [p for p in pictures if p.problem]
        usable = len(pictures) - len(refused)
        status = f"**{usable} picture(s) ready to train on.**" if pictures else "No pictures yet."
        if refused:
            status += f" {len(refused)} refused (marked ✗ in the gallery):\n" + "".join(f"\n- {p.name}: {p.problem}" for p in refused)
        if usable and usable < 3:
            status += " Three to ten pictures work best (the *From one picture* method needs only one)."
        return dataset.gallery_items(ws), dataset.caption_rows(ws), (message + "\n\n" if message else "") + status

    def add_pictures(self, files: list[str] | None, request: gr.Request):
        """Take uploaded pictures (or zips of them) into the visitor's folder."""
        ws = self.workspace(request)
        added = dataset.add_files(ws, files or [])
        refused = [p for p in added if p.problem]
        message = f"Added {len(added) - len(refused)} picture(s)." + (f" Refused {len(refused)}." if refused else "")
        return (*self.dataset_view(ws, message), None)

    def add_examples(self, request: gr.Request):
        """Load the example pictures shipped in assets/examples."""
        ws = self.workspace(request)
        dataset.add_files(ws, sorted(str(p) for p in EXAMPLES_DIR.glob("*.png")))
        return self.dataset_view(ws, "Example pictures added: a small toy robot. Try the token `<toy-robot>` and the initializer `robot`.")

    def clear_pictures(self, request: gr.Request):
        ws = self.workspace(request)
        dataset.clear(ws)
        return self.dataset_view(ws, "All pictures removed.")

    def save_captions(self, rows, request: gr.Request) -> str:
        ws = self.workspace(request)
        saved = dataset.save_captions(ws, _rows(rows))
        return f"{saved} caption(s) saved."

    def auto_caption(self, model: str, request: gr.Request):
        """HOOK (issue 3): caption every picture with BLIP, then show the captions for editing."""
        ws = self.workspace(request)
        paths = [str(p) for p in dataset.picture_paths(ws)]
        if not paths:
            raise gr.Error("Add pictures first.")
        captions = hooks.auto_caption(paths, model)
        dataset.save_captions(ws, [[Path(p).name, c] for p, c in zip(paths, captions)])
        return dataset.caption_rows(ws), f"{len(captions)} caption(s) written; edit them as you like."

    # ----------------------------------------------------------------------------- Method
    def method_help(self, label: str) -> str:
        """What the chosen preset does, when to pick it, and how long it should take here."""
        method = method_with_label(label)
        preset = method.preset
        steps = method.defaults.get("steps") or 0
        placement = choose_placement()
        measured = self.speeds.get(method.name)
        per_step = measured or (preset.s_per_step_gpu if placement.device.type == "cuda" else preset.s_per_step_cpu)
        how = "measured on this machine" if measured else f"a rough figure for {placement.describe()} with Stable Diffusion 1.5"
        return (
            f"**{preset.label}** takes about {format_seconds(steps * per_step)} for its {steps} steps "
            f"({how}; the demo model is much faster)."
        )

    def preset_changed(self, label: str):
        """Show the preset's explanation and fill the Advanced options with its method's defaults."""
        defaults = method_with_label(label).defaults
        updates = [gr.update(value=defaults[name]) if name in defaults else gr.update() for name, _, _ in option_fields()]
        return (self.method_help(label), *updates)

    # ----------------------------------------------------------------------------- Train
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
        if self.shared and model not in (*DEMO_NAMES, SDXL_DEMO_NAME) and (not HUB_ID.match(model) or Path(model).exists()):
            raise gr.Error("On this shared server, models come from the Hugging Face Hub (owner/name) or are the demo model.")
        if not dataset.picture_paths(ws):
            raise gr.Error("There are no pictures to train on: add some on the Dataset tab first.")
        dataset.save_captions(ws, _rows(captions))
        method = method_with_label(preset).name
        if (options.get("resume") or "").strip():  # only the visitor's own files, named as the Playground lists them
            resume = ws.root / options["resume"].strip()
            if not ws.contains(resume) or not resume.is_file():
                raise gr.Error(f"Resume from: {options['resume'].strip()!r} is not one of your embeddings; pick a name the Playground lists.")
            options = {**options, "resume": str(resume.resolve())}
        try:
            validate_token(token, self.engine.store.tokenizer(model))
            settings = TrainSettings(
                images=str(ws.pictures),
                token=token.strip(),
                output_dir=str(ws.new_run_dir(token)),
                method=method,
                model=model,
                init=(init or "").strip() or None,
                **settings_from_form(method, options),
            )
            job = self.engine.train(settings)
        except (TokenError, SettingsError, ModelLoadError, ValueError) as error:
            raise gr.Error(str(error)) from None
        self.jobs[ws.key] = job
        self.job_methods[job.id] = method
        return job

    def _follow(self, ws: Workspace, job: Job):
        """Yield the Train tab's state whenever the job has news, until it ends."""
        try:
            yield from self._follow_events(ws, job)
        finally:
            if ZERO_GPU and not job.done:  # the visitor left: end the job while the GPU is still ours
                job.cancel()
                deadline = time.monotonic() + 120
                while not job.done and time.monotonic() < deadline:
                    time.sleep(POLL_S)

    def _follow_events(self, ws: Workspace, job: Job):
        seen = -1
        while True:
            if ws.take_stop_request():
                job.cancel()
            history = list(job.history)
            ended = bool(history) and isinstance(history[-1], TERMINAL_EVENTS)
            if len(history) != seen or ended:
                seen = len(history)
                view = RunView.from_events(history, self.engine.position(job))
                yield self._train_outputs(ws, view)
            if ended:
                if view.progress:
                    last = view.progress[-1]
                    self.speeds[self.job_methods.get(job.id, "")] = last.elapsed_s / max(last.step, 1)
                return
            time.sleep(POLL_S)

    def _train_outputs(self, ws: Workspace, view: RunView) -> dict:
        c = self.components
        embedding = view.outputs.get("embedding")
        files = hooks.export_formats(ws.inside(embedding)) if view.done and embedding else []
        legend = "".join(f"\n- `{path.name}`: {tools}" for path, tools in files)
        return {
            c["progress"]: view.progress_html(),
            c["loss_plot"]: gr.update(value=view.loss_frame(), color_map=loss_colours(view.progress)),
            c["previews"]: gr.update(value=view.previews or None, visible=bool(view.previews)),  # only methods that draw
            c["log"]: view.log_text(),
            c["downloads"]: [str(path) for path, _ in files] or None,
            c["download_help"]: f"**Which file for which tool:**{legend}" if files else "",
            c["start"]: gr.update(interactive=view.done, value="Start training"),
            c["stop"]: gr.update(interactive=not view.done),
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

    # ----------------------------------------------------------------------------- Playground
    def embedding_files(self, ws: Workspace) -> list[Path]:
        """The visitor's embeddings, newest first: trained here or loaded from a file."""
        loaded = [p for p in ws.embeddings.iterdir() if p.is_file() and not p.name.startswith(".")]  # not scaled copies
        files = list(ws.runs.glob(f"*/{EMBEDDING_FILE}")) + loaded
        return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)

    def embedding_choices(self, ws: Workspace) -> list[tuple[str, str]]:
        return [("No embedding (the model alone)", NO_EMBEDDING)] + [
            (_embedding_label(ws, p), str(p.relative_to(ws.root))) for p in self.embedding_files(ws)
        ]

    def refresh_embeddings(self, current: str | None, request: gr.Request):
        choices = self.embedding_choices(self.workspace(request))
        values = [v for _, v in choices]
        return gr.update(choices=choices, value=current if current in values else values[min(1, len(values) - 1)])

    def load_embedding_file(self, file: str | None, request: gr.Request):
        """Copy an embedding file (this app's, diffusers', AUTOMATIC1111's, kohya's) into the
        visitor's folder and select it."""
        ws = self.workspace(request)
        if not file:
            return gr.update(), ""
        target = unique_path(ws.embeddings, sanitize_filename(Path(file).name, "embedding"))
        shutil.copyfile(file, target)
        try:
            embedding = read_embedding(str(target))
        except Exception as error:  # noqa: BLE001 - any unreadable file gets the same plain answer
            target.unlink()
            raise gr.Error(f"{Path(file).name} is not an embedding file this app can read ({error}).") from None
        choices = self.embedding_choices(ws)
        token, widths = embedding.token, " + ".join(str(w) for w in embedding.widths)  # SDXL's has two
        message = f"Loaded `{token}` ({embedding.vectors.shape[0]} vector(s) of width{'s' if '+' in widths else ''} {widths}). Put `{token}` in your prompt."
        return gr.update(choices=choices, value=str(target.relative_to(ws.root))), message

    def try_in_playground(self, request: gr.Request):
        """Carry the visitor's latest embedding to the Playground, with a prompt that uses it."""
        ws = self.workspace(request)
        files = [p for p in self.embedding_files(ws) if p.parent.parent == ws.runs]
        if not files:
            raise gr.Error("Train an embedding first.")
        token = read_embedding(files[0]).token
        return (
            gr.Tabs(selected="playground"),
            gr.update(choices=self.embedding_choices(ws), value=str(files[0].relative_to(ws.root))),
            f"a photo of {token}",
        )

    def generate(self, model, embedding, prompt, negative, steps, guidance, seed, sampler, size, count, strength, compare, request: gr.Request):
        """Pictures for the prompt with the chosen embedding and, with `compare`, the same seeds without it."""
        ws = self.workspace(request)
        prompt = (prompt or "").strip()
        if not prompt:
            raise gr.Error("Type a prompt first.")
        try:  # the values are checked where they enter, as the command line's are
            steps, seed = whole_number("steps", steps), whole_number("seed", seed)
            GenerateSettings(model=model, prompt=prompt, negative=negative, steps=steps, guidance=float(guidance), seed=seed).check()
        except SettingsError as error:
            raise gr.Error(str(error)) from None
        path = self._own_embedding(ws, embedding)
        token = read_embedding(path).token if path else None
        note = f"Your prompt does not contain `{token}`, so the embedding has no effect on it." if token and token not in prompt else ""
        out = unique_path(ws.images, time.strftime("%Y%m%d-%H%M%S"))
        runs = [("with", path)] + ([("without", None)] if compare and path else [])
        options = dict(
            negative=(negative or "").strip() or None, steps=int(steps), guidance=float(guidance), seed=int(seed),
            size=SIZES.get(size), count=int(count), placement=choose_placement(),
        )

        def work(reporter):
            pipe = self.engine.store.pipeline(model)
            saved = {}
            out.mkdir(parents=True)
            for name, file in runs:
                pictures = hooks.generate_images(pipe, prompt, sampler, embedding=file, strength=float(strength), **options)
                for i, picture in enumerate(pictures):
                    saved[f"{name}-{i}"] = str(out / f"{name}-{i}.png")
                    picture.save(saved[f"{name}-{i}"])
            return saved

        final = self.engine.submit(f"generate {prompt!r} on {model}", work).wait()
        if not isinstance(final, TERMINAL_EVENTS) or final.kind == "failed":
            raise gr.Error(getattr(final, "message", "generation failed"))

        def pictures(name: str) -> list[Path] | None:
            return [ws.inside(p) for k, p in final.outputs.items() if k.startswith(name + "-")] or None

        return pictures("with"), pictures("without"), note or f"Seed {int(seed)}."

    def _own_embedding(self, ws: Workspace, choice: str | None) -> Path | None:
        """The visitor's embedding file for a Playground choice; None for "no embedding"."""
        if not choice or choice == NO_EMBEDDING:
            return None
        try:
            path = ws.inside(ws.root / choice)
        except PermissionError:
            raise gr.Error("That embedding is not one of your files.") from None
        if not path.is_file():
            raise gr.Error("That embedding is not one of your files.")
        return path

    def measure(self, model, embedding, prompt, steps, seed, request: gr.Request):
        """Score the chosen embedding as the textual inversion paper does (tinv_gui.evaluate),
        against its initializer word, showing progress until the figures come."""
        from ..evaluate import EvalSettings

        ws = self.workspace(request)
        path = self._own_embedding(ws, embedding)
        if path is None:
            raise gr.Error("Choose an embedding to measure.")
        if not dataset.picture_paths(ws):
            raise gr.Error("Measuring compares with the pictures it learned from: add them on the Dataset tab.")
        token = read_embedding(path).token
        prompt = prompt if token in (prompt or "") else f"a photo of {token}"
        try:
            settings = EvalSettings(
                model=model, embedding=str(path), images=str(ws.pictures), prompt=prompt, n=EVAL_PICTURES,
                steps=whole_number("steps", steps), seed=whole_number("seed", seed),
            )
            job = self.engine.evaluate(settings)
        except (SettingsError, ValueError) as error:
            raise gr.Error(str(error)) from None
        while True:
            view = RunView.from_events(list(job.history), self.engine.position(job))
            if not view.done or view.status == "failed" or not view.metrics:
                yield view.summary("Measuring") if not view.done else f"No figures: {view.message or 'stopped'}"
            else:
                m = view.metrics
                yield (
                    f"Measured on {EVAL_PICTURES} pictures each, prompt `{prompt}`:\n\n"
                    "| | looks like your pictures (CLIP image similarity) | follows the rest of the prompt (CLIP text similarity) |\n"
                    "|---|---|---|\n"
                    f"| with `{token}` | {m['clip_image_similarity']:.3f} | {m['clip_text_similarity']:.3f} |\n"
                    f"| with the starting word instead | {m['baseline_clip_image_similarity']:.3f} | {m['baseline_clip_text_similarity']:.3f} |\n\n"
                    "Higher is better. A good embedding beats its starting word on the first column without losing much on the second."
                )
            if view.done:
                return
            time.sleep(POLL_S)

    # ----------------------------------------------------------------------------- Prompt from image
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
            job = hooks.submit_prompt_search(self.engine, str(target), model, bool(readable), int(steps or 0) or None, str(ws.new_run_dir("prompt")))
        except (SettingsError, ValueError) as error:
            raise gr.Error(str(error)) from None
        self.prompt_jobs[ws.key] = job
        while True:
            view = RunView.from_events(list(job.history), self.engine.position(job))
            similarity = [(p.step, hooks.similarity_from_loss(p.loss)) for p in view.progress]
            frame = pd.DataFrame(similarity, columns=["step", "similarity"]).astype({"step": "int64", "similarity": "float64"})
            prompt = ""
            if view.outputs.get("prompt"):
                prompt = ws.inside(view.outputs["prompt"]).read_text(encoding="utf-8").strip()
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

    def generate_found(self, model, request: gr.Request):
        """A picture from the prompt found last (its words, or its continuous prompt_embeds)."""
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

        def work(reporter):
            pictures = hooks.generate_images(self.engine.store.pipeline(model), placement=choose_placement(), **found)
            pictures[0].save(out)
            return {"picture": str(out)}

        final = self.engine.submit(f"generate from a found prompt on {model}", work).wait()
        if final.kind == "failed":
            raise gr.Error(final.message)
        return [ws.inside(final.outputs["picture"])]

    # ----------------------------------------------------------------------------- The page
    def build(self) -> gr.Blocks:
        """The Blocks page. Handlers are this object's methods."""
        presets = [m.preset for m in METHODS.values()]
        default_model = DEFAULT_MODEL if self.hub_ok else DEMO_MODEL
        c: dict[str, gr.components.Component] = {}
        self.components = c
        with gr.Blocks(title="tinv-gui", delete_cache=(3600, 24 * 3600)) as page:
            c["visitor"] = gr.BrowserState("", storage_key="tinv-gui-visitor")
            logo = LOGO.read_text() if LOGO.exists() else ""  # inline: no file route needed
            gr.HTML(f'<div class="tinv-header">{logo}<div><h1>{TITLE}</h1></div></div>')
            gr.Markdown(INTRO)
            if not self.hub_ok:
                gr.Markdown(
                    f"**Stable Diffusion 1.5 cannot be downloaded right now:** {self.hub_reason}. The offline "
                    "**demo model** is selected instead. Everything works with it, but its weights are random, so "
                    "the pictures it draws are noise. To use a real model, connect to the internet, or type the "
                    "path of a model folder or a .safetensors/.ckpt file in *Model* on the Method tab.",
                    elem_classes="tinv-warning",
                )
            with gr.Tabs() as tabs:
                with gr.Tab("1. Dataset", id="dataset"):
                    gr.Markdown(
                        "Add 3 to 10 pictures of your concept: different backgrounds and angles, the concept clearly "
                        "visible. The gallery shows each picture as the model will see it (turned upright, cropped "
                        "to a square). Pictures with a problem are refused, and the reason is shown under them."
                    )
                    with gr.Row():
                        with gr.Column(scale=1):
                            c["upload"] = gr.File(
                                label="Drop pictures or a .zip here",
                                file_count="multiple",
                                file_types=["image", ".zip", ".txt"],
                            )
                            with gr.Row():
                                c["examples"] = gr.Button("Use the example pictures", size="sm")
                                c["clear"] = gr.Button("Remove all pictures", size="sm", variant="stop")
                            c["dataset_status"] = gr.Markdown("No pictures yet.")
                        with gr.Column(scale=2):
                            c["gallery"] = gr.Gallery(label="What will be trained on", columns=4, height=360, object_fit="cover")
                    c["captions"] = gr.Dataframe(
                        headers=["Picture", "Caption"],
                        type="array",
                        label="Captions (optional: used when 'Train on captions' is on, and by the 'From one picture' method)",
                        interactive=True,
                        static_columns=[0],
                        wrap=True,
                    )
                    with gr.Row():
                        c["save_captions"] = gr.Button("Save captions", size="sm")
                        c["auto_caption"] = gr.Button(
                            "Auto-caption (BLIP)", size="sm", visible=hooks.auto_caption_available()
                        )
                    c["caption_status"] = gr.Markdown()

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
                        defaults = option_defaults(next(iter(METHODS)))
                        fields = option_fields()
                        for start in range(0, len(fields), 4):
                            with gr.Row(equal_height=True):
                                for name, spec, kind in fields[start : start + 4]:
                                    c["options"][name] = option_component(name, spec, kind, defaults[name])

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
                        )
                        c["previews"] = gr.Gallery(
                            label="Previews (same seed and prompt, as training goes)", columns=3, height=320, scale=1, visible=False
                        )
                    with gr.Row():
                        c["log"] = gr.Textbox(label="Log", lines=8, max_lines=12, autoscroll=True, scale=2)
                        with gr.Column(scale=1):
                            c["downloads"] = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")
                            c["download_help"] = gr.Markdown()
                            c["try_it"] = gr.Button("Try it in the Playground", interactive=False)
                            c["stop_status"] = gr.Markdown()

                with gr.Tab("4. Playground", id="playground"):
                    with gr.Row():
                        with gr.Column(scale=1):
                            c["embedding"] = gr.Dropdown(
                                [("No embedding (the model alone)", NO_EMBEDDING)],
                                value=NO_EMBEDDING,
                                label="Embedding",
                                info="Trained here, or loaded from a file below. Pictures are drawn with the model chosen on the Method tab.",
                            )
                            c["embedding_file"] = gr.File(
                                label="Load an embedding file (this app's, diffusers', AUTOMATIC1111's or kohya's)",
                                file_types=[".safetensors", ".pt", ".bin"],
                            )
                            c["embedding_status"] = gr.Markdown()
                            c["prompt"] = gr.Textbox(
                                "a photo of <my-concept>", label="Prompt", info="Use your new word in it.", elem_id="playground-prompt"
                            )
                            c["negative"] = gr.Textbox("", label="Negative prompt", placeholder="e.g. blurry, low quality")
                            with gr.Row():
                                c["gen_steps"] = gr.Slider(1, 100, 25, step=1, label="Steps", info="More: finer, slower.", elem_id="gen-steps")
                                c["guidance"] = gr.Slider(1, 15, 7.5, step=0.5, label="Guidance", info="How closely to follow the prompt.")
                            with gr.Row():
                                c["seed"] = gr.Number(0, label="Seed", precision=0, info="Same seed, same picture.")
                                c["count"] = gr.Slider(1, 4, 1, step=1, label="Pictures")
                            with gr.Row():
                                c["sampler"] = gr.Dropdown(list(hooks.SAMPLERS), value="Model default", label="Sampler")
                                c["size"] = gr.Dropdown(list(SIZES), value="Model default", label="Size")
                            c["strength"] = gr.Slider(
                                0, 2, 1, step=0.05, label="Strength", info="Scales the learned vectors: below 1 weaker, above 1 stronger."
                            )
                            c["compare"] = gr.Checkbox(True, label="Also draw the same seeds without the embedding")
                            c["generate"] = gr.Button("Generate", variant="primary")
                        with gr.Column(scale=2):
                            with gr.Row():
                                c["with"] = gr.Gallery(label="With the embedding", columns=2, height=420, elem_id="playground-with")
                                c["without"] = gr.Gallery(label="Without (same seeds)", columns=2, height=420, elem_id="playground-without")
                            c["generate_status"] = gr.Markdown()
                            c["measure"] = gr.Button("Measure how good it is")
                            c["scores"] = gr.Markdown(
                                f"Draws {EVAL_PICTURES} pictures with the embedding and {EVAL_PICTURES} with its starting word, "
                                "and compares both with your training pictures and with the prompt (CLIP similarity)."
                            )

                with gr.Tab("5. Prompt from image", id="prompt-from-image"):
                    gr.Markdown(
                        "Upload one picture and let the model find the prompt that describes it best, in its own "
                        "terms. *Readable* gives words you can copy into any Stable Diffusion tool; *continuous* "
                        "matches more closely but has no words, so it only works here."
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

            c["tabs"] = tabs
            self._wire(page, c)
        return page

    def _wire(self, page: gr.Blocks, c: dict) -> None:
        dataset_out = [c["gallery"], c["captions"], c["dataset_status"]]
        train_outputs = [c[k] for k in ("progress", "loss_plot", "previews", "log", "downloads", "download_help", "start", "stop", "try_it", "embedding")]
        page.load(self.welcome, c["visitor"], [c["visitor"], *dataset_out, *train_outputs], api_name=False)
        c["upload"].upload(self.add_pictures, c["upload"], dataset_out + [c["upload"]], api_name="add_pictures")
        c["examples"].click(self.add_examples, None, dataset_out, api_name="add_examples")
        c["clear"].click(self.clear_pictures, None, dataset_out, api_name="clear_pictures")
        c["save_captions"].click(self.save_captions, c["captions"], c["caption_status"], api_name="save_captions")
        if hooks.auto_caption_available():
            c["auto_caption"].click(
                on_gpu(self.auto_caption), c["model"], [c["captions"], c["caption_status"]], concurrency_id="gpu", concurrency_limit=1
            )

        option_components = list(c["options"].values())
        c["preset"].change(self.preset_changed, c["preset"], [c["method_help"], *option_components], api_name=False)

        c["start"].click(
            on_gpu(self.start_training, duration=training_duration, outputs=train_outputs),
            [c["model"], c["token"], c["init"], c["preset"], c["captions"]],
            train_outputs,
            inputs_kwargs=c["options"],
            api_name="train",
            show_progress="hidden",  # the page draws its own progress bar
            concurrency_id="gpu",
            concurrency_limit=1,
        )
        c["stop"].click(self.stop_training, None, c["stop_status"], api_name="stop", queue=False)
        c["try_it"].click(self.try_in_playground, None, [c["tabs"], c["embedding"], c["prompt"]], api_name=False)

        c["embedding_file"].upload(
            self.load_embedding_file, c["embedding_file"], [c["embedding"], c["embedding_status"]], api_name="load_embedding"
        )
        c["embedding"].focus(self.refresh_embeddings, c["embedding"], c["embedding"], api_name="embeddings")
        c["generate"].click(
            on_gpu(self.generate),
            [c[k] for k in ("model", "embedding", "prompt", "negative", "gen_steps", "guidance", "seed", "sampler", "size", "count", "strength", "compare")],
            [c["with"], c["without"], c["generate_status"]],
            api_name="generate",
            concurrency_id="gpu",
            concurrency_limit=1,
        )

        c["measure"].click(
            on_gpu(self.measure),
            [c[k] for k in ("model", "embedding", "prompt", "gen_steps", "seed")],
            c["scores"],
            api_name="measure",
            show_progress="hidden",
            concurrency_id="gpu",
            concurrency_limit=1,
        )

        c["pfi_run"].click(
            on_gpu(self.find_prompt),
            [c["model"], c["pfi_image"], c["pfi_readable"], c["pfi_steps"]],
            [c["pfi_progress"], c["pfi_plot"], c["pfi_prompt"]],
            api_name="find_prompt",
            show_progress="hidden",
            concurrency_id="gpu",
            concurrency_limit=1,
        )
        c["pfi_generate"].click(
            on_gpu(self.generate_found), c["model"], c["pfi_picture"], api_name="generate_found", concurrency_id="gpu", concurrency_limit=1
        )


def _rows(table) -> list[list]:
    """Rows of a Dataframe value, whatever shape Gradio hands over."""
    if table is None:
        return []
    if hasattr(table, "values") and hasattr(table, "columns"):
        return table.values.tolist()
    if isinstance(table, dict):
        return table.get("data") or []
    return list(table)


def build_app(**kwargs) -> tuple[gr.Blocks, TinvApp]:
    """The page and the object behind it (kwargs go to TinvApp: engine, workspaces, hub)."""
    app = TinvApp(**kwargs)
    page = app.build()
    page.queue(default_concurrency_limit=4)
    return page, app


def launch(**launch_kwargs):
    """Build and serve the page; GRADIO_SERVER_PORT and GRADIO_SERVER_NAME are honoured."""
    page, app = build_app()
    allowed = [] if _under_served_roots(app.workspaces.root) else [str(app.workspaces.root)]
    return page.launch(
        theme=gr.themes.Soft(primary_hue="indigo"),
        css=CSS,
        favicon_path=str(LOGO) if LOGO.exists() else None,
        allowed_paths=allowed,
        max_file_size="200mb",
        footer_links=["gradio", "settings"],
        **launch_kwargs,
    )


def _under_served_roots(path: Path) -> bool:
    """True when Gradio may hand out files from `path` without adding it to allowed_paths (which
    would also make its files directly reachable by URL)."""
    resolved = path.resolve()
    return any(resolved.is_relative_to(Path(root).resolve()) for root in (tempfile.gettempdir(), os.getcwd()))
