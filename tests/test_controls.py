"""The training controls of issue 15: masks, min-SNR weighting and noise offset, EMA of the
vectors, logging to TensorBoard. Each test shows the control's effect on the demo model (64 px,
a few steps) or on its formula, computed here independently of the code under test."""

import numpy as np
import pytest
import torch
from conftest import make_picture
from PIL import Image

from tinv_gui.data import ImageError, find_images, load_dataset, open_mask
from tinv_gui.device import choose_placement
from tinv_gui.events import Log, Progress, Reporter, VectorNorms
from tinv_gui.settings import SettingsError, TrainSettings

TOKEN = "<ctl-thing>"


# ---------------------------------------------------------------------------------------------
# The noise-prediction objective: min-SNR weighting and noise offset
# ---------------------------------------------------------------------------------------------
def sd_scheduler(prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)


def snr_by_hand(timesteps: torch.Tensor) -> torch.Tensor:
    """SD's scaled-linear schedule written out: SNR(t) = alphas_cumprod / (1 - alphas_cumprod)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)[timesteps]
    return alphas_cumprod / (1 - alphas_cumprod)


@pytest.mark.parametrize(("prediction_type", "denominator"), [("epsilon", 0), ("v_prediction", 1)])
def test_min_snr_weights_are_min_snr_gamma_over_snr(prediction_type, denominator):
    from tinv_gui.objectives import NoiseSchedule

    schedule = NoiseSchedule(sd_scheduler(prediction_type).config, torch.device("cpu"))
    timesteps = torch.tensor([0, 50, 200, 500, 999])
    snr = snr_by_hand(timesteps)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + denominator)
    weights = schedule.loss_weights(timesteps, 5.0)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-4, atol=1e-6)
    assert weights[0] < 0.01 and weights[-1] > 0.001  # the easy low-noise steps count far less
    assert torch.equal(schedule.loss_weights(timesteps, 0.0), torch.ones(5))  # 0: off


def test_noise_offset_adds_a_constant_per_sample_and_channel():
    from tinv_gui.objectives import NoiseSchedule

    schedule = NoiseSchedule(sd_scheduler("epsilon").config, torch.device("cpu"))
    latents = torch.zeros(3, 4, 8, 8)
    noise = schedule.sample_noise(latents, torch.Generator().manual_seed(7), offset=0.1)
    draws = torch.Generator().manual_seed(7)
    plain, shift = torch.randn(3, 4, 8, 8, generator=draws), torch.randn(3, 4, 1, 1, generator=draws)
    torch.testing.assert_close(noise, plain + 0.1 * shift)
    torch.testing.assert_close(schedule.sample_noise(latents, torch.Generator().manual_seed(7)), plain)


def demo_diffusion_loss(store, images, **options):
    """DiffusionLoss of textual inversion on the demo model, batch 2, without mirrors, and its pipeline."""
    from tinv_gui.methods.textual_inversion import DiffusionLoss, encode_latents

    placement = choose_placement("cpu", "fp32")
    pipe = store.pipeline("demo", placement)
    latents = encode_latents(pipe, images, placement, mirror=False)
    prompt = [[pipe.tokenizer.bos_token_id, 320, 1125, 539, pipe.tokenizer.eos_token_id]]  # "a photo of": the loss needs no new word
    loss = DiffusionLoss(pipe, placement, latents, [prompt], False, batch_size=2, mirror=False, seed=5, **options)
    return pipe, loss


class Recorded:
    """Wraps a DiffusionLoss's family to keep what the denoiser got and predicted, and to add
    `delta` to its prediction."""

    def __init__(self, family, delta=None):
        self.family, self.delta, self.calls = family, delta, []

    def __getattr__(self, name):
        return getattr(self.family, name)

    def predict(self, denoiser, noisy, timesteps, *rest):
        prediction = self.family.predict(denoiser, noisy, timesteps, *rest)
        if self.delta is not None:
            prediction = prediction + self.delta
        self.calls.append((timesteps.clone(), prediction.detach().float().clone()))
        return prediction


def run_recorded(store, images, delta=None, **options):
    """One loss of a fresh DiffusionLoss (same seed every time), what its denoiser saw, and the targets."""
    pipe, loss = demo_diffusion_loss(store, images, **options)
    loss.family = recorder = Recorded(loss.family, delta)
    targets = []
    noisy_and_target = loss.schedule.noisy_and_target
    loss.schedule.noisy_and_target = lambda *a: targets.append(noisy_and_target(*a)[1]) or noisy_and_target(*a)
    with torch.no_grad():
        value = float(loss())
    (timesteps, prediction), = recorder.calls
    return value, timesteps, prediction, targets[0], pipe


@pytest.fixture(scope="module")
def square_pictures():
    from tinv_gui.data import TrainImage

    return [TrainImage(f"p{i}.png", make_picture(i, (32, 32))) for i in range(2)]


def test_diffusion_loss_weighs_each_sample_by_min_snr(store, square_pictures):
    plain, timesteps, prediction, target, pipe = run_recorded(store, square_pictures)
    weighted, timesteps_again, _, _, _ = run_recorded(store, square_pictures, min_snr_gamma=5.0)
    assert torch.equal(timesteps, timesteps_again)  # the weighting draws nothing: the same batch
    per_sample = (prediction - target).pow(2).mean(dim=(1, 2, 3)).double()
    config = pipe.scheduler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end, config.prediction_type) == ("scaled_linear", 0.00085, 0.012, "epsilon")
    snr = snr_by_hand(timesteps)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    assert plain == pytest.approx(float(per_sample.mean()), rel=1e-5)
    assert weighted == pytest.approx(float((per_sample * expected).mean()), rel=1e-4)


def test_min_snr_is_refused_for_an_objective_it_does_not_apply_to(store, square_pictures, monkeypatch):
    from tinv_gui.objectives import NoiseSchedule

    monkeypatch.setattr(NoiseSchedule, "takes_min_snr", False)  # as flow matching (SD 3, Flux) says
    with pytest.raises(SettingsError, match="min_snr_gamma: min-SNR weighting is for noise- and v-predicting models .* leave it at 0"):
        demo_diffusion_loss(store, square_pictures, min_snr_gamma=5.0)
    demo_diffusion_loss(store, square_pictures, min_snr_gamma=0.0)  # off: nothing to refuse


def test_noise_offset_reaches_the_targets(store, square_pictures):
    def channel_means(**options):
        _, _, _, target, _ = run_recorded(store, square_pictures, **options)
        return target.mean(dim=(2, 3)).abs().mean()  # epsilon targets: the noise itself

    assert channel_means() < 0.25 < channel_means(noise_offset=1.0)  # 16x16 latents: plain means are ~1/16


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------
def half_masked(folder, how: str, background=(200, 30, 30)):
    """A 64x64 picture whose right half is the subject: the left half is transparent
    (how="alpha") or black in photo.mask.png (how="file"). `background` colours the left 24
    columns, far enough inside the masked-out half that scaling the picture does not carry
    them over the mask's edge."""
    picture = np.array(make_picture(1, (64, 64)))
    picture[:, :24] = background
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    if how == "alpha":
        Image.fromarray(np.dstack([picture, mask])).save(folder / "photo.png")
    else:
        Image.fromarray(picture).save(folder / "photo.png")
        Image.fromarray(mask).save(folder / "photo.mask.png")
    return folder / "photo.png"


@pytest.mark.parametrize("how", ["alpha", "file"])
def test_masks_come_from_transparency_or_a_mask_file_and_are_cut_like_the_picture(tmp_path, how):
    half_masked(tmp_path, how)
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(tmp_path / "plain.png")
    assert [p.name for p in find_images(tmp_path)] == ["photo.png", "plain.png"]  # a mask file is no picture
    photo, plain = load_dataset(tmp_path, 32)
    assert plain.mask is None
    mask = np.array(photo.mask)
    assert photo.mask.size == photo.image.size == (32, 32)
    assert (mask[:, :15] == 0).all() and (mask[:, 17:] == 255).all()


def test_a_mask_file_of_another_size_is_named(tmp_path):
    half_masked(tmp_path, "file")
    Image.new("L", (32, 32), 255).save(tmp_path / "photo.mask.png")
    with pytest.raises(ImageError, match=r"photo\.mask\.png: is 32x32 but photo\.png is 64x64"):
        open_mask(tmp_path / "photo.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "photo.mask.png")
    assert open_mask(tmp_path / "photo.png") is None  # a mask that keeps everything is no mask


def test_masked_out_latent_pixels_do_not_change_the_diffusion_loss(store, tmp_path):
    half_masked(tmp_path, "file")
    images = load_dataset(tmp_path, 32) * 2  # a batch of 2 of the one picture, its left half masked out
    from tinv_gui.methods.textual_inversion import latent_masks

    latent_width = 32 // store.pipeline("demo", choose_placement("cpu", "fp32")).vae_scale_factor
    coverage = torch.stack(latent_masks(images, [(latent_width, latent_width)] * 2, mirror=False))  # what the mask covers of each latent pixel
    assert coverage[..., : latent_width // 2 - 1].max() == 0 and coverage[..., latent_width // 2 + 1 :].min() == 1
    outside = 3.0 * (coverage == 0).float().expand(2, 4, -1, -1)  # large changes where the mask covers nothing
    inside = outside.flip(-1)
    base = run_recorded(store, images, unmasked_weight=0.0)[0]
    assert run_recorded(store, images, delta=outside, unmasked_weight=0.0)[0] == base  # weight 0: no effect at all
    assert run_recorded(store, images, delta=inside, unmasked_weight=0.0)[0] > base + 1
    assert run_recorded(store, images, delta=outside, unmasked_weight=0.5)[0] > base + 1  # the rest still counts half
    # A weighted mean over the subject: the loss is the subject's own mean squared error (both samples alike).
    _, _, prediction, target, _ = run_recorded(store, images, unmasked_weight=0.0)
    squared = (prediction - target).pow(2).mean(dim=1, keepdim=True)
    assert base == pytest.approx(float((squared * coverage).sum() / coverage.sum()), rel=1e-5)


def test_quick_embedding_does_not_see_what_lies_outside_the_mask(store, tmp_path):
    from tinv_gui.methods.quick import train_quick

    clip = store.clip("demo")
    results = []
    for colour in ((200, 30, 30), (10, 220, 90)):  # two pictures that differ only outside their masks
        folder = tmp_path / f"{colour[0]}"
        folder.mkdir()
        half_masked(folder, "file", background=colour)
        settings = TrainSettings(images=folder, token="<q>", init="ball", steps=2, batch_size=4, method="quick", unmasked_weight=0.0).resolved()
        results.append(train_quick(clip, load_dataset(folder, 74, min_side=32), settings, Reporter(total_steps=2)).vectors)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    unmasked = TrainSettings(images=folder, token="<q>", init="ball", steps=2, batch_size=4, method="quick", unmasked_weight=1.0).resolved()
    assert not torch.equal(train_quick(clip, load_dataset(folder, 74, min_side=32), unmasked, Reporter(total_steps=2)).vectors, results[1])


def test_control_settings_are_checked():
    base = dict(images="x", token=TOKEN, method="textual-inversion")
    for name, bad in (("unmasked_weight", 1.5), ("noise_offset", -0.1), ("min_snr_gamma", -1.0), ("ema_decay", 1.0), ("log_with", "mlflow")):
        with pytest.raises(SettingsError, match=name):
            TrainSettings(**base, **{name: bad}).resolved()


# ---------------------------------------------------------------------------------------------
# EMA of the vectors, and logging to TensorBoard: one short QuickEmbedding run keeps both
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(store, tmp_path_factory):
    """A 4-step QuickEmbedding run saving every step, with EMA decay 0.2, logged to TensorBoard:
    (output folder, outputs, events)."""
    from conftest import make_picture as picture

    from tinv_gui.jobs import run_training

    pictures, output = tmp_path_factory.mktemp("pictures"), tmp_path_factory.mktemp("quick-run")
    for i in range(2):
        picture(i).save(pictures / f"p{i}.png")
    settings = TrainSettings(
        images=str(pictures), token=TOKEN, method="quick", steps=4, batch_size=4, save_every=1, ema_decay=0.2,
        output_dir=str(output), log_with="tensorboard",
    ).resolved()
    events = []
    outputs = run_training(settings, store, Reporter(events.append, total_steps=4))
    return output, outputs, events


def test_ema_vectors_follow_the_raw_ones_as_the_decay_says(quick_run):
    from tinv_gui.formats import read_embedding
    from tinv_gui.training import ema_path

    output, outputs, _ = quick_run
    raw = [read_embedding(output / f"learned_embeds-step{n:05d}.safetensors").vectors for n in range(1, 5)]
    # Recomputed from the raw history: the decay at step n is min(0.2, n / (n + 9)), none at step 1.
    average = raw[0]
    for n, vectors in enumerate(raw[1:], start=2):
        decay = min(0.2, n / (n + 9))
        average = decay * average + (1 - decay) * vectors
        saved = read_embedding(ema_path(output / f"learned_embeds-step{n:05d}.safetensors")).vectors
        torch.testing.assert_close(saved, average)
    assert outputs["ema"] == str(ema_path(outputs["embedding"]))
    final = read_embedding(outputs["ema"])
    torch.testing.assert_close(final.vectors, average)
    assert final.token == TOKEN and not torch.allclose(final.vectors, raw[-1])


def test_the_train_tab_offers_the_moving_average_for_download(quick_run, tmp_path):
    import shutil

    from tinv_gui.jobs import export_for_other_tools
    from tinv_gui.ui.tab_train import TrainTab
    from tinv_gui.ui.workspace import Workspaces

    _, outputs, _ = quick_run
    ws = Workspaces(tmp_path / "visitors").get("visitor-e")
    copied = {key: str(shutil.copy(outputs[key], ws.root)) for key in ("embedding", "ema")}
    copied.update(export_for_other_tools(copied["embedding"]))
    (embedding, _), (ema, what), *_ = TrainTab.download_files(ws, copied)
    assert embedding.name == "learned_embeds.safetensors" and ema.name == "learned_embeds.ema.safetensors"
    assert "moving average" in what and TOKEN in what


def test_previews_are_drawn_with_the_moving_average(tmp_path):
    from tinv_gui.training import EmbeddingWriter

    writer = EmbeddingWriter(tmp_path, TOKEN, 0, {}, Reporter(), ema_decay=0.5)
    vectors = torch.zeros(1, 4, requires_grad=True)
    writer.checkpoint(vectors, 1)
    with torch.no_grad():
        vectors.fill_(1.0)
    writer.checkpoint(vectors, 2)  # the average: 2/11 of the first vectors, 9/11 of these
    with writer.averaged(vectors):
        torch.testing.assert_close(vectors.detach(), torch.full((1, 4), 9 / 11))
    assert torch.equal(vectors.detach(), torch.ones(1, 4))


def test_a_tensorboard_event_file_holds_the_loss_and_learning_rate(quick_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output, _, events = quick_run
    (run,) = (output / "logs").iterdir()
    assert run.name.startswith("quick-")
    log = EventAccumulator(str(run))
    log.Reload()
    progress = [e for e in events if isinstance(e, Progress)]
    for tag, field in (("loss", "loss"), ("lr", "lr")):
        scalars = log.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2, 3, 4]
        assert [s.value for s in scalars] == pytest.approx([getattr(e, field) for e in progress], rel=1e-6)
    assert any(isinstance(e, Log) and "logging to tensorboard" in e.message for e in events)
    norms = [e for e in events if isinstance(e, VectorNorms)]  # the learned vector's length, as the app plots it
    (tag,) = [t for t in log.Tags()["scalars"] if t.startswith("norm/")]
    assert [s.value for s in log.Scalars(tag)] == pytest.approx([next(iter(e.norms.values()))[0] for e in norms], rel=1e-6)


def test_two_runs_started_in_the_same_second_log_to_tensorboard_folders_of_their_own(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tinv_gui import tracking

    monkeypatch.setattr(tracking, "time", SimpleNamespace(strftime=lambda _: "20260101-120000"))  # one second for both
    first, second = (tracking.RunTrackers.start("tensorboard", tmp_path, "quick", {}, Reporter()) for _ in range(2))
    for trackers, loss in ((first, 0.25), (second, 0.75)):
        trackers.on_event(Progress(1, 1, loss, 0.1, 0.0, None, "quick"))
        trackers.finish()
    folders = sorted((tmp_path / "logs").iterdir())
    assert [f.name for f in folders] == ["quick-20260101-120000", "quick-20260101-120000-2"]
    for folder, loss in zip(folders, (0.25, 0.75)):
        log = EventAccumulator(str(folder))
        log.Reload()
        assert [s.value for s in log.Scalars("loss")] == [loss]  # its own curve only


def test_logging_to_a_tracker_that_is_not_installed_is_given_up_not_the_run(monkeypatch, tmp_path):
    from accelerate import tracking as accelerate_tracking

    from tinv_gui.tracking import RunTrackers

    monkeypatch.setattr(accelerate_tracking, "is_wandb_available", lambda: False)
    events = []
    trackers = RunTrackers.start("wandb", tmp_path, "quick", {}, Reporter(events.append))
    assert trackers.trackers == []
    assert "not logging to wandb" in events[0].message and "pip install wandb" in events[0].message
    trackers.on_event(Progress(1, 1, 0.5, 0.1, 0.0, None, "quick"))  # nothing to log to: no error


def test_the_dataset_tab_keeps_uploaded_masks_beside_their_pictures_and_shows_them(tmp_path, monkeypatch):
    from tinv_gui.ui import dataset
    from tinv_gui.ui.workspace import Workspaces

    monkeypatch.setattr(dataset, "MAX_SIDE", 100)  # the picture is downscaled on arrival: its mask must follow
    ws = Workspaces(tmp_path / "visitors").get("visitor-m")
    up = tmp_path / "uploads"
    up.mkdir()
    make_picture(3, (300, 200)).save(up / "photo.png")
    mask = np.zeros((200, 300), np.uint8)
    mask[:, 150:] = 255
    Image.fromarray(mask).save(up / "photo.mask.png")
    Image.fromarray(mask).save(up / "lonely.mask.png")
    added = dataset.add_files(ws, [str(p) for p in sorted(up.iterdir())])
    assert {p.name: p.problem for p in added if p.problem} == {"lonely.mask.png": "a mask without its picture: upload lonely.png (or .jpg...) with it"}
    assert [p.name for p in dataset.list_pictures(ws) if not p.problem] == ["photo.png"]  # the mask is no picture of its own
    kept = open_mask(ws.pictures / "photo.png")
    assert kept.size == (150, 100) and kept.getpixel((10, 50)) == 0 and kept.getpixel((140, 50)) == 255
    (image, label), (_, refused) = dataset.gallery_items(ws, size=150, buckets=True, resolution=64)
    assert label.startswith("photo.png") and "masked" in label and refused.startswith("✗ lonely.mask.png")
    plain = dataset.open_image(ws.pictures / "photo.png")
    outside, inside = np.asarray(image.getpixel((60, 50))), np.asarray(image.getpixel((90, 50)))
    darkened = 0.3 * np.asarray(plain.getpixel((60, 50))) + 0.7 * np.asarray(dataset.MASKED_OUT)
    assert np.abs(outside - darkened).max() <= 2  # darkened where the mask leaves out
    assert np.abs(inside - np.asarray(plain.getpixel((90, 50)))).max() <= 2  # as it is on the subject
