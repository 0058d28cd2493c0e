"""SD 3.x and Flux.1 on the offline demo-sd3 and demo-flux models: the real pipeline classes and
the shapes each family conditions on, the offline T5 tokenizer, generating through the CLI,
`demo-model --sd3/--flux`, telling the families apart from folders and single files, and
textual inversion with flow matching (each encoder's part, the encoder choice, resume)."""

from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tinv_gui import cli
from tinv_gui.demo_sd3_flux import (
    FLUX_TEXT_WIDTHS,
    SD3_TEXT_WIDTHS,
    T5_MAX_LENGTH,
    build_t5_tokenizer,
)
from tinv_gui.families import family_for_checkpoint
from tinv_gui.models import (
    ModelLoadError,
    ModelSource,
    ModelStore,
    _explain,
    checkpoint_keys,
    is_hub_name,
)

SENTENCE = "a photo of a Zebra sitting on a red sofa, 3 times!"


@pytest.fixture(scope="module")
def sd3(store):
    return store.pipeline("demo-sd3")


@pytest.fixture(scope="module")
def flux(store):
    return store.pipeline("demo-flux")


def assert_text_towers_equal(text_encoder, clip):
    """A pipeline's CLIP text encoder is its CLIP model's text tower, weight for weight (in the
    dtype the pipeline stores it in: bf16 linear weights under the automatic fp32 on a CPU)."""
    for name, weight in getattr(text_encoder, "text_model", text_encoder).state_dict().items():
        assert torch.equal(weight, clip.text_model.state_dict()[name].to(weight.dtype)), name


def test_t5_tokenizer_works_offline_and_round_trips():
    tokenizer = build_t5_tokenizer()
    assert type(tokenizer).__name__ in ("T5TokenizerFast", "T5Tokenizer")  # one class in transformers 5
    ids = tokenizer(SENTENCE).input_ids
    assert ids[-1] == tokenizer.eos_token_id == 1 and tokenizer.pad_token_id == 0 and tokenizer.unk_token_id == 2
    assert tokenizer.unk_token_id not in ids  # every ASCII character has a piece
    assert tokenizer.decode(ids, skip_special_tokens=True) == SENTENCE
    assert tokenizer.convert_tokens_to_ids(["▁photo", "▁red"]) != [tokenizer.unk_token_id] * 2  # whole words are pieces
    # T5's layout: the sentinels last, <extra_id_0> the very last id.
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == len(tokenizer) - 1
    assert tokenizer.convert_tokens_to_ids("<extra_id_99>") == len(tokenizer) - 100
    assert tokenizer.model_max_length == T5_MAX_LENGTH
    padded = tokenizer(SENTENCE, padding="max_length", max_length=256, truncation=True).input_ids
    assert len(padded) == 256 and padded[len(ids):] == [0] * (256 - len(ids))
    assert build_t5_tokenizer().get_vocab() == tokenizer.get_vocab()  # built the same every time


def test_demo_sd3_is_sd3_shaped(store, sd3):
    width_l, width_g, width_t5 = SD3_TEXT_WIDTHS
    assert store.family("demo-sd3").name == "sd3" and store.text_encoder_count("demo-sd3") == 3
    assert store.text_widths("demo-sd3") == SD3_TEXT_WIDTHS and len(set(SD3_TEXT_WIDTHS)) == 3
    assert type(sd3).__name__ == "StableDiffusion3Pipeline"
    classes = [type(getattr(sd3, name)).__name__ for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae", "scheduler")]
    assert classes == ["CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel", "SD3Transformer2DModel", "AutoencoderKL", "FlowMatchEulerDiscreteScheduler"]
    assert type(store.tokenizer("demo-sd3", 2)).__name__ in ("T5TokenizerFast", "T5Tokenizer")
    assert sd3.tokenizer_2.pad_token == "!" and sd3.tokenizer.pad_token == "<|endoftext|>"
    assert sd3.vae.config.latent_channels == sd3.transformer.config.in_channels == 16
    assert sd3.transformer.config.joint_attention_dim == width_t5 > width_l + width_g  # CLIP states are padded to T5's width
    assert sd3.transformer.config.qk_norm == "rms_norm"  # SD 3.5
    # The conditioning SD3 computes: both CLIPs' penultimate states side by side and padded, then
    # T5's 256 tokens after them; both CLIPs' pooled projections side by side.
    with torch.no_grad():
        embeds, _, pooled, _ = sd3.encode_prompt(SENTENCE, SENTENCE, SENTENCE, do_classifier_free_guidance=False)
    assert embeds.shape == (1, 77 + 256, width_t5) and pooled.shape == (1, width_l + width_g)
    assert embeds[0, :77, width_l + width_g :].abs().max() == 0 and embeds[0, 77:].abs().max() > 0
    for encoder, text_encoder in enumerate((sd3.text_encoder, sd3.text_encoder_2)):
        clip = store.clip("demo-sd3", encoder=encoder).model
        assert_text_towers_equal(text_encoder, clip)
        projection = text_encoder.text_projection.weight
        assert torch.equal(projection, clip.text_projection.weight.to(projection.dtype))
    with pytest.raises(ModelLoadError, match="T5"):
        store.clip("demo-sd3", encoder=2)


def test_demo_flux_is_flux_dev_shaped(store, flux):
    width_l, width_t5 = FLUX_TEXT_WIDTHS
    assert store.family("demo-flux").name == "flux" and store.text_widths("demo-flux") == FLUX_TEXT_WIDTHS
    assert type(flux).__name__ == "FluxPipeline"
    classes = [type(getattr(flux, name)).__name__ for name in ("text_encoder", "text_encoder_2", "transformer", "scheduler")]
    assert classes == ["CLIPTextModel", "T5EncoderModel", "FluxTransformer2DModel", "FlowMatchEulerDiscreteScheduler"]
    config = flux.transformer.config
    assert config.guidance_embeds and config.in_channels == 4 * flux.vae.config.latent_channels == 64  # 2x2-packed latents
    assert config.joint_attention_dim == width_t5 and config.pooled_projection_dim == width_l
    assert flux.scheduler.config.use_dynamic_shifting
    with torch.no_grad():
        embeds, pooled, text_ids = flux.encode_prompt(SENTENCE, SENTENCE)
    assert embeds.shape == (1, 512, width_t5) and pooled.shape == (1, width_l) and text_ids.shape == (512, 3)
    assert flux.tokenizer_2.model_max_length == 512
    assert_text_towers_equal(flux.text_encoder, store.clip("demo-flux").model)


def draw(pipe, prompt, **options):
    from tinv_gui.generate import generate

    options = {"steps": 2, "size": (48, 32), "seed": 0, **options}
    return np.asarray(generate(pipe, prompt=prompt, **options)[0])


@pytest.mark.parametrize("model", ["demo-sd3", "demo-flux"])
def test_cli_generates_a_picture_of_the_asked_size_that_follows_the_prompt(tmp_path, store, model):
    output = tmp_path / "cat.png"
    assert cli.main(["generate", "--model", model, "--prompt", "a photo of a cat", "--steps", "2", "--size", "48x32", "--output", str(output)]) == 0
    cat = Image.open(output)
    assert cat.size == (48, 32)
    pipe = store.pipeline(model)
    # the CLI's defaults, drawn again: the guidance is the pipeline's own (StableDiffusion3Pipeline's 7, FluxPipeline's 3.5), not SD 1.x's 7.5
    own_guidance = {"demo-sd3": 7.0, "demo-flux": 3.5}[model]
    assert np.array_equal(np.asarray(cat), draw(pipe, "a photo of a cat", guidance=own_guidance))
    assert not np.array_equal(np.asarray(cat), draw(pipe, "a photo of a cat", guidance=7.5))
    assert not np.array_equal(np.asarray(cat), draw(pipe, "a boat on the sea", guidance=own_guidance))


def test_flux_guidance_is_the_distilled_guidance_and_it_has_no_negative(tmp_path, flux, capsys):
    assert not np.array_equal(draw(flux, "a cat", guidance=1.0), draw(flux, "a cat", guidance=6.0))  # it reaches the guidance embedding
    assert cli.main(["generate", "--model", "demo-flux", "--prompt", "a cat", "--negative", "blurry", "--output", str(tmp_path / "n.png")]) == 2
    assert "Flux.1 runs without a negative prompt" in capsys.readouterr().err


@pytest.mark.parametrize("flag, family, widths, clips", [("--sd3", "sd3", SD3_TEXT_WIDTHS, ("clip_l", "clip_g")), ("--flux", "flux", FLUX_TEXT_WIDTHS, ("clip_l",))])
def test_demo_model_command_writes_loadable_folders(tmp_path, flag, family, widths, clips):
    from transformers import CLIPModel

    assert cli.main(["demo-model", str(tmp_path), flag]) == 0
    store = ModelStore()
    folder = str(tmp_path / "sd")
    assert store.family(folder).name == family and store.text_widths(folder) == widths
    pipe = store.pipeline(folder)
    for encoder, name in enumerate(clips):
        clip = CLIPModel.from_pretrained(tmp_path / name)
        assert clip.config.vision_config.image_size > 0  # the image tower the CLIP-space methods need
        assert_text_towers_equal((pipe.text_encoder, pipe.text_encoder_2)[encoder], clip)
        assert store.clip(folder, str(tmp_path / name), encoder=encoder).model.config.text_config.hidden_size == widths[encoder]


def test_single_files_are_told_apart_by_their_keys(tmp_path):
    files = {
        "sd35.safetensors": ["model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias", "text_encoders.t5xxl.transformer.shared.weight"],
        "sd3-bare.safetensors": ["joint_blocks.0.context_block.adaLN_modulation.1.bias", "pos_embed"],
        "flux1-dev.safetensors": ["double_blocks.0.img_attn.norm.key_norm.scale", "guidance_in.in_layer.bias"],
        "flux-comfy.safetensors": ["model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale", "vae.decoder.conv_in.weight"],
        "xl.safetensors": ["conditioner.embedders.1.model.ln_final.weight", "model.diffusion_model.input_blocks.0.0.weight"],
        "sd15.safetensors": ["cond_stage_model.transformer.text_model.final_layer_norm.weight"],
    }
    for name, keys in files.items():
        save_file({key: torch.zeros(1) for key in keys}, tmp_path / name)
    torch.save({"state_dict": {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": torch.zeros(1)}}, tmp_path / "sd3.ckpt")
    found = {name: family_for_checkpoint(checkpoint_keys(tmp_path / name)).name for name in [*files, "sd3.ckpt"]}
    assert found == {
        "sd35.safetensors": "sd3", "sd3-bare.safetensors": "sd3", "flux1-dev.safetensors": "flux", "flux-comfy.safetensors": "flux",
        "xl.safetensors": "sdxl", "sd15.safetensors": "sd", "sd3.ckpt": "sd3",
    }
    assert ModelStore().family(str(tmp_path / "flux1-dev.safetensors")).name == "flux"


def test_the_demo_models_are_allowed_on_a_shared_server():
    shared = ModelStore()
    shared.hub_only = True
    assert is_hub_name("demo-sd3") and is_hub_name("demo-flux")
    assert shared.family("demo-flux").name == "flux"


def test_a_single_file_without_t5_says_where_t5_comes_from(tmp_path):
    path = tmp_path / "sd3.5_large.safetensors"  # the MMDiT alone: offline, diffusers cannot fetch the rest
    save_file({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": torch.zeros(1)}, path)
    with pytest.raises(ModelLoadError) as error:
        ModelStore().pipeline(str(path))
    message = str(error.value)
    assert "Stable Diffusion 3" in message and "no T5 text encoder" in message and "gated" in message


def test_gated_hub_repositories_ask_for_a_token():
    from huggingface_hub.errors import GatedRepoError

    try:
        try:
            raise GatedRepoError("Access to model stabilityai/stable-diffusion-3.5-large is restricted.", response=mock.Mock())
        except GatedRepoError:
            raise OSError("stabilityai/stable-diffusion-3.5-large is not a valid model identifier")  # noqa: B904
    except OSError as error:  # as diffusers' load_config re-raises it: the Hub's error is its context
        raised = error
    source = ModelSource("stabilityai/stable-diffusion-3.5-large", "hub", "stabilityai/stable-diffusion-3.5-large")
    message = str(_explain(source, "the model", raised))
    assert "gated" in message and "HF_TOKEN" in message and "licence" in message
    assert "gated" not in str(_explain(source, "the model", OSError("offline")))


# ----------------------------------------------------------------------------- training
TOKEN = "<sd3-thing>"


def test_flow_matching_is_the_straight_path_with_the_velocity_target(sd3, flux):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from tinv_gui.families import family_of

    schedule = family_of(sd3).objective(sd3.scheduler.config, torch.device("cpu"))
    assert schedule.shift == sd3.scheduler.config.shift == 3.0 and schedule.prediction_type == "flow"
    latents, noise = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    timesteps = torch.tensor([1000.0, 500.0, 1.0])
    noisy, target = schedule.noisy_and_target(latents, noise, timesteps)
    for i, t in enumerate(timesteps.tolist()):
        assert torch.allclose(noisy[i], (1 - t / 1000) * latents[i] + t / 1000 * noise[i], atol=1e-6)
    assert torch.equal(noisy[0], noise[0]) and torch.equal(target, noise - latents)
    # Timesteps come from the scheduler's shifted table at the scripts' logit-normal density.
    drawn = schedule.sample_timesteps(4000, torch.Generator().manual_seed(0), torch.device("cpu"))
    u = compute_density_for_timestep_sampling("logit_normal", 4000, 0.0, 1.0, 1.29, generator=torch.Generator().manual_seed(0))
    sigma = 1 - (u * 1000).long() / 1000  # the table's unshifted sigma at index u * 1000 (it descends from 1)
    shifted = 3 * sigma / (1 + 2 * sigma)
    assert torch.allclose(drawn, sd3.scheduler.timesteps[(u * 1000).long()]) and (drawn / 1000 - shifted).abs().max() < 5e-3
    assert drawn.median() > 600  # the shift of 3 moves the logit-normal median (sigma 0.5) to 0.75
    assert torch.equal(schedule.loss_weights(timesteps), torch.ones(3))  # the scripts' weighting under logit-normal
    assert not schedule.takes_min_snr
    # Flux.1: its dynamic shift is the sampler's; training uses the unshifted table, as the scripts do.
    flux_schedule = family_of(flux).objective(flux.scheduler.config, torch.device("cpu"))
    assert torch.allclose(flux_schedule.timesteps, torch.arange(1000, 0, -1).float())


def padded(pipe, text, token_ids=None):
    """`text` encoded for each of the pipeline's tokenizers as training encodes it."""
    from tinv_gui.embeddings import encode_with_placeholder
    from tinv_gui.families import family_of
    from tinv_gui.methods.textual_inversion import pad_prompts

    family = family_of(pipe)
    return [
        pad_prompts(tokenizer, [encode_with_placeholder(tokenizer, text, TOKEN, token_ids or [], length)], torch.device("cpu"), length)
        for tokenizer, length in zip(family.tokenizers(pipe), family.prompt_lengths(pipe))
    ]


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_training_conditions_on_what_the_pipeline_computes(name, sd3, flux):
    from tinv_gui.families import family_of

    pipe = {"sd3": sd3, "flux": flux}[name]
    family = family_of(pipe)
    with torch.no_grad():
        hidden, pooled = family.encode_prompts(family.text_encoders(pipe), padded(pipe, SENTENCE))
        if name == "sd3":
            expected, _, expected_pooled, _ = pipe.encode_prompt(SENTENCE, SENTENCE, SENTENCE, do_classifier_free_guidance=False)
        else:
            expected, expected_pooled, _ = pipe.encode_prompt(SENTENCE, SENTENCE)
    assert torch.allclose(hidden, expected, atol=1e-5) and torch.allclose(pooled, expected_pooled, atol=1e-5)


def frozen_weights(pipe) -> dict:
    from tinv_gui.families import family_of

    family = family_of(pipe)
    modules = {"denoiser": family.denoiser(pipe), "vae": pipe.vae, **{f"te{i}": te for i, te in enumerate(family.text_encoders(pipe))}}
    return {f"{m}.{k}": v.clone() for m, module in modules.items() for k, v in module.state_dict().items()}


def start_parts(pipe, init="cat"):
    from tinv_gui.methods.textual_inversion import starting_vectors
    from tinv_gui.models import pipeline_text_widths

    return torch.split(starting_vectors(pipe, init, 1, 0), list(pipeline_text_widths(pipe)), dim=1)


def train(store, picture_dir, out, model, **overrides):
    """A training job in this process on the warm demo model; returns the saved parts (read back
    with formats.read_embedding) and the losses of its steps."""
    from tinv_gui.events import Reporter
    from tinv_gui.formats import read_embedding
    from tinv_gui.jobs import run_training
    from tinv_gui.settings import TrainSettings

    losses = []
    settings = TrainSettings(**{
        "images": str(picture_dir), "token": TOKEN, "model": model, "output_dir": str(out), "method": "textual-inversion",
        "init": "cat", "steps": 1, "batch_size": 1, "grad_accum": 1, "lr": 0.05, "resolution": 64, "flip": False,
        "device": "cpu", "precision": "fp32", **overrides,
    }).resolved()
    run_training(settings, store, Reporter(lambda e: losses.append(e.loss) if e.kind == "progress" else None, total_steps=settings.total_steps))
    return read_embedding(out / "learned_embeds.safetensors").parts, losses


@pytest.mark.parametrize("model", ["demo-sd3", "demo-flux"])
def test_textual_inversion_moves_only_the_new_vectors_each_encoder_choice_its_own_parts_and_resumes(model, store, picture_dir, tmp_path):
    from tinv_gui.embeddings import read_metadata
    from tinv_gui.families import family_of

    pipe = store.pipeline(model)
    family = family_of(pipe)
    before = frozen_weights(pipe)
    start = dict(zip(family.embedding_keys, start_parts(pipe)))
    first, losses = train(store, picture_dir, tmp_path, model)
    assert tuple(first) == family.embedding_keys and len(losses) == 1 and np.isfinite(losses[0])
    assert all(first[key].shape == start[key].shape and not torch.equal(first[key], start[key]) for key in start)  # every part learned
    # Resume: the run continues from the saved vectors and optimizer state to step 2.
    saved = tmp_path / "learned_embeds.safetensors"
    resumed, losses = train(store, picture_dir, tmp_path / "resumed", model, steps=2, resume=str(saved))
    assert len(losses) == 1 and read_metadata(tmp_path / "resumed" / "learned_embeds.safetensors")["steps"] == "2"
    assert all(not torch.equal(resumed[key], first[key]) for key in start)
    after = frozen_weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model and its vocabularies, bit for bit
    # CLIP only: T5's part stays at the starting word's T5 pieces; T5 only: the CLIP parts stay.
    for choice in ("clip", "t5"):
        parts, losses = train(store, picture_dir, tmp_path / choice, model, train_encoders=choice)
        for key in family.embedding_keys:
            assert torch.equal(parts[key], start[key]) == ((key == "t5") != (choice == "t5")), (choice, key)


def test_quick_learns_the_clip_parts_and_keeps_t5_at_the_starting_word(store, picture_dir, tmp_path):
    from tinv_gui.families import family_of

    pipe = store.pipeline("demo-sd3")
    start = dict(zip(family_of(pipe).embedding_keys, start_parts(pipe)))
    saved, losses = train(store, picture_dir, tmp_path, "demo-sd3", method="quick", steps=2, batch_size=2, lr=0.1, crops=1, resolution=None, flip=True)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert torch.equal(saved["t5"], start["t5"])  # T5 has no image tower: its part is the word's T5 pieces
    assert not torch.equal(saved["clip_l"], start["clip_l"]) and not torch.equal(saved["clip_g"], start["clip_g"])


def test_balanced_on_flux_starts_textual_inversion_from_quickembedding(store, picture_dir, tmp_path):
    from tinv_gui.families import family_of

    pipe = store.pipeline("demo-flux")
    start = dict(zip(family_of(pipe).embedding_keys, start_parts(pipe)))
    saved, losses = train(store, picture_dir, tmp_path, "demo-flux", method="quick-then-ti", quick_steps=1, steps=1, crops=1, log_with="none")
    assert len(losses) == 2 and all(np.isfinite(losses))  # one QuickEmbedding step, then one through the transformer
    assert tuple(saved) == ("clip_l", "t5") and all(not torch.equal(saved[key], start[key]) for key in start)


def test_a_caption_start_puts_each_encoders_part_of_a_vector_on_the_same_clip_token(flux):
    """T5 splits "grey" and "photorealistic" into other pieces than CLIP: vector i's T5 part
    starts from T5's pieces of CLIP token i's text, not from T5's own piece i."""
    from tinv_gui.embeddings import tokenize_words
    from tinv_gui.methods.textual_inversion import starting_vectors
    from tinv_gui.models import pipeline_text_widths, text_encoders, tokenizers

    caption = "a grey cat sleeping on a red sofa, photorealistic"
    clip_tokenizer, t5_tokenizer = tokenizers(flux)
    clip_table, t5_table = (te.get_input_embeddings().weight.detach().float() for te in text_encoders(flux))
    clip_ids = tokenize_words(clip_tokenizer, caption)
    assert len(tokenize_words(t5_tokenizer, caption)) != len(clip_ids)  # the case this test is about
    clip_part, t5_part = torch.split(starting_vectors(flux, caption, len(clip_ids), 0), list(pipeline_text_widths(flux)), dim=1)
    assert torch.equal(clip_part, clip_table[clip_ids])
    for i, clip_id in enumerate(clip_ids):
        word = clip_tokenizer.decode([clip_id])
        assert torch.allclose(t5_part[i], t5_table[tokenize_words(t5_tokenizer, word)].mean(0)), (i, word)


def test_cli_trains_flux_from_a_caption_a_vector_per_word_in_each_encoder(picture_dir, tmp_path):
    from tinv_gui.embeddings import read_metadata
    from tinv_gui.formats import read_embedding

    caption = "a red robot on a sofa"
    out = tmp_path / "out"
    assert cli.main(["train", "--method", "caption-init", "--model", "demo-flux", "--images", str(next(picture_dir.iterdir())),
                     "--token", TOKEN, "--caption", caption, "--steps", "1", "--batch-size", "1", "--resolution", "64", "--no-flip",
                     "--device", "cpu", "--precision", "fp32", "--log-with", "none", "--output", str(out)]) == 0
    saved = read_embedding(out / "learned_embeds.safetensors")
    assert saved.keys == ("clip_l", "t5") and saved.widths == FLUX_TEXT_WIDTHS and saved.count == len(caption.split())
    assert read_metadata(out / "learned_embeds.safetensors")["caption"] == caption


def test_each_token_table_is_read_alone_from_the_weights(sd3, flux):
    # A store with no warm pipeline reads the table from the component's file, without loading T5.
    # The CLIP tables too, whichever prefix transformers saved them under: demo-flux's CLIP-L holds
    # "embeddings.token_embedding.weight" (transformers 5), demo-sd3's "text_model.embeddings.…".
    from tinv_gui.families import family_of

    cold = ModelStore()
    for name, pipe in (("demo-sd3", sd3), ("demo-flux", flux)):
        for i, text_encoder in enumerate(family_of(pipe).text_encoders(pipe)):
            assert torch.equal(cold.word_table(name, i), text_encoder.get_input_embeddings().weight.float()), (name, i)

