"""8-bit weights (--fp8-weights): the denoiser's and T5's linear weights stored in fp8, scaled per
output row, computed in the placement's dtype one layer at a time; the loss and the gradient to the
word's vectors stay close to those of the unrounded model; MPS, which has no 8-bit floats, is refused.

fp32 compute is pinned (the CPU placement's), so these pass on CPUs with and without native bf16."""

import pytest
import torch

from tinv_gui import cli
from tinv_gui.data import TrainImage
from tinv_gui.device import FP8, choose_placement, store_linear_weights
from tinv_gui.embeddings import encode_with_placeholder, extended_vocabularies_from
from tinv_gui.families import family_of
from tinv_gui.methods.textual_inversion import (
    DiffusionLoss,
    TokenParts,
    encode_latents,
    starting_vectors,
)
from tinv_gui.models import ModelStore, pipeline_text_widths

EXACT = choose_placement("cpu", "fp32")
EIGHT_BIT = choose_placement("cpu", "fp32", fp8_weights=True)
TOKEN = "<fp8-thing>"
MODELS = ("demo", "demo-flux")


def loss_and_gradient(pipe, latents):
    """The textual-inversion loss of one fixed draw and its gradient to the word's vectors (all parts)."""
    family = family_of(pipe)
    trains = (True,) * family.text_encoder_count
    parts = TokenParts.of(starting_vectors(pipe, "cat", 1, 0), pipeline_text_widths(pipe), trains, EXACT.device)
    encoded = []
    for tokenizer, encoder, length in zip(family.tokenizers(pipe), family.text_encoders(pipe), family.prompt_lengths(pipe)):
        size = encoder.get_input_embeddings().num_embeddings
        encoded.append([encode_with_placeholder(tokenizer, f"a photo of {TOKEN}", TOKEN, [size], length)])
    with extended_vocabularies_from(family.text_encoders(pipe), parts.sources()):
        loss = DiffusionLoss(pipe, EXACT, latents, encoded, False, 1, False, seed=3, trains=trains)()
        (gradient,) = torch.autograd.grad(loss, parts.trained)
    return loss.item(), gradient


def linear_weight_bytes(module) -> set[int]:
    return {layer.weight.element_size() for layer in module.modules() if isinstance(layer, torch.nn.Linear)}


@pytest.fixture(scope="module", params=MODELS)
def both(request):
    """(model, {placement name: (pipeline's denoiser and T5 weight bytes, loss, gradient)}, store's loads)."""
    from conftest import make_picture

    model, store, results = request.param, ModelStore(), {}
    for name, placement in (("exact", EXACT), ("fp8", EIGHT_BIT)):
        pipe = store.pipeline(model, placement)
        family = family_of(pipe)
        t5 = [] if family.t5_encoder is None else [family.text_encoders(pipe)[family.t5_encoder]]
        clips = [te for i, te in enumerate(family.text_encoders(pipe)) if i != family.t5_encoder]
        images = [TrainImage(f"p{i}.png", make_picture(i, size=(32, 32)).convert("RGB")) for i in range(1)]
        latents = encode_latents(pipe, images, placement, mirror=False)
        bytes_ = {"denoiser": linear_weight_bytes(family.denoiser(pipe)), "t5": set().union(*map(linear_weight_bytes, t5)),
                  "clip": set().union(*map(linear_weight_bytes, clips))}
        results[name] = (bytes_, *loss_and_gradient(pipe, latents))
    return model, results, store.loads


def test_the_denoisers_and_t5s_linear_weights_are_one_byte_with_the_option_and_not_without(both):
    model, results, loads = both
    exact, fp8 = results["exact"][0], results["fp8"][0]
    assert exact["denoiser"] == {4} and fp8["denoiser"] == {1}
    if model == "demo-flux":
        assert exact["t5"] == {4} and fp8["t5"] == {1}
    assert fp8["clip"] == exact["clip"] == {4}  # the CLIPs stay as they are
    assert loads == 2  # the option is part of the pipeline's key: the 8-bit pipeline is not the other one


def test_loss_and_gradient_to_the_words_vectors_stay_close_to_the_unrounded_models(both):
    """Each weight is rounded once to fp8's 3 mantissa bits (at most 1/16 of its size, about 2% on
    average); the loss, mostly the noise the prediction misses, moves far less (measured 0.04% on
    demo and demo-flux), and the gradient, through every layer of the denoiser and T5, a few
    percent (measured 4.7% and 7.8%, cosine 0.999 and 0.997): 1%, 20% and 0.98 leave room for
    other draws, and a wrong scale or a lost row would miss them by far."""
    _, results, _ = both
    (_, loss, gradient), (_, loss8, gradient8) = results["exact"], results["fp8"]
    assert loss8 == pytest.approx(loss, rel=0.01)
    assert relative_error(gradient8, gradient) < 0.2
    assert torch.nn.functional.cosine_similarity(gradient8.flatten(), gradient.flatten(), dim=0) > 0.98


def relative_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return ((value - exact).norm() / exact.norm()).item()


def test_each_row_is_scaled_so_small_weights_keep_their_precision_and_the_backward_pass_saves_no_upcast_copy():
    """A layer whose rows differ by 10^4 in size: each row keeps fp8's precision (within 1/16 of
    its largest weight's size, per weight), where a plain cast to fp8 flushes the small row into
    fp8's subnormals. The outputs and the gradient to the inputs are those of a float32 layer
    holding the rounded weights, with and without recomputation, and the graph saves the 8-bit
    weight, not an upcast copy."""
    import torch.utils.checkpoint

    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 4).requires_grad_(False)
    with torch.no_grad():
        layer.weight[:2] *= 1e-4  # two rows of tiny weights, two of ordinary ones
    exact = layer.weight.detach().clone()
    rounded = torch.nn.Linear(256, 4).requires_grad_(False)
    rounded.load_state_dict(layer.state_dict())
    store_linear_weights(layer, FP8)
    assert layer.weight.element_size() == 1
    with torch.no_grad():
        rounded.weight.copy_(layer.weight.view(FP8).float() * layer.weight_scale)
    row_size = exact.abs().amax(dim=1, keepdim=True)
    assert ((rounded.weight - exact).abs() <= row_size / 16).all()
    plain = exact.to(FP8).float()  # unscaled, the tiny rows lose most of their bits
    assert ((plain[:2] - exact[:2]).abs() > row_size[:2] / 16).any()

    saved = []
    inputs = torch.randn(3, 256, requires_grad=True)
    for recompute in (False, True):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
            out = torch.utils.checkpoint.checkpoint(layer, inputs, use_reentrant=False) if recompute else layer(inputs)
            (gradient,) = torch.autograd.grad(out.square().sum(), inputs)
        expected = rounded(inputs)
        (expected_gradient,) = torch.autograd.grad(expected.square().sum(), inputs)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-5, atol=1e-7)
    assert (torch.float32, (4, 256)) not in saved


def test_a_cli_run_with_8_bit_weights_writes_a_word_the_full_precision_model_loads(picture_dir, tmp_path, capsys):
    from tinv_gui.embeddings import load_into_pipeline, unload_from_pipeline
    from tinv_gui.formats import read_embedding

    out = tmp_path / "out"
    assert cli.main(["train", "--method", "textual-inversion", "--model", "demo-flux", "--images", str(picture_dir), "--token", TOKEN,
                     "--init", "cat", "--steps", "2", "--batch-size", "1", "--resolution", "64", "--no-flip", "--fp8-weights",
                     "--device", "cpu", "--precision", "fp32", "--log-with", "none", "--output", str(out)]) == 0
    assert "linear weights stored in fp8" in capsys.readouterr().err
    saved = read_embedding(out / "learned_embeds.safetensors")
    assert saved.keys == ("clip_l", "t5") and all(torch.isfinite(v).all() for v in saved.parts.values())
    store = ModelStore()
    pipe = store.pipeline("demo-flux", EXACT)
    start = starting_vectors(pipe, "cat", 1, 0)
    names = load_into_pipeline(pipe, TOKEN, saved.parts)
    try:
        family = family_of(pipe)
        for key, encoder, tokenizer in zip(family.embedding_keys, family.text_encoders(pipe), family.tokenizers(pipe)):
            assert torch.equal(encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(names)], saved.parts[key])
    finally:
        unload_from_pipeline(pipe, names)
    assert not torch.equal(torch.cat(list(saved.parts.values()), dim=-1), start)  # it trained


def test_mps_is_refused_with_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(ValueError, match=r"8-bit weights \(--fp8-weights\).*MPS.*--no-fp8-weights.*--device cpu"):
        choose_placement("mps", "auto", fp8_weights=True)
    assert not choose_placement("mps", "auto").fp8_weights  # without the option, MPS is as before


def test_the_option_is_part_of_the_placement_and_says_so():
    assert EIGHT_BIT != EXACT and str(EIGHT_BIT) != str(EXACT)  # the store's pipeline key
    assert "linear weights stored in fp8" in EIGHT_BIT.describe() and "fp8" not in EXACT.describe()


def test_the_playground_draws_with_the_method_tabs_8_bit_choice(tmp_path, monkeypatch):
    """Generation shares the training's pipeline, so the Playground passes the Method tab's choice on."""
    import types

    import gradio as gr

    from tinv_gui.ui.app import TinvApp
    from tinv_gui.ui.workspace import Workspaces

    app = TinvApp(workspaces=Workspaces(tmp_path), hub=(False, "offline"))
    asked = []

    def generate(settings):
        asked.append(settings.fp8_weights)
        raise ValueError("not drawn here")

    monkeypatch.setattr(app.engine, "generate", generate)
    request = types.SimpleNamespace(session_hash="visitor")
    for choice in (True, False):
        with pytest.raises(gr.Error, match="not drawn here"):
            list(app.generate("demo", "none", "a cube", "", 2, 7.5, 0, "Model default", "Model default", 1, 1.0, False, request, choice))
    assert asked == [True, False]
