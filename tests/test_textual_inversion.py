"""Textual inversion, quick-then-ti and caption-init on the demo model: through the CLI's flags (as a
user runs them, through cli.main in this process) and through the engine for what the CLI does not show."""

import contextlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_here
from PIL import Image
from safetensors.torch import load_file

from tinv_gui.checkpoint_scores import recommend
from tinv_gui.device import choose_placement
from tinv_gui.embeddings import extended_vocabulary, load_into_pipeline, read_metadata
from tinv_gui.events import CheckpointScore, Log, Preview, Progress, Reporter
from tinv_gui.formats import read_embedding
from tinv_gui.jobs import run_training
from tinv_gui.settings import SettingsError, TrainSettings
from tinv_gui.training import ema_path, optimizer_state_path

TOKEN = "<tst-thing>"


def train_cli(capsys, *args: str) -> subprocess.CompletedProcess:
    """`python -m tinv_gui train ...` as a user runs it, in this process (test_cli runs it in a
    subprocess of its own)."""
    proc = cli_here(capsys, "train", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def steps_logged(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def fresh_pipe():
    """A separate demo pipeline to load results into (the store's one is for training)."""
    from diffusers import StableDiffusionPipeline

    from tinv_gui.demo_model import demo_model_dir

    pipe = StableDiffusionPipeline.from_pretrained(demo_model_dir("demo") / "sd", safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, token: str, vectors: torch.Tensor) -> np.ndarray:
    """A picture of `a photo of <token>` with the vectors loaded through diffusers' own loader."""
    load_into_pipeline(pipe, token, vectors)
    try:
        image = pipe(f"a photo of {token}", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    finally:
        pipe.unload_textual_inversion()
    return image


def assert_changes_image(pipe, path: Path, start: torch.Tensor) -> None:
    """The saved file loads into diffusers and generates a different picture than its start."""
    read = read_embedding(path)
    token, vectors = read.token, read.vectors
    assert token == TOKEN
    trained = generate(pipe, token, vectors)
    untrained = generate(pipe, token, start)
    assert np.abs(trained - untrained).mean() > 1e-4


def word_vectors(pipe, words: str) -> torch.Tensor:
    ids = pipe.tokenizer(words, add_special_tokens=False).input_ids
    return pipe.text_encoder.get_input_embeddings().weight[ids].detach().clone()


def run_in_process(store, **overrides) -> tuple[dict, list]:
    """A training job run in this process (sharing the warm demo model); returns (outputs, events).
    One micro-batch a step unless asked (test_accumulated_micro_batches_step_as_their_average_does
    checks accumulation), so each step costs one pass through the UNet, not the default four."""
    events = []
    settings = TrainSettings(**{"token": TOKEN, "steps": 2, "batch_size": 1, "grad_accum": 1, **overrides}).resolved()
    outputs = run_training(settings, store, Reporter(events.append, total_steps=settings.total_steps))
    return outputs, events


def test_textual_inversion_cli_saves_numbered_files_with_optimizer_state_and_changes_the_image(picture_dir, tmp_path, fresh_pipe, capsys):
    out = tmp_path / "out"
    train_cli(
        capsys, "--method", "textual-inversion", "--images", str(picture_dir), "--token", TOKEN, "--init", "dog",
        "--steps", "3", "--batch-size", "1", "--grad-accum", "1", "--lr", "0.05", "--save-every", "2",
        "--output", str(out), "--log-jsonl", str(tmp_path / "log.jsonl"),
    )
    logged = steps_logged(tmp_path / "log.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3] and {r["phase"] for r in logged} == {"ti"}
    assert {p.name for p in out.iterdir()} == {
        "learned_embeds.safetensors", "learned_embeds.optimizer.safetensors",
        "learned_embeds-step00002.safetensors", "learned_embeds-step00002.optimizer.safetensors", "result.json", "logs",
    }
    assert read_metadata(out / "learned_embeds.safetensors")["steps"] == "3"
    assert_changes_image(fresh_pipe, out / "learned_embeds.safetensors", word_vectors(fresh_pipe, "dog"))


def test_resume_continues_from_the_saved_step_with_the_saved_optimizer_state_and_moving_average(store, picture_dir, tmp_path, capsys):
    outputs, _ = run_in_process(
        store, method="textual-inversion", images=str(picture_dir), output_dir=str(tmp_path / "first"), save_every=1, ema_decay=0.5,
        precision="fp32",
    )
    second = tmp_path / "second"
    proc = train_cli(
        capsys, "--method", "textual-inversion", "--images", str(picture_dir), "--token", TOKEN, "--batch-size", "1", "--grad-accum", "1",
        "--save-every", "1", "--ema-decay", "0.5", "--precision", "fp32",
        "--steps", "4", "--resume", outputs["embedding"], "--output", str(second), "--log-jsonl", str(tmp_path / "log.jsonl"),
    )
    assert [(r["step"], r["total"]) for r in steps_logged(tmp_path / "log.jsonl")] == [(3, 4), (4, 4)]
    assert "Resuming after step 2" in proc.stderr and "afresh" not in proc.stderr
    assert read_metadata(second / "learned_embeds.safetensors")["steps"] == "4"
    # AdamW's own step count went on from the saved state's 2, rather than restarting at 0.
    assert load_file(str(optimizer_state_path(second / "learned_embeds.safetensors")))["step"].item() == 4
    # The moving average went on too: it is the one an uninterrupted run of these four steps keeps
    # (diffusers' EMAModel: the decay at step n is min(0.5, n / (n + 9)), none at the first).
    raw = [read_embedding(folder / f"learned_embeds-step{n:05d}.safetensors").vectors
           for folder, n in ((tmp_path / "first", 1), (tmp_path / "first", 2), (second, 3), (second, 4))]
    average = raw[0]
    for n, vectors in enumerate(raw[1:], start=2):
        decay = min(0.5, n / (n + 9))
        average = decay * average + (1 - decay) * vectors
    torch.testing.assert_close(read_embedding(ema_path(second / "learned_embeds.safetensors")).vectors, average)


def test_quick_then_ti_is_one_job_with_two_phases(picture_dir, tmp_path, fresh_pipe, capsys):
    out = tmp_path / "out"
    train_cli(
        capsys, "--method", "quick-then-ti", "--images", str(picture_dir), "--token", TOKEN, "--init", "dog",
        "--quick-steps", "2", "--steps", "2", "--batch-size", "1", "--lr", "0.05",
        "--output", str(out), "--log-jsonl", str(tmp_path / "log.jsonl"),
    )
    logged = steps_logged(tmp_path / "log.jsonl")
    assert [(r["step"], r["total"], r["phase"]) for r in logged] == [(1, 4, "quick"), (2, 4, "quick"), (3, 4, "ti"), (4, 4, "ti")]
    meta = read_metadata(out / "learned_embeds.safetensors")
    assert meta["steps"] == "4" and meta["method"] == "quick-then-ti"
    assert_changes_image(fresh_pipe, out / "learned_embeds.safetensors", word_vectors(fresh_pipe, "dog"))


def test_caption_init_makes_one_vector_per_caption_token_starting_at_each_word(picture_dir, tmp_path, fresh_pipe, capsys):
    caption = "a red ball on the grass"
    out = tmp_path / "out"
    train_cli(
        capsys, "--method", "caption-init", "--images", str(picture_dir), "--token", TOKEN, "--caption", caption,
        "--steps", "2", "--batch-size", "1", "--output", str(out),
    )
    read = read_embedding(out / "learned_embeds.safetensors")
    token, vectors = read.token, read.vectors
    start = word_vectors(fresh_pipe, caption)
    assert token == TOKEN and vectors.shape == start.shape == (6, 64)
    # Two small steps later, each vector is still nearest to its own word of the whole vocabulary.
    table = fresh_pipe.text_encoder.get_input_embeddings().weight.detach()
    nearest = torch.cdist(vectors, table).argmin(dim=1).tolist()
    assert nearest == fresh_pipe.tokenizer(caption, add_special_tokens=False).input_ids
    names = load_into_pipeline(fresh_pipe, token, vectors)
    fresh_pipe.unload_textual_inversion()
    assert names == [TOKEN] + [f"{TOKEN}_{i}" for i in range(1, 6)]
    assert_changes_image(fresh_pipe, out / "learned_embeds.safetensors", start)


def test_caption_init_asks_the_captioner_when_no_caption_is_given(store, picture_dir, tmp_path):
    outputs, events = run_in_process(store, method="caption-init", images=str(picture_dir), output_dir=str(tmp_path), steps=1)
    caption = read_metadata(outputs["embedding"])["caption"]
    assert caption and any(isinstance(e, Log) and e.message.startswith("Caption:") for e in events)
    count = len(store.tokenizer("demo")(caption, add_special_tokens=False).input_ids)
    assert read_embedding(outputs["embedding"]).vectors.shape[0] == count


def test_v_prediction_model_trains_on_v_targets(store, picture_dir, tmp_path):
    outputs, events = run_in_process(store, method="textual-inversion", model="demo-vpred", images=str(picture_dir), output_dir=str(tmp_path), init="dog")
    assert any(isinstance(e, Log) and "predicting v_prediction" in e.message for e in events)
    assert all(np.isfinite(e.loss) for e in events if isinstance(e, Progress))
    assert read_metadata(outputs["embedding"])["steps"] == "2"


def test_accumulated_micro_batches_step_as_their_average_does():
    """grad_accum micro-batches a step (textual inversion's default is 4 of batch 1): the step,
    the optimizer's moments and the loss reported are those of one batch of their average."""
    from tinv_gui.training import LoopSettings, optimize

    targets = torch.tensor([[1.0, -2.0, 0.5, 3.0]]), torch.tensor([[-1.0, 0.0, 2.5, 1.0]])

    def run(grad_accum, compute_loss):
        vectors = torch.zeros(1, 4, requires_grad=True)
        losses, calls = [], []
        reporter = Reporter(lambda e: losses.append(e.loss) if isinstance(e, Progress) else None, total_steps=3)

        def counted(micro):
            calls.append(micro)
            return compute_loss(vectors, micro)

        _, optimizer = optimize(vectors, counted, LoopSettings(steps=3, lr=0.1, grad_accum=grad_accum), reporter)
        return vectors.detach(), optimizer.state_dict()["state"][0], losses, calls

    def micro_loss(vectors, micro):
        return ((vectors - targets[micro]) ** 2).sum()

    accumulated = run(2, micro_loss)
    whole = run(1, lambda vectors, _micro: (micro_loss(vectors, 0) + micro_loss(vectors, 1)) / 2)
    assert accumulated[3] == [0, 1] * 3 and whole[3] == [0] * 3
    torch.testing.assert_close(accumulated[0], whole[0])
    for moment in ("exp_avg", "exp_avg_sq"):  # the gradients themselves, at their scale
        torch.testing.assert_close(accumulated[1][moment], whole[1][moment])
    assert accumulated[2] == pytest.approx(whole[2])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noise_schedule_tables_match_diffusers(prediction_type):
    from diffusers import DDPMScheduler

    from tinv_gui.objectives import NoiseSchedule

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)
    schedule = NoiseSchedule(scheduler.config, torch.device("cpu"))
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([0, 500, 999])
    noisy, target = schedule.noisy_and_target(latents, noise, timesteps)
    torch.testing.assert_close(noisy, scheduler.add_noise(latents, noise, timesteps))
    expected = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    torch.testing.assert_close(target, expected)


def test_vae_encodes_each_picture_and_mirror_once_and_models_stay_frozen(store, picture_dir, tmp_path):
    pipe = store.pipeline("demo", choose_placement("auto", "auto"))
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    table = pipe.text_encoder.get_input_embeddings()
    calls = []
    original = pipe.vae.encode
    pipe.vae.encode = lambda *a, **k: calls.append(a[0].shape[0]) or original(*a, **k)
    try:
        run_in_process(store, method="textual-inversion", images=str(picture_dir), output_dir=str(tmp_path), steps=3, batch_size=2)
    finally:
        del pipe.vae.encode
    assert sum(calls) == 2 * 4  # four pictures and their mirrors, before the loop; none during it
    assert pipe.text_encoder.get_input_embeddings() is table and table.num_embeddings == 49408
    assert all(torch.equal(v, unet_before[k]) for k, v in pipe.unet.state_dict().items())
    assert not any(p.requires_grad for p in pipe.unet.parameters()) and not any("forward" in vars(m) for m in pipe.unet.modules())


def test_freed_memory_goes_back_after_each_block_during_training_only(store, monkeypatch):
    from tinv_gui.device import choose_placement
    from tinv_gui.methods import textual_inversion

    placement = choose_placement("cpu", "fp32")
    unet = store.pipeline("demo", placement).unet
    released = []
    monkeypatch.setattr(textual_inversion, "release_freed_memory", lambda: released.append(1))
    sample = torch.randn(1, unet.config.in_channels, 8, 8)
    context = torch.randn(1, 4, unet.config.cross_attention_dim)
    with torch.no_grad(), textual_inversion.freed_memory_released_between_blocks(unet, placement):
        unet(sample, 10, context)
    assert len(released) == len(unet.down_blocks) + len(unet.up_blocks)
    with torch.no_grad():
        unet(sample, 10, context)  # the shared pipeline afterwards: as it was
    assert len(released) == len(unet.down_blocks) + len(unet.up_blocks)


def test_recomputing_activations_gives_the_same_gradient(store, picture_dir):
    from tinv_gui.data import load_dataset
    from tinv_gui.families import family_of
    from tinv_gui.methods.textual_inversion import (
        DiffusionLoss,
        activation_recomputation,
        encode_latents,
    )

    placement = choose_placement("auto", "auto")
    pipe = store.pipeline("demo", placement)
    latents = encode_latents(pipe, load_dataset(picture_dir, 64), placement, mirror=True)
    vocab = pipe.text_encoder.get_input_embeddings().num_embeddings
    prompt = [[pipe.tokenizer.bos_token_id, 320, 1125, 539, vocab, pipe.tokenizer.eos_token_id]]
    vectors = word_vectors(pipe, "dog").requires_grad_(True)

    def gradient(context):
        loss = DiffusionLoss(pipe, placement, latents, [prompt], False, batch_size=2, mirror=True, seed=3)
        with extended_vocabulary(pipe.text_encoder, vectors), context:
            (grad,) = torch.autograd.grad(loss(), vectors)
        return grad

    plain = gradient(contextlib.nullcontext())
    assert plain.abs().sum() > 0
    layers = family_of(pipe).recomputed_layers(pipe.unet)
    assert layers  # the full-resolution feed-forward layers
    torch.testing.assert_close(gradient(activation_recomputation(pipe.unet, layers, everywhere=False)), plain)
    torch.testing.assert_close(gradient(activation_recomputation(pipe.unet, layers, everywhere=True)), plain)
    assert not pipe.unet.is_gradient_checkpointing and not any("forward" in vars(m) for m in pipe.unet.modules())


def test_validation_grid_grows_a_row_per_preview_and_checkpoints_are_scored_during_the_run(store, picture_dir, tmp_path):
    prompts = ["a picture of {}", "a drawing of {} on a table"]
    outputs, events = run_in_process(
        store, method="textual-inversion", images=str(picture_dir), output_dir=str(tmp_path), steps=2, lr=0.05,
        preview_every=1, preview_steps=1, preview_prompts=prompts, save_every=1, score_checkpoints="during",
    )
    previews = [e for e in events if isinstance(e, Preview)]
    assert [(p.step, p.prompt) for p in previews] == [(step, p.format(TOKEN)) for step in (1, 2) for p in prompts]
    assert all(Path(p.path).is_file() and Path(p.path).parent == tmp_path for p in previews)
    # Fixed seeds: a column's pictures differ only by what two steps changed; the columns differ by prompt and seed.
    pictures = [np.asarray(Image.open(p.path), dtype=np.float32) for p in previews]
    assert np.abs(pictures[0] - pictures[2]).mean() < np.abs(pictures[0] - pictures[1]).mean()

    # Each checkpoint is scored as it is saved, before the next step, while training goes on through
    # the text encoder's extension (the second step still changes the vectors).
    kinds = [type(e).__name__ for e in events if isinstance(e, (Progress, CheckpointScore))]
    assert kinds == ["Progress", "CheckpointScore", "Progress", "CheckpointScore"]
    scores = [e for e in events if isinstance(e, CheckpointScore)]
    assert [Path(s.path).name for s in scores] == ["learned_embeds-step00001.safetensors", "learned_embeds-step00002.safetensors"]
    assert not torch.equal(read_embedding(scores[0].path).vectors, read_embedding(scores[1].path).vectors)
    assert outputs["recommended"] == recommend(scores).path
    assert not any(name.startswith("<tinv-embedding") for name in store.pipeline("demo").tokenizer.get_vocab())  # unloaded again


def test_resuming_a_quick_then_ti_file_saved_in_its_clip_phase_is_refused(store, picture_dir, tmp_path):
    outputs, _ = run_in_process(store, method="quick", images=str(picture_dir), output_dir=str(tmp_path / "q"), batch_size=4)
    with pytest.raises(SettingsError, match="QuickEmbedding phase"):
        run_in_process(store, method="quick-then-ti", images=str(picture_dir), output_dir=str(tmp_path), resume=outputs["embedding"])


def test_settings_of_the_diffusion_methods():
    ti = TrainSettings(method="textual-inversion", token=TOKEN).resolved()
    assert (ti.batch_size, ti.grad_accum, ti.effective_lr) == (1, 4, pytest.approx(2e-3))  # diffusers' documented run
    both = TrainSettings(method="quick-then-ti", token=TOKEN).resolved()
    assert (both.quick_steps, both.steps, both.total_steps, both.batch_size, both.effective_lr) == (100, 50, 150, 4, 1.5e-3)
    with pytest.raises(SettingsError, match="resolution"):
        TrainSettings(method="textual-inversion", resolution=100).resolved()
    with pytest.raises(SettingsError, match="resume"):
        TrainSettings(method="textual-inversion", resume="/nonexistent/file.safetensors").resolved()
