"""The Playground tab: pick an embedding (trained here or loaded from any tool's file), draw
pictures with it and without it on the same seeds, and measure it (tinv_gui.evaluate)."""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr

from ..data import open_image
from ..embeddings import mentions
from ..families import StableDiffusion
from ..formats import read_embedding, read_embeddings, write_embedding
from ..jobs import recommended_file
from ..settings import SAMPLERS, GenerateSettings, SettingsError
from ..training import EMBEDDING_FILE
from . import dataset
from .gpu import on_gpu
from .limits import QUEUE
from .options import whole_number
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
    """How an embedding is listed in the Playground: the name to type, where it came from, how it was made."""
    try:
        embedding = read_embedding(path)
        name, meta = embedding.token, embedding.metadata
    except Exception:  # noqa: BLE001 - a broken file still gets listed, by name
        name, meta = path.stem, {}
    if path.parent.parent == ws.runs:
        where = "trained " + time.strftime("%H:%M:%S", time.localtime(path.stat().st_mtime))
    else:
        where = f"loaded from {meta.get('loaded_from', path.name)}"
    recommended = "the recommended checkpoint" if path == recommended_file(path.parent) else None
    details = ", ".join(x for x in (meta.get("method"), f"{meta['steps']} steps" if meta.get("steps") else None, recommended) if x)
    return f"{name} · {where}" + (f" ({details})" if details else "")


class PlaygroundTab:
    """The Playground tab's controls and handlers (a part of TinvApp)."""

    def embedding_files(self, ws: Workspace) -> list[Path]:
        """The visitor's embeddings, newest first: trained here (each run's final one, and the
        checkpoint its scores recommend when that is an earlier one) or loaded from a file."""
        loaded = [p for p in ws.embeddings.iterdir() if p.is_file() and not p.name.startswith(".")]  # not scaled copies
        finals = list(ws.runs.glob(f"*/{EMBEDDING_FILE}"))
        picks = {recommended_file(final.parent) for final in finals} - {None, *finals}
        return sorted([*finals, *picks, *loaded], key=lambda p: p.stat().st_mtime, reverse=True)

    def embedding_choices(self, ws: Workspace) -> list[tuple[str, str]]:
        return [("No embedding (the model alone)", NO_EMBEDDING)] + [
            (_embedding_label(ws, p), str(p.relative_to(ws.root))) for p in self.embedding_files(ws)
        ]

    def refresh_embeddings(self, current: str | None, request: gr.Request):
        choices = self.embedding_choices(self.workspace(request))
        values = [v for _, v in choices]
        return gr.update(choices=choices, value=current if current in values else values[min(1, len(values) - 1)])

    def load_embedding_file(self, files, request: gr.Request):
        """Read embedding files of any tool (diffusers' SDXL output: its two files together), keep
        each in the visitor's folder and select the last. The name to type is the one the tool
        that wrote the file uses (the upload keeps the file's own name); the copy is a
        .safetensors that stores that name, so renaming the copy cannot change it."""
        ws = self.workspace(request)
        files = [files] if isinstance(files, str) else list(files or [])
        if not files:
            return gr.update(), ""
        try:
            embeddings = read_embeddings(files)
        except Exception as error:  # noqa: BLE001 - any unreadable file gets the same plain answer
            raise gr.Error(f"Not an embedding file this app can read: {error}.") from None
        lines, target = [], None
        for embedding in embeddings:
            target = unique_path(ws.embeddings, sanitize_filename(embedding.token, "embedding") + ".safetensors")
            origin = " + ".join(Path(f).name for f in files) if embedding.layout == "diffusers-sdxl" else embedding.path.name
            embedding.metadata["loaded_from"] = origin
            write_embedding(embedding, target, "diffusers", one_file=True)
            widths = " + ".join(str(w) for w in embedding.widths)  # one per text encoder
            lines.append(
                f"Loaded `{embedding.token}` from {origin} ({embedding.count} vector(s) of width{'s' if embedding.keys else ''} "
                f"{widths}). Type `{embedding.token}` in your prompt."
            )
        choices = self.embedding_choices(ws)
        return gr.update(choices=choices, value=str(target.relative_to(ws.root))), "\n\n".join(lines)

    def save_card(self, embedding, request: gr.Request):
        """The chosen embedding as an AUTOMATIC1111 embedding card: the latest picture drawn with
        it (or a plain one) with the embedding inside, readable by A1111 and by this app."""
        ws = self.workspace(request)
        path = self._own_embedding(ws, embedding)
        if path is None:
            raise gr.Error("Choose an embedding first.")
        chosen = read_embedding(path)
        drawn = sorted(ws.images.glob("*/picture.png"), key=lambda p: p.stat().st_mtime)
        picture = open_image(drawn[-1]) if drawn else None
        name = sanitize_filename(chosen.token, "embedding")
        card = write_embedding(chosen, unique_path(ws.images, "card-" + time.strftime("%Y%m%d-%H%M%S")) / f"{name}.png", "a1111-png", picture)
        return ws.served(card), (
            f"`{card.name}`: a picture with `{name}` inside. Put it in AUTOMATIC1111's or Forge's embeddings folder and type "
            f"`{name}`; this app's Playground loads it too."
        )

    def try_in_playground(self, request: gr.Request):
        """Carry the visitor's latest training to the Playground (the checkpoint its scores
        recommend, else its final embedding), with a prompt that uses it."""
        ws = self.workspace(request)
        finals = sorted(ws.runs.glob(f"*/{EMBEDDING_FILE}"), key=lambda p: p.stat().st_mtime)
        if not finals:
            raise gr.Error("Train an embedding first.")
        run = finals[-1].parent
        chosen = recommended_file(run)
        if chosen is not None:
            step = read_embedding(chosen).metadata.get("steps", "?")
            gr.Info(f"The Playground has the checkpoint the scores recommend: step {step} of your training.")
        chosen = chosen or run / EMBEDDING_FILE
        return (
            gr.Tabs(selected="playground"),
            gr.update(choices=self.embedding_choices(ws), value=str(chosen.relative_to(ws.root))),
            f"a photo of {read_embedding(chosen).token}",
        )

    def generate(self, model, embedding, prompt, negative, steps, guidance, seed, sampler, size, count, strength, compare,
                 request: gr.Request, fp8_weights: bool = False):
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
        note = f"Your prompt does not contain `{token}`, so the embedding has no effect on it." if token and not mentions(prompt, token) else ""
        out = unique_path(ws.images, time.strftime("%Y%m%d-%H%M%S"))
        settings = GenerateSettings(
            model=model, output=str(out / "picture.png"), prompt=prompt, negative=(negative or "").strip() or None,
            embeddings=[str(path)] if path else [], strength=float(strength), sampler=sampler, steps=int(steps),
            guidance=float(guidance), seed=int(seed), size="x".join(map(str, SIZES[size])) if SIZES.get(size) else None,
            count=int(count), compare=bool(compare), fp8_weights=bool(fp8_weights),  # the Method tab's, so the warm pipeline serves
        )
        try:
            job = self.engine.generate(settings)
        except (SettingsError, ValueError) as error:
            raise gr.Error(str(error)) from None
        try:  # behind others' jobs, the visitor sees their place in the queue, as training's do
            shown = ""
            while not job.done:
                ahead = self.engine.position(job)
                waiting = RunView.from_events([], ahead, self.engine.expected_wait(job)).summary() if ahead else ""
                if waiting != shown:
                    shown = waiting
                    yield gr.skip(), gr.skip(), waiting
                time.sleep(POLL_S)
        finally:
            if not job.done:  # the visitor left while waiting: their pictures are not drawn
                job.cancel()
        final = job.wait()
        if final.kind == "failed":
            raise gr.Error(final.message)

        def pictures(name: str) -> list[Path] | None:
            return [ws.served(p) for k, p in final.outputs.items() if k.split("-")[0] == name] or None

        yield pictures("image"), pictures("without"), note or f"Seed {int(seed)}."

    def model_guidance(self, model: str):
        """The guidance slider at the chosen model's own default (Family.default_guidance), the
        family read without loading the model; left as it is for a model not known yet."""
        try:
            return gr.update(value=self.engine.store.family(model).default_guidance)
        except Exception:  # noqa: BLE001 - an unknown or unreachable model: generating says what is wrong
            return gr.skip()

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

    def measure(self, model, embedding, prompt, steps, seed, request: gr.Request, fp8_weights: bool = False, guidance: float | None = None):
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
        prompt = prompt if mentions(prompt, token) else f"a photo of {token}"
        try:
            settings = EvalSettings(
                model=model, embedding=str(path), images=str(ws.pictures), prompt=prompt, n=EVAL_PICTURES,
                steps=whole_number("steps", steps), seed=whole_number("seed", seed), fp8_weights=bool(fp8_weights),
                guidance=None if guidance is None else float(guidance),
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
                    f"Measured on {EVAL_PICTURES} pictures each, prompt `{prompt}`, guidance {m['guidance']:g}:\n\n"
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
                        info="Trained here, or loaded from a file below. Pictures are drawn with the model (and its 8-bit weights option) chosen on the Method tab.",
                    )
                    c["embedding_file"] = gr.File(
                        label="Load embedding files (diffusers', AUTOMATIC1111's .pt/.png cards, ComfyUI's, kohya's, OneTrainer's; "
                        "diffusers' SDXL output: both files at once)",
                        file_types=[".safetensors", ".pt", ".bin", ".png", ".webp"],
                        file_count="multiple",
                    )
                    c["embedding_status"] = gr.Markdown()
                    c["prompt"] = gr.Textbox(
                        "a photo of <my-concept>", label="Prompt", info="Use your new word in it.", elem_id="playground-prompt"
                    )
                    c["negative"] = gr.Textbox("", label="Negative prompt", placeholder="e.g. blurry, low quality")
                    with gr.Row():
                        c["gen_steps"] = gr.Slider(1, 100, 25, step=1, label="Steps", info="More: finer, slower.", elem_id="gen-steps")
                        # The default models (SD 1.5, the demo) are SD 1.x; another model's own default comes with it (model_guidance).
                        c["guidance"] = gr.Slider(
                            1, 15, StableDiffusion().default_guidance, step=0.5, label="Guidance",
                            info="How closely to follow the prompt. Set to the model's own default when the model changes.",
                        )
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
                    with gr.Row():
                        c["save_card"] = gr.Button("Save as an AUTOMATIC1111 card (.png)")
                        c["card"] = gr.File(label="Embedding card", interactive=False)
                    c["card_status"] = gr.Markdown()
                    c["measure"] = gr.Button("Measure how good it is")
                    c["scores"] = gr.Markdown(
                        f"Draws {EVAL_PICTURES} pictures with the embedding and {EVAL_PICTURES} with its starting word, "
                        "and compares both with your training pictures and with the prompt (CLIP similarity)."
                    )

    def wire_playground_tab(self, c: dict) -> None:
        c["embedding_file"].upload(
            self.load_embedding_file, c["embedding_file"], [c["embedding"], c["embedding_status"]], api_name="load_embedding"
        )
        c["model"].change(self.model_guidance, c["model"], c["guidance"], api_name=False)
        c["embedding"].focus(self.refresh_embeddings, c["embedding"], c["embedding"], api_name="embeddings")
        c["generate"].click(
            self.limited(on_gpu(self.generate)),
            [*(c[k] for k in ("model", "embedding", "prompt", "negative", "gen_steps", "guidance", "seed", "sampler", "size", "count", "strength", "compare")),
             c["options"]["fp8_weights"]],
            [c["with"], c["without"], c["generate_status"]],
            api_name="generate",
            **QUEUE,
        )

        c["save_card"].click(self.save_card, c["embedding"], [c["card"], c["card_status"]], api_name="save_card")
        c["measure"].click(
            self.limited(on_gpu(self.measure)),
            [*(c[k] for k in ("model", "embedding", "prompt", "gen_steps", "seed")), c["options"]["fp8_weights"], c["guidance"]],
            c["scores"],
            api_name="measure",
            show_progress="hidden",
            **QUEUE,
        )

