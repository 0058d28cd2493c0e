"""The Dataset tab: upload pictures (or zips of them), see each one as the model will (the crop it
trains at, following the Method tab's resolution and aspect-ratio buckets), edit captions.

The work on files (checking, fingerprints, captions) is in dataset.py; this module holds the
tab's controls and handlers.
"""

from __future__ import annotations

import gradio as gr

from ..demo_model import ASSETS_DIR
from ..demo_model import IMAGE_SIZE as DEMO_RESOLUTION  # every demo model's
from ..settings import TrainSettings
from . import dataset
from .workspace import Workspace

EXAMPLES_DIR = ASSETS_DIR / "examples"


def table_rows(table) -> list[list]:
    """Rows of a Dataframe value, whatever shape Gradio hands over."""
    if table is None:
        return []
    if hasattr(table, "values") and hasattr(table, "columns"):
        return table.values.tolist()
    if isinstance(table, dict):
        return table.get("data") or []
    return list(table)


def known_family(store, model: str):
    """The model's family, read without loading it; None for an unknown or unreachable model (the
    crops of SD 1.x are shown until training tells)."""
    try:
        return store.family(model)
    except Exception:  # noqa: BLE001 - the model's field and training say what is wrong with it
        return None


class DatasetTab:
    """The Dataset tab's controls and handlers (a part of TinvApp)."""

    def crop_view(self, ws: Workspace) -> tuple[bool, int, int]:
        """(buckets on, resolution, size multiple) the visitor's crops are shown for: the Method
        tab's options and the model's family, training's inputs of data.training_size."""
        return self.crop_views.get(ws.key, (TrainSettings.aspect_buckets, dataset.CROP_RESOLUTION, dataset.CROP_MULTIPLE))

    def crops_changed(self, model: str, resolution, buckets: bool, request: gr.Request):
        """Show the crops for the training options as they now are (model, resolution, buckets)."""
        ws = self.workspace(request)
        family = known_family(self.engine.store, model)
        multiple = family.size_multiple if family else dataset.CROP_MULTIPLE
        self.crop_views[ws.key] = (bool(buckets), self.crop_resolution(model, resolution), multiple)
        return self.dataset_view(ws)

    def crop_resolution(self, model: str, resolution) -> int:
        """The resolution typed in the options, else the model's: the demo models' own, or the usual
        one of the model's family (read without loading it)."""
        if isinstance(resolution, (int, float)) and 64 <= resolution <= 2048 and resolution % 8 == 0:
            return int(resolution)
        family = known_family(self.engine.store, model)
        if family is None:
            return dataset.CROP_RESOLUTION
        return DEMO_RESOLUTION if model == family.demo_model else family.usual_resolution

    def dataset_view(self, ws: Workspace, message: str = ""):
        pictures = dataset.list_pictures(ws)
        refused = [p for p in pictures if p.problem]
        usable = len(pictures) - len(refused)
        status = f"**{usable} picture(s) ready to train on.**" if pictures else "No pictures yet."
        if refused:
            status += f" {len(refused)} refused (marked ✗ in the gallery):\n" + "".join(f"\n- {p.name}: {p.problem}" for p in refused)
        if dataset.concepts_text(pictures):
            status += f" Concept folders (kohya's N_name): {dataset.concepts_text(pictures)}."
        if usable and usable < 3:
            status += " Three to ten pictures work best (the *From one picture* method needs only one)."
        buckets, resolution, multiple = self.crop_view(ws)
        status += f" The gallery shows the crop each picture trains at {resolution} px" + (", in its aspect-ratio bucket." if buckets else ": its centered square.")
        return dataset.gallery_items(ws, buckets=buckets, resolution=resolution, multiple=multiple), dataset.caption_rows(ws), (message + "\n\n" if message else "") + status

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
        saved = dataset.save_captions(ws, table_rows(rows))
        return f"{saved} caption(s) saved."

    def build_dataset_tab(self, c: dict) -> None:
        with gr.Tab("1. Dataset", id="dataset"):
            gr.Markdown(
                "Add 3 to 10 pictures of your concept: different backgrounds and angles, the concept clearly "
                "visible. The gallery shows each picture as the model will see it: turned upright, with the part "
                "training cuts away faded. With *Aspect-ratio buckets* (Method tab, Advanced) each picture keeps about "
                "its own shape; without, it is cropped to its centered square. Pictures with a problem are refused, "
                "and the reason is shown under them."
            )
            with gr.Row():
                with gr.Column(scale=1):
                    c["upload"] = gr.File(
                        label="Drop pictures or a .zip here (a zip's N_name folders stay concept folders: their pictures count N times)",
                        file_count="multiple",
                        file_types=["image", ".zip", ".txt"],
                    )
                    with gr.Row():
                        c["examples"] = gr.Button("Use the example pictures", size="sm")
                        c["clear"] = gr.Button("Remove all pictures", size="sm", variant="stop")
                    c["dataset_status"] = gr.Markdown("No pictures yet.")
                with gr.Column(scale=2):
                    c["gallery"] = gr.Gallery(label="What will be trained on", columns=4, height=360, object_fit="contain")
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
            c["caption_status"] = gr.Markdown()

    def dataset_outputs(self) -> list:
        c = self.components
        return [c["gallery"], c["captions"], c["dataset_status"]]

    def wire_dataset_tab(self, c: dict) -> None:
        dataset_out = self.dataset_outputs()
        c["upload"].upload(self.add_pictures, c["upload"], dataset_out + [c["upload"]], api_name="add_pictures")
        c["examples"].click(self.add_examples, None, dataset_out, api_name="add_examples")
        c["clear"].click(self.clear_pictures, None, dataset_out, api_name="clear_pictures")
        c["save_captions"].click(self.save_captions, c["captions"], c["caption_status"], api_name="save_captions")
        crop_options = [c["model"], c["options"]["resolution"], c["options"]["aspect_buckets"]]
        for control in crop_options:
            control.change(self.crops_changed, crop_options, dataset_out, api_name=False)
