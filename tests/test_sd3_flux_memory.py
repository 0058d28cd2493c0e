"""What keeps SD 3.x / Flux.1 training within a GPU's memory, on demo-sd3 and demo-flux: a text
encoder whose part does not train (T5 under --train-encoders clip) runs once, before the steps,
and waits off the accelerator; --gradient-checkpointing recomputes the transformer's blocks in the
backward pass and changes neither the loss nor the gradient (fp32)."""

import contextlib
from unittest import mock

import pytest
import torch

from tinv_gui.data import TrainImage
from tinv_gui.device import Placement
from tinv_gui.embeddings import encode_with_placeholder, extended_vocabularies_from
from tinv_gui.families import family_of
from tinv_gui.methods import textual_inversion as ti
from tinv_gui.methods.textual_inversion import (
    DiffusionLoss,
    TokenParts,
    activation_recomputation,
    encode_latents,
    off_the_accelerator,
    starting_vectors,
)
from tinv_gui.models import pipeline_text_widths
from tinv_gui.settings import TrainSettings

FP32_CPU = Placement(torch.device("cpu"), torch.float32, None)
TOKEN = "<mem-thing>"
MODELS = ("demo-sd3", "demo-flux")


@contextlib.contextmanager
def counting_forwards(modules):
    """Within the block, `calls[i]` lists, for each forward of modules[i], whether gradients were
    being recorded (a step's forward) or not (a computation made once, under no_grad)."""
    calls = [[] for _ in modules]
    hooks = [m.register_forward_hook(lambda *_, i=i: calls[i].append(torch.is_grad_enabled())) for i, m in enumerate(modules)]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


def diffusion_loss(pipe, trains, latents, seed=0):
    """The token's starting vectors split as `trains` says, and a function making a DiffusionLoss
    on `latents` with them, as train_diffusion makes it (call it where the vectors are in the
    text encoders)."""
    family = family_of(pipe)
    parts = TokenParts.of(starting_vectors(pipe, "cat", 1, 0), pipeline_text_widths(pipe), trains, FP32_CPU.device)
    encoded = []
    for tokenizer, encoder, length in zip(family.tokenizers(pipe), family.text_encoders(pipe), family.prompt_lengths(pipe)):
        size = encoder.get_input_embeddings().num_embeddings
        encoded.append([encode_with_placeholder(tokenizer, f"a photo of {TOKEN}", TOKEN, [size], length)])
    return parts, (lambda: DiffusionLoss(pipe, FP32_CPU, latents, encoded, False, 1, False, seed, trains=trains))


def picture():
    from conftest import make_picture

    return make_picture(0, size=(32, 32)).convert("RGB")


@pytest.fixture(scope="module")
def latents(store):
    """{model: the latents of one 32 px picture}, encoded once."""
    return {model: encode_latents(store.pipeline(model), [TrainImage("p.png", picture())], FP32_CPU, mirror=False) for model in MODELS}


def test_an_encoder_whose_part_does_not_train_runs_once_before_the_steps(store, latents):
    model = "demo-sd3"  # Flux.1 runs the same code with one CLIP fewer
    pipe = store.pipeline(model)
    family = family_of(pipe)
    encoders = family.text_encoders(pipe)
    for choice in ("clip", "t5"):
        trains = family.trained_encoders(choice)
        parts, make_loss = diffusion_loss(pipe, trains, latents[model])
        with extended_vocabularies_from(encoders, parts.sources()), counting_forwards(encoders) as calls:
            compute_loss = make_loss()
            before = [list(c) for c in calls]
            compute_loss().backward()
        for index, (trained, made, seen) in enumerate(zip(trains, before, calls)):
            if trained:  # runs in each step, with gradients to its part
                assert made == [] and seen == [True], (choice, index, seen)
            else:  # its prompt states were computed once, up front, and it no longer runs
                assert made and not any(made) and seen == made, (choice, index, seen)
        assert parts.trained.grad is not None and parts.trained.grad.abs().sum() > 0


class AcceleratorModule(torch.nn.Module):
    """A module that records where it is sent, instead of going there (no GPU here)."""

    def __init__(self):
        super().__init__()
        self.moves = []

    def to(self, device, *args, **kwargs):
        self.moves.append(str(device))
        return self


def test_encoders_that_ran_once_wait_in_the_computers_memory_while_the_steps_run():
    t5, clip = AcceleratorModule(), AcceleratorModule()
    on_gpu = Placement(torch.device("cuda"), torch.bfloat16, torch.bfloat16)
    with off_the_accelerator([t5], on_gpu) as parked:
        assert parked and t5.moves == ["cpu"] and clip.moves == []
    assert t5.moves == ["cpu", "cuda"]  # the shared pipeline gets it back
    with off_the_accelerator([t5], FP32_CPU) as parked:  # nothing to move on a CPU
        assert not parked and t5.moves == ["cpu", "cuda"]


@pytest.mark.parametrize("choice, parked", [("clip", ("t5",)), ("t5", ("clip_l", "clip_g")), ("all", ())])
def test_training_parks_exactly_the_encoders_that_do_not_train(choice, parked, store, tmp_path):
    """train_diffusion hands off_the_accelerator the text encoders of the parts that keep their start."""
    pipe = store.pipeline("demo-sd3")
    family = family_of(pipe)
    by_key = dict(zip(family.embedding_keys, family.text_encoders(pipe)))
    seen = []

    @contextlib.contextmanager
    def spy(modules, placement):
        seen.append(list(modules))
        yield False

    def no_steps(vectors, compute_loss, loop, reporter, *args, **kwargs):
        raise KeyboardInterrupt  # the parking is decided before the first step: stop there

    settings = TrainSettings(
        images=str(tmp_path), token=TOKEN, model="demo-sd3", output_dir=str(tmp_path), method="textual-inversion", init="cat",
        steps=1, batch_size=1, grad_accum=1, resolution=64, flip=False, train_encoders=choice, device="cpu", precision="fp32",
    ).resolved()
    images = [TrainImage("p.png", picture())]
    reporter, writer = mock.Mock(steps_done=0), mock.Mock()
    with (
        mock.patch.object(ti, "DiffusionLoss") as loss,  # its precomputation is the test above's
        mock.patch.object(ti, "off_the_accelerator", spy),
        mock.patch.object(ti, "optimize", no_steps),
        pytest.raises(KeyboardInterrupt),
    ):
        ti.train_diffusion(pipe, FP32_CPU, images, settings, reporter, writer, starting_vectors(pipe, "cat", 1, 0))
    assert seen == [[by_key[key] for key in parked]]
    assert loss.call_args.args[10] == tuple(key not in parked for key in family.embedding_keys)  # the loss computes them once


@pytest.mark.parametrize("model", MODELS)
def test_gradient_checkpointing_recomputes_the_transformer_blocks_and_changes_no_number(model, store, latents):
    pipe = store.pipeline(model)
    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    first_block = denoiser.transformer_blocks[0]
    trains = (True,) * family.text_encoder_count
    results = {}
    for checkpointing in (False, True):
        parts, make_loss = diffusion_loss(pipe, trains, latents[model])
        with (
            extended_vocabularies_from(family.text_encoders(pipe), parts.sources()),
            activation_recomputation(denoiser, family.recomputed_layers(denoiser), checkpointing),
            mock.patch.object(first_block, "forward", wraps=first_block.forward) as block_forward,  # hooks miss a recomputation
        ):
            assert denoiser.is_gradient_checkpointing == checkpointing
            loss = make_loss()()
            (gradient,) = torch.autograd.grad(loss, parts.trained)
        results[checkpointing] = loss.detach(), gradient, block_forward.call_count
        assert not denoiser.is_gradient_checkpointing  # the shared pipeline is left as it was
    (loss, gradient, calls), (loss_ckpt, gradient_ckpt, calls_ckpt) = results[False], results[True]
    assert (calls, calls_ckpt) == (1, 2)  # the block ran again in the backward pass
    assert torch.allclose(loss, loss_ckpt, rtol=1e-6, atol=0) and gradient.abs().sum() > 0
    assert torch.allclose(gradient, gradient_ckpt, rtol=1e-5, atol=1e-7)
