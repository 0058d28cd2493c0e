"""Precision: the automatic choice per kind of CPU, and bf16 training that keeps one copy of the
frozen weights, fp32 trainable vectors and a loss close to fp32's.

bf16 is pinned where numbers are compared, so these pass on CPUs with and without native bf16
(without, bf16 is slow but the demo model is tiny)."""

import pytest
import torch

from tinv_gui import device
from tinv_gui.data import load_dataset
from tinv_gui.device import Placement, choose_placement
from tinv_gui.embeddings import extended_vocabulary
from tinv_gui.events import Log, Reporter
from tinv_gui.jobs import run_training
from tinv_gui.methods.textual_inversion import DiffusionLoss, encode_latents
from tinv_gui.models import ModelStore, text_encoders
from tinv_gui.settings import TrainSettings

TOKEN = "<tst-precise>"


# What the automatic choice picks on a CPU without native bf16, built here so it does not depend on the CPU.
LEAN = Placement(torch.device("cpu"), torch.float32, None, lean_storage=True)


def placement_for(precision: str) -> Placement:
    return LEAN if precision == "lean" else choose_placement("cpu", precision)


@pytest.fixture(scope="module")
def stores():
    """A store holding the demo pipeline in exact fp32, one in bf16 and one in lean fp32 (a store keeps one pipeline)."""
    stores = {precision: ModelStore() for precision in ("fp32", "bf16", "lean")}
    for precision, store in stores.items():
        store.pipeline("demo", placement_for(precision))
    return stores


@pytest.fixture(scope="module")
def pipelines(stores):
    return {precision: store.pipeline("demo", placement_for(precision)) for precision, store in stores.items()}


def frozen_modules(pipe) -> list[torch.nn.Module]:
    return [pipe.unet, pipe.vae, *text_encoders(pipe)]


@pytest.mark.parametrize(
    ("flags", "cap", "expected"),
    [
        ({"avx512f", "avx512_bf16"}, None, torch.bfloat16),
        ({"amx_bf16", "avx512_bf16"}, None, torch.bfloat16),
        ({"avx512f", "avx512_bf16"}, "AVX512_CORE", torch.float32),  # oneDNN capped: computes as without
        ({"avx512f", "avx2"}, None, torch.float32),  # emulated bf16 is slower than fp32
        ({"avx2"}, None, torch.float32),
    ],
)
def test_automatic_precision_follows_the_cpu_and_says_why(monkeypatch, flags, cap, expected):
    monkeypatch.setattr(device, "cpu_flags", lambda: flags)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    else:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    placement = choose_placement("cpu", "auto")
    assert placement.weight_dtype == expected  # bf16 weights are stored once, in bf16
    assert placement.autocast_dtype == (torch.bfloat16 if expected == torch.bfloat16 else None)
    said = placement.describe()
    assert "automatic" in said and ("bf16 weights, bf16 compute" if expected == torch.bfloat16 else "fp32 weights, fp32 compute") in said
    assert (cap or "") in said
    assert choose_placement("cpu", "auto") == placement  # the reason does not make another pipeline
    # Without native bf16, the automatic fp32 stores the idle VAE and the text encoders' linear
    # weights in bf16; an explicit --precision fp32 stays exact.
    assert placement.lean_storage == (expected == torch.float32)
    assert ("stored in bf16" in said) == placement.lean_storage
    assert not choose_placement("cpu", "fp32").lean_storage


def test_explicit_fp32_keeps_every_weight_in_fp32(pipelines):
    pipe = pipelines["fp32"]
    assert {p.dtype for module in frozen_modules(pipe) for p in module.parameters()} == {torch.float32}


def test_bf16_stores_frozen_weights_once_and_the_step_saves_no_copy_of_them(pipelines, picture_dir):
    pipe = pipelines["bf16"]
    placement = choose_placement("cpu", "bf16")
    parameters = [p for module in frozen_modules(pipe) for p in module.parameters()]
    assert parameters and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in parameters)
    fp32_bytes = sum(p.numel() * 4 for m in frozen_modules(pipelines["fp32"]) for p in m.parameters())
    assert sum(p.numel() * p.element_size() for p in parameters) * 2 == fp32_bytes

    # What the backward pass keeps: the weights themselves, never a converted copy of them.
    weight_shapes = {tuple(p.shape) for p in parameters if p.dim() >= 2}
    stored = {p.untyped_storage().data_ptr() for p in parameters}
    copies = []

    def pack(tensor):
        if tuple(tensor.shape) in weight_shapes and tensor.untyped_storage().data_ptr() not in stored and not tensor.requires_grad:
            copies.append(tuple(tensor.shape))
        return tensor

    latents = encode_latents(pipe, load_dataset(picture_dir, 64), placement, mirror=False)
    vocab = pipe.text_encoder.get_input_embeddings().num_embeddings
    prompt = [[pipe.tokenizer.bos_token_id, 320, 1125, 539, vocab, pipe.tokenizer.eos_token_id]]
    vectors = torch.zeros(1, pipe.text_encoder.config.hidden_size, requires_grad=True)
    loss = DiffusionLoss(pipe, placement, latents, [prompt], False, batch_size=2, mirror=False, seed=0)
    with extended_vocabulary(pipe.text_encoder, vectors), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = loss()
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert vectors.grad is not None and vectors.grad.dtype == torch.float32 and vectors.grad.abs().sum() > 0
    assert copies == []


def test_bf16_loss_and_gradient_match_fp32(pipelines, picture_dir):
    results = {}
    for precision, pipe in pipelines.items():
        placement = placement_for(precision)
        latents = encode_latents(pipe, load_dataset(picture_dir, 64), placement, mirror=False)
        vocab = pipe.text_encoder.get_input_embeddings().num_embeddings
        prompt = [[pipe.tokenizer.bos_token_id, 320, 1125, 539, vocab, pipe.tokenizer.eos_token_id]]
        table = pipelines["fp32"].text_encoder.get_input_embeddings().weight
        vectors = table[[1929]].detach().clone().requires_grad_(True)  # the same fp32 start for both
        loss = DiffusionLoss(pipe, placement, latents, [prompt], False, batch_size=4, mirror=False, seed=0)
        with extended_vocabulary(pipe.text_encoder, vectors):
            value = loss()
        (grad,) = torch.autograd.grad(value, vectors)
        results[precision] = value.item(), grad
    (loss32, grad32), (loss16, grad16) = results["fp32"], results["bf16"]
    assert loss16 == pytest.approx(loss32, rel=0.02)  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding
    assert torch.nn.functional.cosine_similarity(grad16.flatten(), grad32.flatten(), dim=0) > 0.95
    loss_lean, grad_lean = results["lean"]  # fp32 compute from once-rounded VAE and text-encoder weights
    assert loss_lean == pytest.approx(loss32, rel=0.01)
    assert torch.nn.functional.cosine_similarity(grad_lean.flatten(), grad32.flatten(), dim=0) > 0.98


def test_bf16_training_moves_fp32_vectors_and_logs_the_precision(stores, pipelines, picture_dir, tmp_path):
    from tinv_gui.formats import read_embedding

    events = []
    settings = TrainSettings(
        token=TOKEN, method="textual-inversion", steps=2, batch_size=1, init="dog", device="cpu", precision="bf16",
        images=str(picture_dir), output_dir=str(tmp_path), lr=5e-2,
    ).resolved()
    outputs = run_training(settings, stores["bf16"], Reporter(events.append, total_steps=settings.total_steps))
    logs = [e.message for e in events if isinstance(e, Log)]
    assert any("bf16 weights, bf16 compute" in line and "--precision bf16" in line for line in logs)
    trained = read_embedding(outputs["embedding"]).vectors
    pipe = pipelines["fp32"]
    ids = pipe.tokenizer("dog", add_special_tokens=False).input_ids
    start = pipe.text_encoder.get_input_embeddings().weight[ids].detach().mean(0, keepdim=True)
    assert trained.dtype == torch.float32 and torch.isfinite(trained).all()
    assert (trained - start).abs().max() > 1e-3  # it moved, by more than bf16 rounding of the start


def test_lean_fp32_keeps_the_idle_vae_in_bf16_and_runs_it_in_fp32(pipelines, picture_dir):
    """The VAE (idle during the steps) is stored in bf16; every encode and decode computes in fp32
    from those weights: exactly what an fp32 VAE holding the same rounded weights computes."""
    from diffusers import AutoencoderKL

    from tinv_gui.demo_model import demo_model_dir

    pipe = pipelines["lean"]
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.float32}  # the UNet's compute is the step's floor: untouched
    rounded = AutoencoderKL.from_pretrained(demo_model_dir() / "sd", subfolder="vae").eval()
    fp32 = {name: p.detach().clone() for name, p in rounded.named_parameters()}
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    latents = encode_latents(pipe, load_dataset(picture_dir, 64), LEAN, mirror=False)
    with torch.no_grad():
        pictures = [pipe.image_processor.preprocess(i.image) for i in load_dataset(picture_dir, 64)]
        moments = torch.stack(latents.moments)
        assert torch.equal(moments, torch.cat([rounded.encode(p).latent_dist.parameters for p in pictures]))
        z = moments[:, :4]
        decoded = pipe.vae.decode(z).sample
        assert decoded.dtype == torch.float32 and torch.equal(decoded, rounded.decode(z).sample)
        rounded.load_state_dict(fp32)  # against the fp32 weights themselves: one rounding of the weights apart
        assert relative_error(decoded, rounded.decode(z).sample) < 0.03  # random demo weights: trained ones differ less
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.bfloat16}  # stored back after each call


def relative_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return ((value - exact).norm() / exact.norm()).item()


def test_lean_fp32_stores_the_text_encoders_linear_weights_in_bf16_and_computes_in_fp32(pipelines):
    """Its linear layers keep bf16 weights, and the text encoder's output and the gradient to the
    new vectors are fp32 computed from them: those of an fp32 encoder holding the same rounded weights."""
    from transformers import CLIPTextModel

    from tinv_gui.demo_model import demo_model_dir

    pipe = pipelines["lean"]
    linear = [m for m in pipe.text_encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and {m.weight.dtype for m in linear} == {torch.bfloat16}
    assert pipe.text_encoder.get_input_embeddings().weight.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    # None of its tensors reads from the mapped checkpoint any more, which would keep the fp32
    # weights' pages resident (the exact fp32 pipeline of this module maps the same file: not checked).
    checkpoint = str(demo_model_dir() / "sd" / "text_encoder")
    with open("/proc/self/maps") as maps:
        mapped = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in maps if checkpoint in line]
    tensors = [*pipe.text_encoder.parameters(), *pipe.text_encoder.buffers()]
    assert not any(start <= t.untyped_storage().data_ptr() < end for t in tensors for start, end in mapped)
    exact = CLIPTextModel.from_pretrained(demo_model_dir() / "sd", subfolder="text_encoder").eval()
    rounded = CLIPTextModel.from_pretrained(demo_model_dir() / "sd", subfolder="text_encoder").eval()
    with torch.no_grad():
        for m in rounded.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(m.weight.to(torch.bfloat16).float())
    vocab = pipe.text_encoder.get_input_embeddings().num_embeddings
    ids = torch.tensor([[pipe.tokenizer.bos_token_id, 320, 1125, 539, vocab, pipe.tokenizer.eos_token_id]])
    outputs = {}
    for name, text_encoder in (("stored", pipe.text_encoder), ("rounded", rounded), ("exact", exact)):
        vectors = text_encoder.get_input_embeddings().weight[[1929]].detach().clone().requires_grad_(True)
        with extended_vocabulary(text_encoder, vectors):
            hidden = text_encoder(ids)[0]
        (grad,) = torch.autograd.grad(hidden.pow(2).mean(), vectors)
        outputs[name] = hidden.detach(), grad
    (hidden, grad), (hidden_rounded, grad_rounded), (hidden_exact, grad_exact) = outputs["stored"], outputs["rounded"], outputs["exact"]
    assert hidden.dtype == grad.dtype == torch.float32
    assert torch.equal(hidden, hidden_rounded)
    torch.testing.assert_close(grad, grad_rounded, rtol=1e-5, atol=1e-7)
    assert relative_error(hidden, hidden_exact) < 0.01 and relative_error(grad, grad_exact) < 0.02
