"""QuickEmbedding on the demo model: pooling, padding, training only the new vectors."""

import torch

from tinv_gui.clip_space import pooled_text_features
from tinv_gui.data import load_dataset
from tinv_gui.embeddings import encode_with_placeholder, extended_vocabulary, pad_batch
from tinv_gui.events import Reporter
from tinv_gui.methods.quick import train_quick
from tinv_gui.settings import TrainSettings


def test_padding_to_the_longest_prompt_equals_padding_to_77(store):
    clip = store.clip("demo")
    tok = clip.tokenizer
    new = torch.randn(2, clip.model.text_model.get_input_embeddings().weight.shape[1])
    prompts = ["a photo of <t>", "a cropped photo of the small shiny <t> on a table", "<t>"]
    ids = [encode_with_placeholder(tok, p, "<t>", [49408, 49409]) for p in prompts]
    with extended_vocabulary(clip.model.text_model, new), torch.no_grad():
        short = pooled_text_features(clip, pad_batch(ids, tok.pad_token_id))
        full = pooled_text_features(clip, pad_batch([s + [tok.pad_token_id] * (77 - len(s)) for s in ids], tok.pad_token_id))
    assert pad_batch(ids, tok.pad_token_id).shape[1] < 20
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)


def test_pooling_is_at_the_first_end_token_not_the_largest_id(store):
    clip = store.clip("demo")
    tok = clip.tokenizer
    ids = torch.tensor([encode_with_placeholder(tok, "a photo of <t> here", "<t>", [49408])])
    new = torch.randn(1, clip.model.text_model.get_input_embeddings().weight.shape[1])
    with extended_vocabulary(clip.model.text_model, new), torch.no_grad():
        pooled = pooled_text_features(clip, ids)
        hidden = clip.model.text_model(input_ids=ids).last_hidden_state
    eot = ids[0].tolist().index(tok.eos_token_id)
    torch.testing.assert_close(pooled[0], clip.model.text_projection(hidden[0, eot]))
    wrong = clip.model.text_projection(hidden[0, int(ids[0].argmax())])  # argmax lands on the new token
    assert not torch.allclose(pooled[0], wrong)


def test_loss_falls_and_only_the_new_vectors_change(store, picture_dir):
    clip = store.clip("demo")
    before = {k: v.clone() for k, v in clip.model.state_dict().items()}
    images = load_dataset(picture_dir, size=74, min_side=32)
    settings = TrainSettings(images=picture_dir, token="<q>", init="ball", steps=25, batch_size=8, method="quick").resolved()
    losses = []
    reporter = Reporter(lambda e: losses.append(e.loss) if e.kind == "progress" else None, total_steps=25)
    result = train_quick(clip, images, settings, reporter)
    assert result.steps_done == 25 and len(losses) == 25
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:3]) / 3
    after = clip.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is untouched
    assert clip.model.text_model.get_input_embeddings().num_embeddings == 49408
