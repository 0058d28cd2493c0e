"""Generating pictures from learned embeddings and saved prompt embeddings, on the demo model."""

import numpy as np
import pytest
import torch
from conftest import cli_here
from PIL import Image

from tinv_gui.embeddings import save_embedding
from tinv_gui.files import atomic_save_safetensors
from tinv_gui.generate import generate, parse_size


@pytest.fixture(scope="module")
def pipe(store):
    return store.pipeline("demo")


def pixels(images):
    return np.asarray(images[0], dtype=np.int16)


def vector_file(path, token, seed, dim=64, count=2):
    return save_embedding(path, token, torch.randn(count, dim, generator=torch.Generator().manual_seed(seed)))


def test_embedding_token_is_used_and_unloaded_afterwards(pipe, tmp_path):
    words = len(pipe.tokenizer)
    first, second = vector_file(tmp_path / "a.safetensors", "<thing>", 1), vector_file(tmp_path / "b.safetensors", "<thing>", 2)
    common = dict(prompt="a photo of <thing>", steps=2, seed=7)
    with_first = generate(pipe, embeddings=[first], **common)
    assert len(pipe.tokenizer) == words  # the cached pipeline is clean again
    again = generate(pipe, embeddings=[first], **common)
    with_second = generate(pipe, embeddings=[second], **common)
    assert with_first[0].size == (64, 64)
    assert np.array_equal(pixels(with_first), pixels(again))  # same seed, same picture
    assert not np.array_equal(pixels(with_first), pixels(with_second))  # the vectors matter
    assert len(pipe.tokenizer) == words


def test_failed_load_leaves_the_pipeline_clean(pipe, tmp_path):
    words = len(pipe.tokenizer)
    good = vector_file(tmp_path / "good.safetensors", "<good>", 1)
    wrong_width = vector_file(tmp_path / "wide.safetensors", "<wide>", 1, dim=32)
    with pytest.raises(ValueError):
        generate(pipe, prompt="<good> <wide>", embeddings=[good, wrong_width], steps=1)
    assert len(pipe.tokenizer) == words


def test_prompt_embeds_file_gives_the_same_picture_as_its_text(pipe, tmp_path):
    embeds = pipe.encode_prompt("a red cube", torch.device("cpu"), 1, True, "")
    path = atomic_save_safetensors({"prompt_embeds": embeds[0], "negative_prompt_embeds": embeds[1]}, tmp_path / "p.safetensors")
    from_file = generate(pipe, prompt_embeds=path, steps=2, seed=3, size=(48, 64))
    from_text = generate(pipe, prompt="a red cube", steps=2, seed=3, size=(48, 64))
    assert from_file[0].size == (48, 64)
    assert np.abs(pixels(from_file) - pixels(from_text)).max() <= 1


def test_bad_requests_are_explained(pipe, tmp_path):
    with pytest.raises(ValueError, match="nope.safetensors does not exist"):
        generate(pipe, prompt="x", embeddings=[tmp_path / "nope.safetensors"], steps=1)
    with pytest.raises(ValueError, match="either a prompt or a prompt_embeds"):
        generate(pipe, prompt="x", prompt_embeds="p.safetensors")
    narrow = atomic_save_safetensors({"prompt_embeds": torch.zeros(1, 77, 32)}, tmp_path / "narrow.safetensors")
    with pytest.raises(ValueError, match="width 32"):
        generate(pipe, prompt_embeds=narrow, steps=1)
    assert parse_size("512x768") == (512, 768)
    for bad in ("512", "512x77", "axb"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_cli_generate_with_an_embedding(tmp_path, capsys):
    embedding = vector_file(tmp_path / "e.safetensors", "<thing>", 1)
    output = tmp_path / "out" / "picture.png"
    done = cli_here(capsys, "generate", "--model", "demo", "--embedding", str(embedding),
                    "--prompt", "a photo of <thing>", "--steps", "2", "--seed", "1", "--output", str(output))
    assert done.returncode == 0, done.stderr[-2000:]
    assert Image.open(output).size == (64, 64)


def test_an_embedding_named_with_an_ordinary_word_is_spliced_in_where_the_prompt_says_it(pipe, tmp_path):
    from tinv_gui.formats import EmbeddingFile, write_embedding

    assert "fresh</w>" in pipe.tokenizer.get_vocab()  # diffusers alone refuses this name
    vectors = torch.randn(2, 64, generator=torch.Generator().manual_seed(5))
    fresh = write_embedding(EmbeddingFile("x", vectors), tmp_path / "fresh.pt", "a1111-pt")  # typed 'fresh', as in A1111
    made_up = write_embedding(EmbeddingFile("<zq>", vectors), tmp_path / "learned_embeds.safetensors", "diffusers")
    words = len(pipe.tokenizer)
    common = dict(steps=2, seed=4)
    as_word = generate(pipe, prompt="a photo of Fresh, fresh-looking", embeddings=[fresh], **common)
    as_token = generate(pipe, prompt="a photo of <zq>, <zq>-looking", embeddings=[made_up], **common)
    plain = generate(pipe, prompt="a photo of Fresh, fresh-looking", **common)
    assert np.array_equal(pixels(as_word), pixels(as_token))  # the same vectors, in the same places
    assert not np.array_equal(pixels(as_word), pixels(plain))
    # A longer word that only starts with the name is left alone, as A1111's token match does.
    assert np.array_equal(pixels(generate(pipe, prompt="freshly cut", embeddings=[fresh], **common)), pixels(generate(pipe, prompt="freshly cut", **common)))
    assert len(pipe.tokenizer) == words


def test_cli_generate_takes_diffusers_sdxl_two_files_as_two_embeddings(tmp_path, capsys):
    from tinv_gui.demo_model import SDXL_TEXT_WIDTHS
    from tinv_gui.formats import EmbeddingFile, write_embedding

    both = EmbeddingFile("<two>", {"clip_l": torch.randn(2, SDXL_TEXT_WIDTHS[0]), "clip_g": torch.randn(2, SDXL_TEXT_WIDTHS[1])})
    first = write_embedding(both, tmp_path / "learned_embeds.safetensors", "diffusers")
    output = tmp_path / "picture.png"
    from tinv_gui import cli

    common = ["generate", "--model", "demo-sdxl", "--prompt", "a photo of <two>", "--steps", "1", "--output", str(output)]
    assert cli.main(common + ["--embedding", str(first), "--embedding", str(tmp_path / "learned_embeds_2.safetensors")]) == 0
    assert output.is_file()
    assert cli.main(common + ["--embedding", str(first)]) == 2  # one half alone is refused, with what to give
    assert "If it is the first of diffusers' two SDXL files" in capsys.readouterr().err
