"""Issue 14's "done when" through the command line, on demo-sd3 and demo-flux: each method that
makes an embedding trains (textual-inversion, quick, quick-then-ti, caption-init); its file holds
a part per text encoder at that encoder's width; each part loads with diffusers' own
load_textual_inversion into its encoder of a pipeline diffusers loads from the model's folder,
and the word changes the picture that pipeline draws; a run resumes; the file round-trips through
`convert`; and optimize-prompt's continuous prompt draws with `generate`. Every run is one
in-process `python -m tinv_gui train` (cli.main), at 64 px for one step, shared by the module's
tests through a fixture; the runs of a model share one ModelStore (as the app's jobs do), so the
tiny models load once per model rather than once per run."""

import json

import numpy as np
import pytest
import torch
from conftest import cli_here, make_picture

from tinv_gui import cli
from tinv_gui.embeddings import read_metadata
from tinv_gui.formats import read_embedding
from tinv_gui.models import ModelStore

TOKEN = "<cli-thing>"
CAPTION = "a red robot on a sofa"
COMMON = ["--token", TOKEN, "--init", "cat", "--resolution", "64", "--no-flip", "--device", "cpu", "--precision", "fp32", "--log-with", "none"]
RUNS = {  # each method at its cheapest
    "textual-inversion": ["--steps", "1", "--batch-size", "1"],
    "quick": ["--steps", "1", "--batch-size", "2", "--crops", "1"],
    "quick-then-ti": ["--quick-steps", "1", "--steps", "1", "--batch-size", "1", "--crops", "1"],
    "caption-init": ["--caption", CAPTION, "--steps", "1", "--batch-size", "1"],
}
# The run each model resumes here, one step further. Textual inversion resumes on both in
# test_sd3_flux.py (in-process); the app resumes Balanced on demo-sd3, From one picture on demo-flux.
RESUMED = {"demo-sd3": "caption-init", "demo-flux": "quick-then-ti"}


@pytest.fixture(scope="module", params=["demo-sd3", "demo-flux"])
def model(request):
    return request.param


@pytest.fixture(scope="module")
def cli_store(model):
    """The model's store for this module: the CLI's engines take it instead of a new one."""
    return ModelStore()


@pytest.fixture(scope="module")
def runs(model, cli_store, tmp_path_factory):
    """Each method trained once through the CLI, then the model's RESUMED run continued for one
    more step: {method or "resumed": the run's folder}."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("tinv_gui.engine.ModelStore", lambda: cli_store)
        return train_each_method(model, tmp_path_factory)


def train_each_method(model, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"cli-{model}")
    pictures = root / "pictures"
    pictures.mkdir()
    for i in range(2):
        make_picture(i).save(pictures / f"picture{i}.png")
    folders = {}

    def train(method, out, *more):
        folders[out] = root / out
        images = pictures / "picture0.png" if method == "caption-init" else pictures
        argv = ["train", "--method", method, "--model", model, "--images", str(images), *COMMON, *RUNS[method], *more, "--output", str(folders[out])]
        assert cli.main(argv) == 0, out

    for method in RUNS:
        train(method, method)
    train(RESUMED[model], "resumed", "--steps", "2", "--resume", str(folders[RESUMED[model]] / "learned_embeds.safetensors"),
          "--log-jsonl", str(root / "resumed.jsonl"))  # the later --steps wins
    return folders


def embedding(folder):
    return read_embedding(folder / "learned_embeds.safetensors")


def fp32_pipeline(cli_store, model):
    """The pipeline the runs trained (cpu, fp32), as diffusers' from_pretrained loads it."""
    from tinv_gui.device import choose_placement

    return cli_store.pipeline(model, choose_placement(device="cpu", precision="fp32"))


def starting_parts(pipe, init, count):
    """Each text encoder's part before training, from `init`'s words in its own vocabulary."""
    from tinv_gui.families import family_of
    from tinv_gui.methods.textual_inversion import starting_vectors
    from tinv_gui.models import pipeline_text_widths

    parts = torch.split(starting_vectors(pipe, init, count, 0), list(pipeline_text_widths(pipe)), dim=1)
    return dict(zip(family_of(pipe).embedding_keys, parts))


def test_each_method_writes_a_part_per_text_encoder_at_its_width_and_learns(model, runs, cli_store):
    from safetensors.torch import load_file

    family, widths = cli_store.family(model), cli_store.text_widths(model)
    for method in RUNS:
        saved = embedding(runs[method])
        count = len(CAPTION.split()) if method == "caption-init" else 1
        assert saved.token == TOKEN and saved.keys == family.embedding_keys and saved.widths == widths and saved.count == count, method
        assert set(load_file(str(runs[method] / "learned_embeds.safetensors"))) == {*family.embedding_keys, "t5xxl"}  # ComfyUI's key for T5's part too
        metadata = read_metadata(runs[method] / "learned_embeds.safetensors")
        assert metadata["method"] == method and metadata["steps"] == ("2" if method == "quick-then-ti" else "1"), method
        start = starting_parts(fp32_pipeline(cli_store, model), CAPTION if method == "caption-init" else "cat", count)
        for key in family.embedding_keys:
            stays = method == "quick" and key == "t5"  # T5 has no image tower: QuickEmbedding keeps its starting word
            assert torch.equal(saved.parts[key], start[key]) == stays, (method, key)


def test_a_resumed_run_continues_from_the_saved_step_and_vectors(model, runs):
    first, resumed = embedding(runs[RESUMED[model]]), embedding(runs["resumed"])
    step = first.step + 1
    assert resumed.step == step and read_metadata(runs["resumed"] / "learned_embeds.safetensors")["method"] == RESUMED[model]
    steps = [json.loads(line)["step"] for line in (runs["resumed"].parent / "resumed.jsonl").read_text().splitlines()]
    assert steps == [step]  # only the step after the saved one ran
    assert resumed.keys == first.keys and all(not torch.equal(resumed.parts[k], first.parts[k]) for k in first.keys)


def test_each_file_round_trips_through_convert(model, runs, tmp_path, capsys):
    for method in RUNS:
        saved = embedding(runs[method])
        there = cli_here(capsys, "convert", runs[method] / "learned_embeds.safetensors", "--format", "onetrainer", "--output", f"{tmp_path / method}/onetrainer/")
        assert there.returncode == 0, there.stderr
        theirs = there.stdout.split("onetrainer: ", 1)[1].strip()
        back = cli_here(capsys, "convert", theirs, "--format", "diffusers", "--token", TOKEN, "--output", f"{tmp_path / method}/back/")
        assert back.returncode == 0, back.stderr
        again = read_embedding(back.stdout.split("diffusers: ", 1)[1].strip())
        assert again.token == TOKEN and again.keys == saved.keys and all(torch.equal(again.parts[k], saved.parts[k]) for k in saved.keys), method
    refused = cli_here(capsys, "convert", runs["textual-inversion"] / "learned_embeds.safetensors", "--format", "a1111-pt", "--output", f"{tmp_path}/a1111/")
    assert refused.returncode == 2 and "have no" in refused.stderr and "Traceback" not in refused.stderr


def test_prompt_from_a_picture_through_the_cli_draws_with_generate(model, cli_store, tmp_path, capsys):
    """optimize-prompt's continuous prompt (its CLIP parts learned, T5 reading the nearest words)
    in the family's conditioning, drawn by `generate --prompt-embeds`."""
    from PIL import Image
    from safetensors.torch import load_file

    widths = cli_store.text_widths(model)
    make_picture(5).save(tmp_path / "picture.png")
    pinned = ["--device", "cpu", "--precision", "fp32"]  # the runs' pipeline, loaded once
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("tinv_gui.engine.ModelStore", lambda: cli_store)
        found = cli_here(capsys, "optimize-prompt", "--model", model, "--image", tmp_path / "picture.png", "--steps", "2", "--length", "3", *pinned,
                         "--output", tmp_path / "found")
        assert found.returncode == 0, found.stderr
        drawn = cli_here(capsys, "generate", "--model", model, "--prompt-embeds", tmp_path / "found" / "prompt_embeds.safetensors", *pinned,
                         "--steps", "1", "--size", "32x32", "--output", tmp_path / "drawn.png")
        assert drawn.returncode == 0, drawn.stderr
    saved = load_file(str(tmp_path / "found" / "prompt_embeds.safetensors"))
    rows, pooled = (77 + 256, widths[0] + widths[1]) if model == "demo-sd3" else (512, widths[0])  # SD 3.x: both CLIPs' and T5's rows
    assert saved["prompt_embeds"].shape == (1, rows, widths[-1]) and saved["pooled_prompt_embeds"].shape == (1, pooled)
    assert (tmp_path / "found" / "t5_prompt.txt").read_text(encoding="utf-8").strip()
    assert Image.open(tmp_path / "drawn.png").size == (32, 32)


def with_diffusers_loader(pipe):
    """`pipe` itself when its class has diffusers' load_textual_inversion; else (SD 3.x's class
    does not mix in TextualInversionLoaderMixin: a user adds it, as here) a pipeline of its class
    with the mixin, on the same components."""
    from diffusers.loaders import TextualInversionLoaderMixin

    if isinstance(pipe, TextualInversionLoaderMixin):
        return pipe
    return type(f"{type(pipe).__name__}WithTextualInversion", (TextualInversionLoaderMixin, type(pipe)), {})(**pipe.components)


def test_each_file_loads_into_the_diffusers_pipeline_one_call_per_encoder_and_changes_its_picture(model, runs, cli_store):
    from safetensors.torch import load_file

    from tinv_gui.families import family_of

    words = {method: f"<{method}>" for method in RUNS}  # each run's file under a word of its own
    counts = {method: load_file(str(runs[method] / "learned_embeds.safetensors"))["t5"].shape[0] for method in RUNS}
    names = {method: [word] + [f"{word}_{i}" for i in range(1, counts[method])] for method, word in words.items()}  # diffusers' names
    prompts = [f"a photo of {' '.join(names[method])}" for method in RUNS]  # spelled out: SD 3.x's pipeline does not expand a word

    def draw(pipe):  # every prompt at the same seed, in one batch
        generators = [torch.Generator().manual_seed(0) for _ in prompts]
        return pipe(prompts, num_inference_steps=1, height=32, width=32, guidance_scale=1.0, generator=generators, output_type="np").images

    # The module's own pipeline (this test comes last: nothing after it uses it): first without the words, as plain text.
    pipe = with_diffusers_loader(fp32_pipeline(cli_store, model))
    family = family_of(pipe)
    without = draw(pipe)
    for method in RUNS:
        state = load_file(str(runs[method] / "learned_embeds.safetensors"))
        for key, text_encoder, tokenizer in zip(family.embedding_keys, family.text_encoders(pipe), family.tokenizers(pipe)):
            pipe.load_textual_inversion(state[key], token=words[method], text_encoder=text_encoder, tokenizer=tokenizer)
            rows = text_encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(names[method])]
            assert torch.equal(rows, state[key]), (method, key)
    for method, with_word, plain in zip(RUNS, draw(pipe), without):
        assert not np.array_equal(with_word, plain), method  # the same seed: the word makes the difference
