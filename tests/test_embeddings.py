"""New tokens: validation, initialization, only-new-vectors training, saving."""

import pytest
import torch
from safetensors import safe_open

from tinv_gui.demo_model import load_clip_tokenizer
from tinv_gui.embeddings import (
    TokenError,
    encode_with_placeholder,
    extended_vocabulary,
    initial_vectors,
    save_embedding,
    token_names,
    validate_token,
)
from tinv_gui.formats import read_embedding


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


def test_tokenizer_is_clips_real_bpe(tokenizer):
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.model_max_length == 77 and len(tokenizer) == 49408


@pytest.mark.parametrize("bad", ["", "   ", "cat", "../x", "a/b", "a\\b", "two words", "x\x00y", "<" + "a" * 80 + ">"])
def test_bad_tokens_are_refused(tokenizer, bad):
    with pytest.raises(TokenError):
        validate_token(bad, tokenizer)


def test_good_token_passes(tokenizer):
    assert validate_token(" <my-cat> ", tokenizer) == "<my-cat>"
    assert token_names("<t>", 3) == ["<t>", "<t>_1", "<t>_2"]


def test_initialization_from_words(tokenizer):
    table = torch.randn(49408, 8)
    dog = tokenizer("dog", add_special_tokens=False).input_ids
    assert torch.equal(initial_vectors(table, tokenizer, "dog", 1)[0], table[dog[0]])
    red, ball = tokenizer("red ball", add_special_tokens=False).input_ids
    assert torch.allclose(initial_vectors(table, tokenizer, "red ball", 1)[0], (table[red] + table[ball]) / 2)
    three = initial_vectors(table, tokenizer, "red ball", 3)
    assert torch.equal(three[0], table[red]) and torch.equal(three[1], table[ball]) and torch.equal(three[2], table[red])
    with pytest.raises(TokenError, match="initializer"):
        initial_vectors(table, tokenizer, "  ", 1)
    assert initial_vectors(table, tokenizer, None, 2).shape == (2, 8)


def test_placeholder_expands_to_new_ids(tokenizer):
    ids = encode_with_placeholder(tokenizer, "a photo of <t> on grass", "<t>", [49408, 49409])
    assert ids == [49406, 320, 1125, 539, 49408, 49409, 525, 5922, 49407]
    long = encode_with_placeholder(tokenizer, "word " * 100 + "<t>", "<t>", [49408])
    assert len(long) == 77 and long[-1] == 49407


def test_only_new_vectors_receive_gradients():
    encoder = torch.nn.Module()
    table = torch.nn.Embedding(10, 4)
    table.requires_grad_(False)
    encoder.emb = table
    encoder.get_input_embeddings = lambda: encoder.emb
    encoder.set_input_embeddings = lambda m: setattr(encoder, "emb", m)
    new = torch.zeros(2, 4, requires_grad=True)
    with extended_vocabulary(encoder, new) as first_new_id:
        assert first_new_id == 10
        out = encoder.emb(torch.tensor([[1, 10, 11, 3]]))
        assert torch.equal(out[0, 0], table.weight[1]) and torch.equal(out[0, 1], new[0].detach())
        (out * torch.arange(4.0)).sum().backward()
    assert encoder.emb is table  # restored
    assert table.weight.grad is None
    assert torch.equal(new.grad, torch.tensor([[0.0, 1, 2, 3], [0.0, 1, 2, 3]]))


def test_save_is_diffusers_layout_with_metadata(tmp_path):
    vectors = torch.randn(2, 8)
    path = save_embedding(tmp_path / "e.safetensors", "<t>", vectors, {"base_model": "demo", "method": "quick", "steps": 5})
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["<t>"]
        meta = f.metadata()
    assert meta["base_model"] == "demo" and meta["method"] == "quick" and meta["steps"] == "5" and meta["token"] == "<t>"
    read = read_embedding(path)
    token, loaded = read.token, read.vectors
    assert token == "<t>" and torch.equal(loaded, vectors)
    assert [p.name for p in tmp_path.iterdir()] == ["e.safetensors"]  # no temporary left behind


def test_embedding_names_in_a_prompt_become_their_tokens_in_one_pass_as_whole_words_in_any_case(store):
    from tinv_gui.embeddings import embeddings_in_pipeline, mentions
    from tinv_gui.formats import EmbeddingFile

    pipe = store.pipeline("demo")
    named = [EmbeddingFile(name, torch.randn(1, 64)) for name in ("my-cat-2", "embedding", "Fresh")]
    with embeddings_in_pipeline(pipe, named) as rewrite:
        # 'embedding' is not found inside the token that replaced 'my-cat-2'; 'freshly' is another word.
        assert rewrite("my-cat-2 and embedding, fresh-looking freshly MY-CAT-2") == (
            "<tinv-embedding-0> and <tinv-embedding-1>, <tinv-embedding-2>-looking freshly <tinv-embedding-0>"
        )
        assert rewrite(None) is None
    assert len(pipe.tokenizer) == 49408
    assert mentions("a FRESH apple", "fresh") and not mentions("freshly cut", "fresh") and mentions("a <x>s", "<x>")
