"""Issue 14's "done when" through the app (`python app.py`, driven by gradio_client as a visitor's
page drives it), on demo-sd3 and demo-flux: each training method trains, its downloads hold a
part per text encoder at that encoder's width, a run resumes from the file the Playground lists,
the Playground draws another picture with the new word (a word of several vectors, from one
picture), and (on demo-flux) the Prompt from image tab finds a continuous prompt and draws it.
Textual inversion on demo-sd3 and its Playground drawing are in test_app_client.py."""

from pathlib import Path

import pytest
from gradio_client import Client
from PIL import Image

from tinv_gui.demo_sd3_flux import FLUX_TEXT_WIDTHS, SD3_TEXT_WIDTHS
from tinv_gui.formats import read_embedding

TOKEN = "<app-thing>"
CAPTION = "a red robot on a sofa"
TINY = dict(steps=1, batch_size=1, grad_accum=1, resolution=64, flip=False, crops=1, log_with="none")
PRESETS = {  # the app's presets, each at its cheapest: {label: (method, form values)}
    "Quick": ("quick", dict(TINY, batch_size=2)),
    "Balanced": ("quick-then-ti", dict(TINY, quick_steps=1)),
    "Thorough": ("textual-inversion", TINY),
    "From one picture": ("caption-init", dict(TINY, caption=CAPTION)),
}
MODELS = {  # the presets each model trains here, and the one it resumes (the CLI resumes the others: test_sd3_flux_cli.py)
    "demo-sd3": (("Quick", "Balanced", "From one picture"), "Balanced"),
    "demo-flux": (("Quick", "Balanced", "Thorough", "From one picture"), "From one picture"),
}
WIDTHS = {"demo-sd3": SD3_TEXT_WIDTHS, "demo-flux": FLUX_TEXT_WIDTHS}
KEYS = {"demo-sd3": ("clip_l", "clip_g", "t5"), "demo-flux": ("clip_l", "t5")}


def train(client: Client, model: str, preset: str, **form):
    """One training through the app's Train button; its last state (outputs as test_app_client reads them)."""
    method, values = PRESETS[preset]
    return client.submit(model=model, token=TOKEN, init="robot", preset=preset, **{**values, **form}, api_name="/train").result()


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return request.param


@pytest.fixture(scope="module")
def trained(model, app_server):
    """One visitor who trains each of the model's presets, then resumes one: (client, {preset or
    "resumed": the Train tab's last state})."""
    client = Client(app_server[0], verbose=False, download_files=True)
    client.predict(api_name="/add_examples")
    presets, resumed = MODELS[model]
    finals = {preset: train(client, model, preset) for preset in presets}
    embedding = finals[resumed][6]["value"]  # as the Playground lists it
    finals["resumed"] = train(client, model, resumed, resume=embedding, steps=2)  # one step (of textual inversion) more
    return client, finals


def downloads(final) -> dict[str, str]:
    return {Path(path).name: path for path in final[4]}


def test_each_method_trains_and_its_downloads_hold_a_part_per_text_encoder(model, trained):
    _, finals = trained
    presets, _ = MODELS[model]
    for preset in presets:
        final = finals[preset]
        method, values = PRESETS[preset]
        steps = values["steps"] + values.get("quick_steps", 0)
        assert f"Done: step {steps} / {steps}" in final[0], (preset, final[0])
        files = downloads(final)
        assert set(files) == {"learned_embeds.safetensors", "app-thing.safetensors"}, preset  # ours, and OneTrainer's (ComfyUI's)
        count = len(CAPTION.split()) if method == "caption-init" else 1
        for name, path in files.items():
            saved = read_embedding(path)
            assert saved.keys == KEYS[model] and saved.widths == WIDTHS[model] and saved.count == count, (preset, name)
            assert saved.step == steps and [f.name for f in saved.families] == [model.removeprefix("demo-")], (preset, name)
        assert read_embedding(files["learned_embeds.safetensors"]).metadata["method"] == method, preset
        assert "ComfyUI: type `embedding:app-thing`" in final[5], preset


def test_a_run_resumes_from_the_file_the_playground_lists(model, trained):
    _, finals = trained
    resumed_preset = MODELS[model][1]
    first, resumed = finals[resumed_preset], finals["resumed"]
    steps = read_embedding(downloads(first)["learned_embeds.safetensors"]).step + 1
    assert f"Done: step {steps} / {steps}" in resumed[0], resumed[0]
    assert f"Resuming after step {steps - 1}" in resumed[3]
    before, after = (read_embedding(downloads(final)["learned_embeds.safetensors"]) for final in (first, resumed))
    assert after.step == steps and after.keys == before.keys
    assert all(not after.parts[key].equal(before.parts[key]) for key in before.keys)  # every part went on learning


def test_the_playground_draws_another_picture_with_a_word_of_several_vectors(model, trained):
    client, finals = trained
    embedding = finals["From one picture"][6]["value"]
    with_it, without, _ = client.predict(model=model, embedding=embedding, prompt=f"a photo of {TOKEN}", steps=1, compare=True, api_name="/generate")
    assert Image.open(with_it[0]["image"]).tobytes() != Image.open(without[0]["image"]).tobytes()




def test_flux_prompt_from_a_picture_in_the_app_is_drawn_from_its_continuous_prompt(app_server):
    """The Prompt from image tab on Flux.1: the continuous prompt's CLIP part learns, T5 reads the
    nearest words (shown), and 'Generate with it' draws from it at the model's own size. SD 3.x
    runs the same handlers (both families through the CLI in test_sd3_flux_cli.py)."""
    from gradio_client import handle_file

    client = Client(app_server[0], verbose=False, download_files=True)
    example = sorted((Path(__file__).resolve().parent.parent / "assets" / "examples").glob("*.png"))[0]
    progress, _, prompt = client.predict(model="demo-flux", image=handle_file(str(example)), readable=False, steps=2, api_name="/find_prompt")
    assert "Best CLIP similarity with the picture" in progress and prompt.startswith("(a continuous prompt: its CLIP parts have no words; T5 reads: ")
    (picture,) = client.predict(model="demo-flux", steps=2, api_name="/generate_found")
    assert Image.open(picture["image"]).size == (64, 64)  # demo-flux's own size
