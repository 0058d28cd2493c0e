"""Checks of SD 3.x / Flux.1 training against what their pipelines and transformers require, on
the offline demo-flux model (demo-sd3 runs the same code with one CLIP more)."""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import make_picture

from tinv_gui.data import bucket_sizes
from tinv_gui.engine import Engine
from tinv_gui.events import Reporter
from tinv_gui.families import Flux
from tinv_gui.jobs import run_training
from tinv_gui.settings import TrainSettings
from tinv_gui.ui.app import TinvApp
from tinv_gui.ui.dataset import add_files
from tinv_gui.ui.workspace import Workspaces


def test_buckets_of_a_transformer_family_are_multiples_of_its_patch_at_any_resolution(store, tmp_path):
    """SD 3.x's and Flux.1's transformers take latents in 2x2 patches, so a picture's sides must be
    multiples of 16 px (the real VAE's 8 times 2): a side of 8 px more gives an odd latent side,
    which Flux.1 cannot pack and SD 3.x's patches cut short. The buckets' grid below 512 px is an
    eighth of the resolution (64 px: 8, whose 72x56 bucket fits a UNet, not these). The Dataset
    tab shows each picture's crop at the shape training gives it."""
    logs = []
    (tmp_path / "pictures").mkdir()
    make_picture(0).save(tmp_path / "pictures" / "wide.png")  # 96x80
    settings = TrainSettings(
        images=str(tmp_path / "pictures"), token="<thing>", model="demo-flux", output_dir=str(tmp_path / "out"), method="textual-inversion",
        init="cat", steps=1, batch_size=1, grad_accum=1, resolution=64, flip=False, device="cpu", precision="fp32", log_with="none",
    ).resolved()
    assert settings.aspect_buckets  # the default
    run_training(settings, store, Reporter(lambda e: logs.append(e.message) if e.kind == "log" else None, total_steps=1))
    (ready,) = [message for message in logs if " pictures ready at " in message]
    sizes = [(int(w), int(h)) for w, h in re.findall(r"(\d+)x(\d+)", ready.split(" ready at ")[1])]
    assert sizes and all(w % Flux.size_multiple == 0 and h % Flux.size_multiple == 0 for w, h in sizes), ready
    # The Dataset tab's preview of the same picture, for the same options, shows that very shape (it was 72x56 on the 8 px grid).
    app = TinvApp(engine=Engine(store), workspaces=Workspaces(tmp_path / "visitors"), hub=(False, "offline"))
    request = SimpleNamespace(session_hash="visitor-a")
    add_files(app.workspace(request), [str(tmp_path / "pictures" / "wide.png")])
    ((_, label),) = app.crops_changed("demo-flux", 64, True, request)[0]
    assert sizes == [tuple(map(int, re.match(r"(\d+)x(\d+)", label.split(" → ")[1]).groups()))], (label, ready)
    # Every resolution these families accept (multiples of 16): buckets on the 16 px grid, and the resolution's square.
    for resolution in range(64, 2049, 16):
        sizes = bucket_sizes(resolution, Flux.size_multiple)
        assert (resolution, resolution) in sizes and all(w % 16 == 0 and h % 16 == 0 for w, h in sizes), resolution


def test_the_dataset_tab_shows_crops_at_the_resolution_sd3_and_flux_train_at(store, tmp_path):
    """Before a model is loaded, the Dataset tab shows each picture's crop at the family's usual
    resolution: 1024 px for SD 3.x and Flux.1 (their native size, where training goes without
    --resolution), not SD 1.x's 512."""
    import json
    from types import SimpleNamespace

    from tinv_gui.ui.tab_dataset import DatasetTab

    tab = SimpleNamespace(engine=SimpleNamespace(store=store))
    for pipeline in ("StableDiffusion3Pipeline", "FluxPipeline"):
        folder = tmp_path / pipeline
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
        assert DatasetTab.crop_resolution(tab, str(folder), None) == 1024, pipeline


def readme_recipe(marker):
    """The README's python block that holds `marker`, as a user would paste it."""
    blocks = re.findall(r"```python\n(.*?)```", (Path(__file__).parents[1] / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


@pytest.mark.parametrize("model", ["demo-sd3", "demo-flux"])
def test_a_plain_diffusers_pipeline_given_the_readme_recipe_conditions_as_training_did(store, tmp_path, monkeypatch, model):
    """README's recipes for diffusers' own FluxPipeline and StableDiffusion3Pipeline, run as
    written: one load_textual_inversion per part (SD 3.x's pipeline lacks the loader, so the recipe
    adds it in a subclass, and spells out a word of several vectors, which SD 3.x's encode_prompt
    does not), and the CLIPs pooled at their end-of-text token. The shipped CLIP configs (FLUX.1's
    CLIP-L, SD 3.5's CLIP-L and bigG) say end-of-text id 2, under which transformers pools at the
    largest id, a new token's: the pooled vector would then not be the one training conditioned on
    (tinv-gui's own pipelines pool at the end-of-text token, families.TransformerFamily.prepare)."""
    import copy

    import torch
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from tinv_gui.device import choose_placement
    from tinv_gui.embeddings import (
        encode_with_placeholder,
        extended_vocabularies,
        save_embedding,
    )
    from tinv_gui.families import family_of
    from tinv_gui.methods.textual_inversion import pad_prompts

    cached = store.pipeline(model, choose_placement("cpu", "fp32"))  # pinned: numbers are compared to 1e-5
    family = family_of(cached)
    widths = tuple(te.get_input_embeddings().embedding_dim for te in family.text_encoders(cached))
    vectors = torch.randn(2, sum(widths), generator=torch.Generator().manual_seed(0)) * 3
    prompt, token = "a photo of <my-cat>", "<my-cat>"  # README's
    # What training conditions on: the token's ids past each vocabulary, spliced in (see DiffusionLoss).
    encoded = []
    for tokenizer, text_encoder, length in zip(family.tokenizers(cached), family.text_encoders(cached), family.prompt_lengths(cached)):
        size = text_encoder.get_input_embeddings().num_embeddings
        encoded.append(pad_prompts(tokenizer, [encode_with_placeholder(tokenizer, prompt, token, [size, size + 1], length)], torch.device("cpu"), length))
    with torch.no_grad(), extended_vocabularies(family.text_encoders(cached), vectors):
        trained_hidden, trained_pooled = family.encode_prompts(family.text_encoders(cached), encoded)

    sd3 = model == "demo-sd3"
    texts = [k for k in cached.components if k.startswith(("text_encoder", "tokenizer"))]
    pipe = (StableDiffusion3Pipeline if sd3 else FluxPipeline)(**{**cached.components, **{k: copy.deepcopy(cached.components[k]) for k in texts}})
    clips = [getattr(e, "text_model", e) for e in (pipe.text_encoder, pipe.text_encoder_2)[: 2 if sd3 else 1]]  # what pools (transformers 4: its text_model)
    for clip in clips:
        clip.eos_token_id = 2  # as the shipped text_encoder/config.json (and text_encoder_2's on SD 3.5) say
    (tmp_path / "out").mkdir()
    save_embedding(tmp_path / "out" / "learned_embeds.safetensors", token, vectors, None, widths, family.embedding_keys)
    monkeypatch.chdir(tmp_path)
    recipe = {"pipe": pipe, "prompt": prompt}
    exec(readme_recipe("pipe.text_encoder_3" if sd3 else 'state["t5"], token="<my-cat>", text_encoder=pipe.text_encoder_2'), recipe)
    if sd3:
        assert recipe["prompt"] == "a photo of <my-cat> <my-cat>_1"  # the word's two vectors, spelt out
    pipe = recipe["pipe"]  # SD 3.x's: the recipe's pipeline with the loader mixin, on the same components

    def encode():
        if sd3:
            hidden, _, pooled, _ = pipe.encode_prompt(recipe["prompt"], None, None, do_classifier_free_guidance=False)
            return hidden, pooled
        return pipe.encode_prompt(prompt, prompt)[:2]

    with torch.no_grad():
        hidden, pooled = encode()
        for clip in clips:
            clip.eos_token_id = 2
        _, shipped_pooled = encode()
    assert torch.allclose(hidden, trained_hidden, atol=1e-5) and torch.allclose(pooled, trained_pooled, atol=1e-5)
    assert not torch.allclose(shipped_pooled, trained_pooled, atol=1e-2)  # without the recipe's pooling line: pooled at the word's last vector


def test_demo_flux_is_native_at_the_demo_models_size(store):
    """Every demo model trains and draws at IMAGE_SIZE by default (what the Dataset tab shows its
    crops at). FluxPipeline's default is a constant 128 latents a side, 1024 px at the real VAE's
    8x but 256 px at the demo's 2x: demo-flux would train and draw at 256 px, 16 times the pixels."""
    import numpy as np

    from tinv_gui.demo_model import IMAGE_SIZE
    from tinv_gui.device import choose_placement
    from tinv_gui.families import family_of
    from tinv_gui.generate import generate

    pipe = store.pipeline("demo-flux", choose_placement("cpu", "fp32"))
    assert family_of(pipe).native_resolution(pipe) == IMAGE_SIZE
    assert np.asarray(generate(pipe, prompt="a cat", steps=1, guidance=3.5)[0]).shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
