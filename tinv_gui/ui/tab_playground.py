"""The Playground tab: pick an embedding (trained here or loaded from any tool's file), draw
pictures with it and without it on the same seeds, and measure it (tinv_gui.evaluate)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import gradio as gr

from ..embeddings import read_metadata
from ..formats import read_embedding
from ..generate import SAMPLERS, GenerateSettings
from ..settings import SettingsError
from ..training import EMBEDDING_FILE
from . import dataset
from .gpu import on_gpu
from .progress import POLL_S, RunView
from .workspace import Workspace, sanitize_filename, unique_path

SIZES = {
    "Model default": None,
    "512 × 512": (512, 512),
    "768 × 768": (768, 768),
    "512 × 768 (portrait)": (512, 768),
    "768 × 512 (landscape)": (768, 512),
}
NO_EMBEDDING = "none"
EVAL_PICTURES = 4  # per side when measuring: each is a full generation, so keep it small


def _embedding_label(ws: Workspace, path: Path) -> str:
    """How an embedding is listed in the Playground: its token, where it came from, how it was made."""
    try:
        meta = read_metadata(path)
    except Exception:  # noqa: BLE001 - a broken file still gets listed, by name
        meta = {}
    if path.parent.parent == ws.runs:
        where = "trained " + time.strftime("%H:%M:%S", time.localtime(path.stat().st_mtime))
    else:
        where = f"loaded from {path.name}"
    details = ", ".join(x for x in (meta.get("method"), f"{meta['steps']} steps" if meta.get("steps") else None) if x)
    return f"{meta.get('token', path.stem)} · {where}" + (f" ({details})" if details else "")


class PlaygroundTab:
    """The Playground tab's controls and handlers (a part of TinvApp)."""

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
        path = self._own_embedding(ws, embedding)
        token = read_embedding(path).token if path else None
        note = f"Your prompt does not contain `{token}`, so the embedding has no effect on it." if token and token not in prompt else ""
        out = unique_path(ws.images, time.strftime("%Y%m%d-%H%M%S"))
        settings = GenerateSettings(
            model=model, output=str(out / "picture.png"), prompt=prompt, negative=(negative or "").strip() or None,
            embeddings=[str(path)] if path else [], strength=float(strength), sampler=sampler, steps=int(steps),
            guidance=float(guidance), seed=int(seed), size=SIZES.get(size), count=int(count), compare=bool(compare),
        )
        try:
            final = self.engine.generate(settings).wait()
        except (SettingsError, ValueError) as error:
            raise gr.Error(str(error)) from None
        if final.kind == "failed":
            raise gr.Error(final.message)

        def pictures(name: str) -> list[Path] | None:
            return [ws.inside(p) for k, p in final.outputs.items() if k.split("-")[0] == name] or None

        return pictures("image"), pictures("without"), note or f"Seed {int(seed)}."

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
        settings = EvalSettings(
            model=model, embedding=str(path), images=str(ws.pictures), prompt=prompt, n=EVAL_PICTURES, steps=int(steps), seed=int(seed)
        )
        try:
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

    def build_playground_tab(self, c: dict) -> None:
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
                        c["sampler"] = gr.Dropdown(list(SAMPLERS), value="Model default", label="Sampler")
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

    def wire_playground_tab(self, c: dict) -> None:
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

