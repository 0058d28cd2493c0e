"""SD 3.x and Flux.1 embedding files on the offline demo-sd3 and demo-flux models: a part per text
encoder (T5's at T5's width) written in OneTrainer's layout, read back, loaded by diffusers one
text encoder at a time, and drawn with (the word, its T5 part and the strength all change the
picture; the cached pipeline ends as it was)."""

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tinv_gui import formats
from tinv_gui.demo_sd3_flux import FLUX_TEXT_WIDTHS, SD3_TEXT_WIDTHS
from tinv_gui.embeddings import load_into_pipeline, save_embedding, unload_from_pipeline
from tinv_gui.families import Flux, StableDiffusion3
from tinv_gui.formats import EmbeddingFormatError, read_embedding, write_embedding
from tinv_gui.generate import generate
from tinv_gui.jobs import export_for_other_tools

FAMILIES = {"demo-sd3": (StableDiffusion3(), SD3_TEXT_WIDTHS), "demo-flux": (Flux(), FLUX_TEXT_WIDTHS)}


def joined_vectors(widths, count=2, seed=0):
    return torch.randn(count, sum(widths), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model", FAMILIES)
def test_run_file_holds_a_part_per_encoder_and_round_trips(tmp_path, model):
    family, widths = FAMILIES[model]
    vectors = joined_vectors(widths)
    path = save_embedding(tmp_path / "run" / "learned_embeds.safetensors", "<z>", vectors, {"steps": 4, "method": "ti"}, widths, family.embedding_keys)
    state = load_file(str(path))
    # OneTrainer's keys, and T5's part again under ComfyUI's key for it
    assert set(state) == {*family.embedding_keys, "t5xxl"} and torch.equal(state["t5xxl"], state["t5"])
    assert [state[key].shape for key in family.embedding_keys] == [(2, w) for w in widths]
    back = read_embedding(path)
    assert back.token == "<z>" and back.keys == family.embedding_keys and back.step == 4 and back.metadata["method"] == "ti"
    assert torch.equal(back.joined(), vectors) and back.widths == widths
    assert family.title in back.describe_width()

    written = export_for_other_tools(str(path))
    assert set(written) == {"onetrainer"}  # the run's own file is diffusers'; A1111, kohya and InvokeAI have no such embeddings
    assert written["onetrainer"].endswith("/z.safetensors")  # ComfyUI's `embedding:z`
    assert torch.equal(read_embedding(written["onetrainer"]).joined(), vectors)
    assert torch.equal(read_embedding(formats.convert(written["onetrainer"], "diffusers", f"{tmp_path}/again/")).joined(), vectors)
    for fmt in ("a1111-pt", "a1111-safetensors", "a1111-png", "kohya"):
        with pytest.raises(EmbeddingFormatError, match=rf"{fmt} files .* have no {family.title} embeddings.*as diffusers or onetrainer"):
            formats.convert(path, fmt, f"{tmp_path}/refused/")
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())


def test_diffusers_flux_pipeline_loads_each_part_with_its_own_load_textual_inversion(tmp_path, store):
    """As diffusers documents it for several text encoders: one call per encoder and tokenizer."""
    from diffusers import FluxPipeline

    family, widths = FAMILIES["demo-flux"]
    cached = store.pipeline("demo-flux")
    # Its own text encoders and tokenizers: diffusers' loader resizes T5's table (see embeddings._keep_rows_past_the_tokenizer).
    pipe = FluxPipeline(**{**cached.components, **{k: copy.deepcopy(cached.components[k]) for k in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}})
    state = load_file(str(save_embedding(tmp_path / "z.safetensors", "<z>", joined_vectors(widths), None, widths, family.embedding_keys)))
    for key, encoder, tokenizer in zip(family.embedding_keys, family.text_encoders(pipe), family.tokenizers(pipe)):
        pipe.load_textual_inversion(state[key], token="<z>", text_encoder=encoder, tokenizer=tokenizer)
        assert torch.equal(encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(["<z>", "<z>_1"])], state[key]), key
    # The pipeline spells the token's vectors out in both prompts (T5's sentencepiece tokenizer too).
    assert pipe.maybe_convert_prompt("a <z> cat", pipe.tokenizer_2) == "a <z> <z>_1 cat"


@pytest.mark.parametrize("model", FAMILIES)
def test_our_loader_puts_each_part_into_its_own_encoder_and_unloading_restores_the_pipeline(tmp_path, store, model):
    family, widths = FAMILIES[model]
    pipe = store.pipeline(model)
    encoders, tokenizers = family.text_encoders(pipe), family.tokenizers(pipe)
    tables = [encoder.get_input_embeddings().weight.clone() for encoder in encoders]
    sizes = [len(tokenizer) for tokenizer in tokenizers]
    assert tables[family.t5_encoder].shape[0] > sizes[family.t5_encoder]  # T5's table has rows past its tokenizer, as T5-XXL's
    embedding = read_embedding(save_embedding(tmp_path / "z.safetensors", "<z>", joined_vectors(widths), None, widths, family.embedding_keys))
    names = load_into_pipeline(pipe, "<z>", embedding.parts)  # SD 3.x's pipeline class lacks the loader: diffusers' runs on it
    try:
        assert names == ["<z>", "<z>_1"]
        for key, encoder, tokenizer in zip(family.embedding_keys, encoders, tokenizers):
            assert torch.equal(encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(names)], embedding.parts[key]), key
    finally:
        unload_from_pipeline(pipe, names)
    assert [len(tokenizer) for tokenizer in tokenizers] == sizes
    assert all(torch.equal(encoder.get_input_embeddings().weight, table) for encoder, table in zip(encoders, tables))
    assert not any(encoder.get_input_embeddings().weight.requires_grad for encoder in encoders)


@pytest.mark.parametrize("model", FAMILIES)
def test_generation_uses_every_part_and_the_strength(tmp_path, store, model):
    family, widths = FAMILIES[model]
    pipe = store.pipeline(model)
    vectors = joined_vectors(widths) * 3
    thing = save_embedding(tmp_path / "thing.safetensors", "<thing>", vectors, None, widths, family.embedding_keys)
    other_t5 = vectors.clone()
    other_t5[:, -widths[-1]:] *= -1  # the same CLIP parts, another T5 part
    same_clip = save_embedding(tmp_path / "same-clip.safetensors", "<thing>", other_t5, None, widths, family.embedding_keys)
    kwargs = dict(prompt="a photo of <thing>", steps=1, seed=1, size=(64, 64), guidance=3.5)
    drawn = {
        "full": generate(pipe, embeddings=[thing], **kwargs),
        "half": generate(pipe, embeddings=[thing], strength=0.5, **kwargs),
        "other t5": generate(pipe, embeddings=[same_clip], **kwargs),
        "without": generate(pipe, **kwargs),  # '<thing>' as plain text
    }
    pictures = {name: np.asarray(images[0]).astype(float) for name, images in drawn.items()}
    for name in ("half", "other t5", "without"):  # the same seed: any difference comes from the vectors
        assert not np.array_equal(pictures["full"], pictures[name]), name
    assert [len(t) for t in family.tokenizers(pipe)] == [len(t) for t in family.tokenizers(store.pipeline(model))]
    assert all("<tinv-embedding-0>" not in t.get_vocab() for t in family.tokenizers(pipe))
    with pytest.raises(EmbeddingFormatError, match=r"made for a model with text width 64 \(the offline demo model\)"):
        generate(pipe, embeddings=[save_embedding(tmp_path / "sd.safetensors", "<sd>", torch.zeros(1, 64))], **kwargs)


def test_the_pipelines_family_decides_what_parts_without_our_metadata_are_for(tmp_path, store):
    """OneTrainer writes a part only for the text encoders it loaded: its SD 3.x file without T5
    holds clip_l and clip_g, as an SDXL file does, and its Flux.1 file without T5 clip_l alone."""
    from safetensors.torch import save_file

    from tinv_gui.embeddings import embeddings_in_pipeline
    from tinv_gui.families import StableDiffusionXL

    sd3 = store.pipeline("demo-sd3")
    clip_l, clip_g = torch.randn(2, 32) * 3, torch.randn(2, 64) * 3
    save_file({"clip_l": clip_l, "clip_g": clip_g}, tmp_path / "no-t5.safetensors")
    no_t5 = read_embedding(tmp_path / "no-t5.safetensors")
    assert [f.name for f in no_t5.families] == ["sdxl", "sd3"]
    assert "Stable Diffusion XL, or Stable Diffusion 3 without its t5 part" in no_t5.describe_width()
    assert set(formats.check_fits(no_t5, (32, 64), "x", StableDiffusionXL())) == {"clip_l", "clip_g"}  # demo-sdxl's widths
    # Into SD 3.x: the CLIP parts only; T5's prompt goes without the word, as OneTrainer and ComfyUI leave it out.
    with embeddings_in_pipeline(sd3, [no_t5]) as rewrite:
        assert [len(t) for t in (sd3.tokenizer, sd3.tokenizer_2, sd3.tokenizer_3)][2] == len(store.pipeline("demo-sd3").tokenizer_3)
        assert "<tinv-embedding-0>" in rewrite("a photo of no-t5", 0) and rewrite("a photo of no-t5 now", 2) == "a photo of  now"
        assert "<tinv-embedding-0>" not in sd3.tokenizer_3.get_vocab()
    kwargs = dict(prompt="a photo of no-t5", steps=1, seed=1, size=(64, 64), guidance=3.5)
    with_it, without = (np.asarray(generate(sd3, embeddings=e, **kwargs)[0]) for e in ([tmp_path / "no-t5.safetensors"], []))
    assert not np.array_equal(with_it, without)
    # Its metadata decides where it has some: our SDXL file is not SD 3.x's, our Flux.1 file not SD 3.x's.
    ours = save_embedding(tmp_path / "xl.safetensors", "<xl>", torch.cat([clip_l, clip_g], 1), None, (32, 64), ("clip_l", "clip_g"))
    assert [f.name for f in read_embedding(ours).families] == ["sdxl"]
    with pytest.raises(EmbeddingFormatError, match=r"text widths 32 \+ 64 \(Stable Diffusion XL\); the chosen model has text widths 32 \+ 64 \+ 128"):
        generate(sd3, embeddings=[ours], **kwargs)
    flux_file = save_embedding(tmp_path / "f.safetensors", "<f>", torch.zeros(1, 160), None, FLUX_TEXT_WIDTHS, Flux.embedding_keys)
    with pytest.raises(EmbeddingFormatError, match=r"text widths 32 \+ 128 \(Flux.1\); the chosen model has text widths 32 \+ 64 \+ 128 \(Stable Diffusion 3\)"):
        generate(sd3, prompt="f", embeddings=[flux_file], steps=1, size=(64, 64))
    # A file holding clip_l alone (SD 1.x's, for ComfyUI; or OneTrainer's Flux.1 without T5) goes into Flux.1's CLIP-L.
    save_file({"clip_l": clip_l}, tmp_path / "lone.safetensors")
    assert set(formats.check_fits(read_embedding(tmp_path / "lone.safetensors"), FLUX_TEXT_WIDTHS, "x", Flux())) == {"clip_l"}
    # convert keeps it as it is: the CLIP parts, still for either family (A1111 reads SDXL's clip_l + clip_g).
    for fmt in ("onetrainer", "a1111-safetensors"):
        back = read_embedding(formats.convert(tmp_path / "no-t5.safetensors", fmt, f"{tmp_path}/{fmt}/"))
        assert back.keys == ("clip_l", "clip_g") and torch.equal(back.joined(), no_t5.joined()) and len(back.families) == 2, fmt


def test_cli_generates_with_and_without_a_flux_embedding_as_the_playground_does(tmp_path, store):
    """The CLI's generate and the Playground run the same generation job (jobs.run_generation)."""
    from PIL import Image

    from tinv_gui import cli

    family, widths = FAMILIES["demo-flux"]
    file = write_embedding(formats.EmbeddingFile.from_joined("x", joined_vectors(widths) * 3, widths, family.embedding_keys), tmp_path / "my-cat.safetensors", "onetrainer")
    out = tmp_path / "cat.png"
    assert cli.main(["generate", "--model", "demo-flux", "--embedding", str(file), "--prompt", "a photo of my-cat", "--compare",
                     "--strength", "0.7", "--steps", "1", "--size", "64x64", "--guidance", "3.5", "--output", str(out)]) == 0
    with_word, without = (np.asarray(Image.open(path)) for path in (out, tmp_path / "cat-without.png"))
    assert with_word.shape == (64, 64, 3) and not np.array_equal(with_word, without)
