"""The Gradio page: five tabs (Dataset, Method, Train, Playground, Prompt from image).

The page holds no training logic. It builds TrainSettings, submits jobs to one shared Engine
(whose ModelStore keeps models warm between runs) and follows each job's events to draw the
progress, the loss curve, the previews, the log and the downloads. Every visitor works in a
folder of their own (see workspace.py). Each tab's controls and handlers are in its own module
(tab_*.py); TinvApp joins them, holds the state they share, and builds and serves the page.
"""

from __future__ import annotations

import os
import secrets
from collections import OrderedDict

import gradio as gr

from ..demo_model import ASSETS_DIR
from ..engine import Engine, Job
from ..models import DEFAULT_MODEL
from .host import host_flag, host_number
from .limits import VisitorLimits
from .progress import RunView
from .tab_dataset import DatasetTab
from .tab_method import MethodTab
from .tab_playground import PlaygroundTab
from .tab_prompt import PromptTab
from .tab_train import TrainTab
from .workspace import Workspace, Workspaces

TITLE = "tinv-gui: teach Stable Diffusion a new word"
INTRO = (
    "Show the model a few pictures of something (your cat, a mug, a drawing style), give it a new "
    "made-up word such as `<my-cat>`, and tinv-gui learns what that word should mean. The model "
    "itself is not changed: you get a small embedding file (a few kilobytes) that you can use in "
    "prompts here, in diffusers, or in AUTOMATIC1111 and ComfyUI. Work through the tabs from left to "
    "right: add pictures, pick a method, train, then try your word in the Playground."
)
LOGO = ASSETS_DIR / "logo.svg"
MAX_RETURNING = 10_000
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


class TinvApp(DatasetTab, MethodTab, TrainTab, PlaygroundTab, PromptTab):
    """The page's state and handlers: one Engine, the visitors' folders, each visitor's job.
    The handlers of each tab come from its tab_*.py class."""

    def __init__(self, engine: Engine | None = None, workspaces: Workspaces | None = None, hub: tuple[bool, str] | None = None):
        self.engine = engine or Engine()
        self.workspaces = workspaces or Workspaces()
        self.workspaces.in_use = lambda key: key in self.jobs and not self.jobs[key].done
        self.hub_ok, self.hub_reason = hub if hub is not None else hub_status()
        self.jobs: dict[str, Job] = {}  # visitor key -> their latest training job
        self.speeds: dict[str, float] = {}  # method -> measured seconds per step on this machine
        self.job_methods: dict[str, str] = {}  # job id -> its method, to file its speed under
        self.prompt_jobs: dict[str, Job] = {}  # visitor key -> their latest prompt-from-image job
        self.crop_views: dict[str, tuple[bool, int, int]] = {}  # visitor key -> (buckets, resolution, size multiple) the Dataset tab shows crops for
        # On a shared server, visitors may name Hub models only, not files of the server.
        self.shared = bool(os.environ.get("SPACE_ID")) or host_flag("TINV_GUI_SHARED")
        self.engine.store.hub_only = self.shared  # for every field naming a model, in every tab
        if self.shared:  # one visitor's job cannot hold the queue for ever
            self.engine.time_limit_s = host_number("TINV_GUI_MAX_JOB_MINUTES") * 60
        # ... nor with many generations, measurements or prompt searches (limits.py).
        self.visitor_limits = VisitorLimits.from_env() if self.shared else None
        self.followers: dict[str, int] = {}  # job id -> pages following it now
        # Page session -> the visitor's lasting key, kept in their browser, so that coming back
        # (reload, closed tab) finds their folder and their last run again. Oldest dropped first.
        self.returning: OrderedDict[str, str] = OrderedDict()

    def workspace(self, request: gr.Request | None) -> Workspace:
        """The visitor's folder: by the key their browser keeps, else by this page's session."""
        session = getattr(request, "session_hash", None)
        ws = self.workspaces.get(self.returning.get(session, session))
        ws.touch()
        return ws

    def limited(self, handler):
        """`handler` counted against its visitor's limits on a shared server; as is otherwise."""
        if self.visitor_limits is None:
            return handler
        return self.visitor_limits.wrap(handler, lambda request: self.workspace(request).key)

    def welcome(self, stored_key: str | None, request: gr.Request) -> dict:
        """On page load: give the browser a lasting key (or take back the one it kept), and show
        that visitor's pictures, embeddings and last run, finished or still going."""
        key = stored_key if stored_key and self.workspaces.exists(stored_key) else secrets.token_urlsafe(18)
        self._remember(request.session_hash, key)
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

    def _remember(self, session: str, key: str) -> None:
        """Map a page session to the visitor's key, keeping the table at about MAX_RETURNING
        entries: the oldest idle visitors are forgotten first (they come back with an empty
        folder, which is what they had); visitors with a job running or files in their folder
        are never dropped, however many pages others load."""
        self.returning[session] = key
        for _ in range(len(self.returning) - MAX_RETURNING):
            oldest, oldest_key = next(iter(self.returning.items()))
            if self._holds_something(oldest_key):
                self.returning.move_to_end(oldest)
            else:
                del self.returning[oldest]

    def _holds_something(self, key: str) -> bool:
        running = any(key in jobs and not jobs[key].done for jobs in (self.jobs, self.prompt_jobs))
        return running or self.workspaces.holds_files(key)

    # ----------------------------------------------------------------------------- The page
    def build(self) -> gr.Blocks:
        """The Blocks page. Handlers are this object's methods."""
        c: dict[str, gr.components.Component] = {}
        self.components = c
        with gr.Blocks(title="tinv-gui", delete_cache=(3600, 24 * 3600)) as page:
            c["visitor"] = gr.BrowserState("", storage_key="tinv-gui-visitor", secret=self.workspaces.secret())
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
                self.build_dataset_tab(c)
                self.build_method_tab(c)
                self.build_train_tab(c)
                self.build_playground_tab(c)
                self.build_prompt_tab(c)
            c["tabs"] = tabs
            page.load(self.welcome, c["visitor"], [c["visitor"], *self.dataset_outputs(), *self.train_outputs()], api_name=False)
            self.wire_dataset_tab(c)
            self.wire_method_tab(c)
            self.wire_train_tab(c)
            self.wire_playground_tab(c)
            self.wire_prompt_tab(c)
        return page


def resolve_library_names() -> None:
    """Import the model libraries' classes that the page's threads and the engine's import on
    first use, once, before visitors come. transformers resolves its names lazily, and not
    safely across threads: two visitors starting a training at the same moment on a fresh server
    got "cannot import name 'CLIPTokenizer' from 'transformers'" (benchmarks/load_test.py)."""
    import diffusers
    import transformers

    for name in ("CLIPTokenizer", "T5TokenizerFast", "CLIPTextConfig", "T5Config", "CLIPModel", "CLIPTextModel",
                 "CLIPTextModelWithProjection", "T5EncoderModel"):
        getattr(transformers, name)
    diffusers.DiffusionPipeline  # noqa: B018 - resolves diffusers' lazy name and the pipelines' imports


def build_app(**kwargs) -> tuple[gr.Blocks, TinvApp]:
    """The page and the object behind it (kwargs go to TinvApp: engine, workspaces, hub)."""
    app = TinvApp(**kwargs)
    page = app.build()
    page.queue(default_concurrency_limit=4)
    return page, app


def launch(**launch_kwargs):
    """Build and serve the page; GRADIO_SERVER_PORT and GRADIO_SERVER_NAME are honoured."""
    page, _app = build_app()
    resolve_library_names()
    return page.launch(
        theme=gr.themes.Soft(primary_hue="indigo"),
        css=CSS,
        favicon_path=str(LOGO) if LOGO.exists() else None,
        allowed_paths=[],  # never the visitors' folders: their files go out through each visitor's session (Workspace.served)
        max_file_size="200mb",
        footer_links=["gradio", "settings"],
        **launch_kwargs,
    )
