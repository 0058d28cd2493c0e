"""QuickEmbedding's speed-up must not change what it computes: the prompts' cached beginnings give
the same features and the same gradients as running every prompt whole."""

import torch

from tinv_gui.clip_space import CachedPrefixPrompts, pooled_text_features
from tinv_gui.device import choose_placement
from tinv_gui.embeddings import encode_with_placeholder, extended_vocabulary, pad_batch


def test_cached_prefixes_give_the_features_and_gradients_of_whole_prompts(store):
    clip = store.clip("demo", placement=choose_placement("cpu", "fp32"))
    tokenizer = clip.tokenizer
    vocab = clip.model.text_model.get_input_embeddings().num_embeddings
    token, ids = "<tst-thing>", [vocab, vocab + 1]
    prompts = [
        "a photo of a <tst-thing>",
        "<tst-thing> at the very start",
        "a long caption that goes on and on about the <tst-thing> sitting on a red chair in the sun",
        "two <tst-thing> and another <tst-thing>",
    ]
    encoded = [encode_with_placeholder(tokenizer, p, token, ids) for p in prompts]
    rows = [2, 0, 3, 1, 0]
    vectors = torch.randn(2, clip.model.config.text_config.hidden_size, requires_grad=True)

    with extended_vocabulary(clip.model.text_model, vectors):
        cached = CachedPrefixPrompts(clip, encoded, first_new_id=vocab)
        fast = cached.pooled(rows)
        (fast_grad,) = torch.autograd.grad(fast.square().sum(), vectors)
        whole = pooled_text_features(clip, pad_batch([encoded[r] for r in rows], tokenizer.eos_token_id))
        (whole_grad,) = torch.autograd.grad(whole.square().sum(), vectors)

    assert len(cached.suffixes[0]) == 3  # a step runs only the two new tokens and the end marker
    torch.testing.assert_close(fast, whole, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_grad, whole_grad, rtol=1e-4, atol=1e-5)
