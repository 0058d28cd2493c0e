"""SDXL on the offline demo-sdxl model: its shape, the two-encoder embedding layout, loading it
with diffusers, generating with it, and QuickEmbedding against both CLIP models."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tinv_gui import cli
from tinv_gui.data import load_dataset
from tinv_gui.demo_model import SDXL_TEXT_WIDTHS, SDXL_TIME_EMBED_WIDTH
from tinv_gui.device import choose_placement
from tinv_gui.embeddings import (
    extended_vocabulary,
    save_embedding,
    unload_from_pipeline,
)
from tinv_gui.events import Reporter
from tinv_gui.families import (
    FAMILIES,
    StableDiffusion,
    StableDiffusionXL,
    family_for_checkpoint,
    family_of,
)
from tinv_gui.formats import (
    EmbeddingFile,
    EmbeddingFormatError,
    check_fits,
    read_embedding,
)
from tinv_gui.generate import generate
from tinv_gui.methods.quick import train_quick
from tinv_gui.models import ModelLoadError, checkpoint_keys
from tinv_gui.settings import TrainSettings
from tinv_gui.training import EmbeddingWriter

WIDTH_L, WIDTH_G = SDXL_TEXT_WIDTHS


@pytest.fixture(scope="module")
def pipe(store):
    return store.pipeline("demo-sdxl")


def sdxl_file(path, token="<xl>", seed=0, count=2, clip_g=None):
    """An SDXL embedding file written as training writes it: both parts side by side."""
    generator = torch.Generator().manual_seed(seed)
    clip_l = torch.randn(count, WIDTH_L, generator=generator)
    clip_g = torch.randn(count, WIDTH_G, generator=generator) if clip_g is None else clip_g
    return save_embedding(path, token, torch.cat([clip_l, clip_g], dim=1), {"steps": 1}, SDXL_TEXT_WIDTHS, StableDiffusionXL.embedding_keys)


def test_demo_sdxl_has_sdxl_shape(store, pipe):
    assert isinstance(store.family("demo-sdxl"), StableDiffusionXL) and type(store.family("demo")) is StableDiffusion
    assert family_of(pipe) is store.family("demo-sdxl") and store.text_encoder_count("demo-sdxl") == 2
    assert {f.demo_model for f in FAMILIES} == {"demo", "demo-sdxl", "demo-sd3", "demo-flux"}  # each family has its offline model
    assert all(type(store.family(f.demo_model)) is type(f) for f in FAMILIES)
    assert store.text_widths("demo-sdxl") == SDXL_TEXT_WIDTHS and WIDTH_L != WIDTH_G
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time" and unet.cross_attention_dim == WIDTH_L + WIDTH_G
    assert unet.projection_class_embeddings_input_dim == 6 * SDXL_TIME_EMBED_WIDTH + pipe.text_encoder_2.config.projection_dim
    # Each CLIP's text tower is its text encoder, weight for weight, in the dtype the pipeline
    # stores it in (bf16 linear weights under the automatic fp32 on a CPU).
    for encoder, text_encoder in enumerate((pipe.text_encoder, pipe.text_encoder_2.text_model)):
        clip = store.clip("demo-sdxl", encoder=encoder).model
        for name, weight in text_encoder.state_dict().items():
            assert torch.equal(weight, clip.text_model.state_dict()[name].to(weight.dtype)), name
    projection = pipe.text_encoder_2.text_projection.weight
    assert torch.equal(projection, store.clip("demo-sdxl", encoder=1).model.text_projection.weight.to(projection.dtype))


def test_second_encoder_pools_at_the_end_token_with_new_tokens(pipe):
    """SDXL's second encoder config would pool at the largest id, i.e. at a learned token."""
    tokenizer = pipe.tokenizer_2
    ids = [tokenizer.bos_token_id] + tokenizer("a photo of", add_special_tokens=False).input_ids + [49408, tokenizer.eos_token_id]
    ids = torch.tensor([ids + [tokenizer.pad_token_id] * 3])
    with extended_vocabulary(pipe.text_encoder_2, torch.randn(1, WIDTH_G)), torch.no_grad():
        out = pipe.text_encoder_2(ids, output_hidden_states=True)
    end = ids[0].tolist().index(tokenizer.eos_token_id)
    expected = pipe.text_encoder_2.text_projection(out.last_hidden_state[0, end])
    torch.testing.assert_close(out.text_embeds[0], expected)


def test_saved_layout_and_widths(tmp_path):
    path = sdxl_file(tmp_path / "learned_embeds.safetensors", count=3)
    tensors = load_file(str(path))
    assert set(tensors) == {"clip_l", "clip_g"}
    assert tensors["clip_l"].shape == (3, WIDTH_L) and tensors["clip_g"].shape == (3, WIDTH_G)
    embedding = read_embedding(path)
    assert embedding.keys == StableDiffusionXL.embedding_keys and embedding.token == "<xl>"
    check_fits(embedding, SDXL_TEXT_WIDTHS)
    with pytest.raises(EmbeddingFormatError, match=r"text widths 32 \+ 64 \(Stable Diffusion XL\)"):
        check_fits(embedding, (WIDTH_G, WIDTH_L))  # the two parts swapped
    with pytest.raises(EmbeddingFormatError, match="the chosen model has 64"):
        check_fits(embedding, 64)  # an SD 1.x-shaped model
    with pytest.raises(EmbeddingFormatError, match=r"the chosen model has text widths 32 \+ 64"):
        check_fits(EmbeddingFile("<x>", torch.zeros(1, 64)), SDXL_TEXT_WIDTHS)


def test_diffusers_loads_both_parts_with_two_load_textual_inversion_calls(pipe, tmp_path):
    state = load_file(str(sdxl_file(tmp_path / "xl.safetensors")))
    names = ["<xl>", "<xl>_1"]
    pipe.load_textual_inversion(state["clip_l"], token="<xl>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="<xl>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    try:
        for tokenizer, text_encoder, part in ((pipe.tokenizer, pipe.text_encoder, "clip_l"), (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")):
            ids = tokenizer.convert_tokens_to_ids(names)
            assert ids == [49408, 49409]
            assert torch.equal(text_encoder.get_input_embeddings().weight[ids], state[part])
    finally:
        unload_from_pipeline(pipe, names)
    for tokenizer, text_encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        assert len(tokenizer) == 49408 and text_encoder.get_input_embeddings().num_embeddings == 49408
        assert not text_encoder.get_input_embeddings().weight.requires_grad


def test_generation_uses_both_parts_and_leaves_the_pipeline_clean(pipe, tmp_path):
    first = sdxl_file(tmp_path / "a.safetensors", seed=1)
    same_clip_l = sdxl_file(tmp_path / "b.safetensors", seed=1, clip_g=torch.zeros(2, WIDTH_G))
    common = dict(prompt="a photo of <xl>", steps=2, seed=3)
    one = generate(pipe, embeddings=[first], **common)
    other = generate(pipe, embeddings=[same_clip_l], **common)
    assert one[0].size == (64, 64)
    assert not np.array_equal(np.asarray(one[0]), np.asarray(other[0]))  # the second encoder's vectors matter
    assert len(pipe.tokenizer) == len(pipe.tokenizer_2) == 49408
    sd_embedding = save_embedding(tmp_path / "sd.safetensors", "<sd>", torch.zeros(1, 64))
    with pytest.raises(EmbeddingFormatError, match="sd.safetensors was made for a model with text width 64"):
        generate(pipe, prompt="<sd>", embeddings=[sd_embedding], steps=1)


def test_playground_draws_with_an_sdxl_embedding_at_any_strength(pipe, tmp_path):
    thing = sdxl_file(tmp_path / "thing.safetensors")
    kwargs = dict(prompt="a photo of <xl>", steps=2, seed=1, sampler="Euler")
    full = generate(pipe, embeddings=[thing], **kwargs)
    weaker = generate(pipe, embeddings=[thing], strength=0.5, **kwargs)
    assert not np.array_equal(np.asarray(full[0]), np.asarray(weaker[0]))
    assert list(tmp_path.iterdir()) == [thing]  # nothing is written beside it
    assert len(pipe.tokenizer) == len(pipe.tokenizer_2) == 49408 and type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"


def test_quick_on_sdxl_trains_both_parts_against_their_own_clip(store, picture_dir, tmp_path):
    clips = [store.clip("demo-sdxl", encoder=0), store.clip("demo-sdxl", encoder=1)]
    before = [{k: v.clone() for k, v in clip.model.state_dict().items()} for clip in clips]
    images = load_dataset(picture_dir, size=74, min_side=32)
    settings = TrainSettings(images=picture_dir, token="<q>", init="ball", vectors=2, steps=25, batch_size=8, model="demo-sdxl").resolved()
    losses = []
    reporter = Reporter(lambda e: losses.append(e.loss) if e.kind == "progress" else None, total_steps=25)
    writer = EmbeddingWriter(tmp_path, "<q>", 0, {"method": "quick"}, reporter, SDXL_TEXT_WIDTHS, ("clip_l", "clip_g"))
    result = train_quick(clips, images, settings, reporter, writer)
    assert result.steps_done == 25 and result.vectors.shape == (2, WIDTH_L + WIDTH_G)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:3]) / 3
    saved = read_embedding(writer.outputs["embedding"])
    # Both parts moved away from the initializer word's embedding in their own encoder.
    for clip, part in zip(clips, saved.parts.values()):
        ball = clip.model.text_model.get_input_embeddings().weight[clip.tokenizer("ball", add_special_tokens=False).input_ids[0]]
        assert (part - ball).norm(dim=1).min() > 1e-3
    for clip, state in zip(clips, before):  # the CLIP models are untouched
        assert all(torch.equal(state[k], v) for k, v in clip.model.state_dict().items())


def test_cli_quick_on_sdxl_then_generate(picture_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--model", "demo-sdxl", "--images", str(picture_dir), "--token", "<cx>", "--init", "ball",
                     "--steps", "3", "--batch-size", "4", "--output", str(out)])
    assert code == 0
    embedding = read_embedding(out / "learned_embeds.safetensors")
    assert embedding.widths == SDXL_TEXT_WIDTHS and embedding.metadata["method"] == "quick"
    assert "clip_l" in embedding.metadata["clip_model"] and "clip_g" in embedding.metadata["clip_model"]
    code = cli.main(["generate", "--model", "demo-sdxl", "--embedding", str(out / "learned_embeds.safetensors"),
                     "--prompt", "a photo of <cx>", "--steps", "2", "--output", str(tmp_path / "picture.png")])
    assert code == 0 and (tmp_path / "picture.png").is_file()


def test_missing_sdxl_clip_is_explained(store):
    with pytest.raises(ModelLoadError) as error:
        store.clip("demo-sdxl", clip_model="someone/not-a-cached-clip", encoder=1)
    message = str(error.value)
    assert "someone/not-a-cached-clip" in message and "--clip-model-g" in message
    assert "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k" in message and "openai/clip-vit-large-patch14" in message


def test_sdxl_checkpoints_are_told_by_their_keys(tmp_path):
    weight = {"weight": torch.zeros(1)}
    save_file({f"conditioner.embedders.1.model.ln_final.{k}": v for k, v in weight.items()}, tmp_path / "xl.safetensors")
    save_file({f"cond_stage_model.transformer.text_model.final_layer_norm.{k}": v for k, v in weight.items()}, tmp_path / "sd15.safetensors")
    torch.save({"state_dict": {"conditioner.embedders.1.model.text_projection": torch.zeros(1)}}, tmp_path / "xl.ckpt")
    families = [family_for_checkpoint(checkpoint_keys(tmp_path / name)) for name in ("xl.safetensors", "xl.ckpt", "sd15.safetensors")]
    assert [type(f) for f in families] == [StableDiffusionXL, StableDiffusionXL, StableDiffusion]


# ---- textual inversion through the UNet -----------------------------------------------------


def test_sdxl_conditioning_is_the_pipelines_own_and_reaches_the_unet(pipe, picture_dir):
    from tinv_gui.device import choose_placement
    from tinv_gui.embeddings import encode_with_placeholder, extended_vocabularies
    from tinv_gui.methods.textual_inversion import (
        DiffusionLoss,
        encode_latents,
        pad_prompts,
    )
    from tinv_gui.models import text_encoders, tokenizers

    placement = choose_placement("cpu", "fp32")
    family = family_of(pipe)
    encoders, prompt = text_encoders(pipe), "a photo of a ball"
    with torch.no_grad():
        hidden, pooled = family.encode_prompts(encoders, [pad_prompts(t, [t(prompt).input_ids], placement.device) for t in tokenizers(pipe)])
        expected, _, expected_pooled, _ = pipe.encode_prompt(prompt, device=placement.device, do_classifier_free_guidance=False)
    torch.testing.assert_close(hidden, expected)
    torch.testing.assert_close(pooled, expected_pooled)

    images = load_dataset(picture_dir, size=64)  # 96x80 pictures: scaled to 77x64, 6 pixels cut on the left
    assert images[0].original_size == (80, 96) and images[0].crop_top_left == (0, 6)
    encoded = [[encode_with_placeholder(t, "a photo of <t>", "<t>", [49408])] for t in tokenizers(pipe)]
    loss = DiffusionLoss(pipe, placement, encode_latents(pipe, images, placement, False), encoded, False, 2, False, 0, family.size_conditioning(images, 64))
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda _m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    vectors = torch.randn(1, WIDTH_L + WIDTH_G, requires_grad=True)
    try:
        with extended_vocabularies(encoders, vectors):
            loss().backward()
            with torch.no_grad():
                _, token_pooled = family.encode_prompts(encoders, loss.prompts)
    finally:
        hook.remove()
    (args, kwargs), = seen
    assert args[2].shape == (2, 77, WIDTH_L + WIDTH_G)
    assert torch.equal(kwargs["added_cond_kwargs"]["time_ids"], torch.tensor([[80.0, 96, 0, 6, 64, 64]] * 2))
    torch.testing.assert_close(kwargs["added_cond_kwargs"]["text_embeds"], token_pooled.expand(2, -1))
    # The loss reaches both encoders' vectors.
    assert vectors.grad[:, :WIDTH_L].abs().sum() > 0 and vectors.grad[:, WIDTH_L:].abs().sum() > 0


def test_textual_inversion_and_caption_init_on_sdxl_through_the_cli(store, pipe, picture_dir, tmp_path):
    from tinv_gui.methods.textual_inversion import starting_vectors

    out = tmp_path / "ti"
    code = cli.main(["train", "--method", "textual-inversion", "--model", "demo-sdxl", "--images", str(picture_dir), "--token", "<ti>",
                     "--init", "ball", "--vectors", "2", "--steps", "3", "--batch-size", "1", "--grad-accum", "1", "--output", str(out)])
    assert code == 0
    trained = read_embedding(out / "learned_embeds.safetensors")
    assert trained.widths == SDXL_TEXT_WIDTHS and trained.metadata["steps"] == "3"
    start_l, start_g = starting_vectors(pipe, "ball", 2, 0).split(SDXL_TEXT_WIDTHS, dim=1)
    assert not torch.allclose(trained.parts["clip_l"], start_l) and not torch.allclose(trained.parts["clip_g"], start_g)
    assert generate(pipe, prompt="a photo of <ti>", embeddings=[out / "learned_embeds.safetensors"], steps=2)[0].size == (64, 64)

    out = tmp_path / "caption"
    code = cli.main(["train", "--method", "caption-init", "--caption", "a red ball", "--model", "demo-sdxl", "--images", str(picture_dir),
                     "--token", "<ci>", "--steps", "2", "--batch-size", "1", "--output", str(out)])
    assert code == 0
    captioned = read_embedding(out / "learned_embeds.safetensors")
    assert captioned.parts["clip_l"].shape == (3, WIDTH_L) and captioned.parts["clip_g"].shape == (3, WIDTH_G)


# ---- prompt from an image -----------------------------------------------------------------


def test_continuous_prompt_on_sdxl_through_the_cli_then_generate(store, pipe, tmp_path):
    import json

    import torch.nn.functional as F
    from conftest import make_picture

    from tinv_gui.clip_space import image_features, pooled_text_features
    from tinv_gui.embeddings import tokenize_words

    picture = make_picture(3)
    picture.save(tmp_path / "p.png")
    out, log = tmp_path / "out", tmp_path / "log.jsonl"
    # fp32 pinned: the figures below are recomputed here in fp32 (auto picks bf16 on CPUs with native bf16).
    code = cli.main(["optimize-prompt", "--model", "demo-sdxl", "--image", str(tmp_path / "p.png"), "--prompt", "a photo of",
                     "--steps", "12", "--output", str(out), "--log-jsonl", str(log), "--device", "cpu", "--precision", "fp32"])
    assert code == 0
    losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0]
    metrics = json.loads((out / "result.json").read_text())["metrics"]
    fp32 = choose_placement("cpu", "fp32")
    clips = [store.clip("demo-sdxl", placement=fp32, encoder=encoder) for encoder in (0, 1)]
    targets = [image_features(clip, [picture], 1)[0] for clip in clips]
    # Each CLIP's similarity rose from where its part of the prompt started (the words, then its own
    # tokenizer's padding up to the 16 free tokens): both parts were optimized.
    for clip, target, key in zip(clips, targets, ("clip_l_similarity", "clip_g_similarity")):
        tokenizer = clip.tokenizer
        words = tokenize_words(tokenizer, "a photo of")
        start = [tokenizer.bos_token_id, *words, *[tokenizer.pad_token_id] * (16 - len(words)), tokenizer.eos_token_id]
        with torch.no_grad():
            start_features = F.normalize(pooled_text_features(clip, torch.tensor([start])), dim=-1)[0]
        assert metrics[key] > float(start_features @ target) + 0.05, key
    assert metrics["clip_similarity"] == pytest.approx((metrics["clip_l_similarity"] + metrics["clip_g_similarity"]) / 2)

    saved = load_file(str(out / "prompt_embeds.safetensors"))
    projection = pipe.text_encoder_2.config.projection_dim
    assert saved["prompt_embeds"].shape == saved["negative_prompt_embeds"].shape == (1, 77, WIDTH_L + WIDTH_G)
    assert saved["pooled_prompt_embeds"].shape == saved["negative_pooled_prompt_embeds"].shape == (1, projection)
    # No negative was optimized: the negative is what diffusers itself uses when none is typed.
    _, negative, _, negative_pooled = pipe.encode_prompt("", device=torch.device("cpu"), do_classifier_free_guidance=True)
    torch.testing.assert_close(saved["negative_prompt_embeds"], negative)
    torch.testing.assert_close(saved["negative_pooled_prompt_embeds"], negative_pooled)
    # The second encoder is bigG's text tower: the saved pooled output reproduces its reported similarity.
    pooled = F.normalize(saved["pooled_prompt_embeds"][0], dim=-1)
    assert float(pooled @ targets[1]) == pytest.approx(metrics["clip_g_similarity"], abs=1e-4)

    picture_path = tmp_path / "found.png"
    code = cli.main(["generate", "--model", "demo-sdxl", "--prompt-embeds", str(out / "prompt_embeds.safetensors"), "--steps", "2",
                     "--size", "64x48", "--output", str(picture_path)])
    assert code == 0 and Image.open(picture_path).size == (64, 48)
    common = dict(steps=2, seed=5)
    found = generate(pipe, prompt_embeds=out / "prompt_embeds.safetensors", **common)  # the app's "Generate with it"
    empty = generate(pipe, prompt="", **common)
    no_pooled = tmp_path / "no_pooled.safetensors"
    save_file({**saved, "pooled_prompt_embeds": torch.zeros_like(saved["pooled_prompt_embeds"])}, str(no_pooled))
    without_pooled = generate(pipe, prompt_embeds=no_pooled, **common)
    assert not np.array_equal(np.asarray(found[0]), np.asarray(empty[0]))
    assert not np.array_equal(np.asarray(found[0]), np.asarray(without_pooled[0]))  # the pooled prompt reaches the UNet


def test_sdxl_prompt_with_an_optimized_negative_and_files_that_do_not_fit(store, pipe, tmp_path):
    from conftest import make_picture

    from tinv_gui.engine import Engine
    from tinv_gui.events import Finished
    from tinv_gui.settings import PromptSettings

    make_picture(4).save(tmp_path / "p.png")
    settings = PromptSettings(images=[str(tmp_path / "p.png")], model="demo-sdxl", negative="blurry", length=4, steps=2,
                              output_dir=str(tmp_path / "out"), device="cpu", precision="fp32")
    finished = Engine(store).optimize_prompt(settings).wait()
    assert isinstance(finished, Finished), finished
    saved = load_file(finished.outputs["prompt_embeds"])
    assert saved["negative_prompt_embeds"].shape == (1, 77, WIDTH_L + WIDTH_G)
    assert saved["negative_pooled_prompt_embeds"].abs().sum() > 0  # the optimized negative, not diffusers' zeros
    assert not torch.equal(saved["negative_pooled_prompt_embeds"], saved["pooled_prompt_embeds"])
    assert generate(pipe, prompt_embeds=finished.outputs["prompt_embeds"], negative="ugly", steps=1)[0].size == (64, 64)

    sd_shaped = tmp_path / "sd.safetensors"
    save_file({"prompt_embeds": torch.zeros(1, 77, WIDTH_L)}, str(sd_shaped))
    with pytest.raises(ValueError, match="total width 32, but this model's is 96"):
        generate(pipe, prompt_embeds=sd_shaped, steps=1)
    unpooled = tmp_path / "unpooled.safetensors"
    save_file({"prompt_embeds": saved["prompt_embeds"]}, str(unpooled))
    with pytest.raises(ValueError, match="no 'pooled_prompt_embeds'"):
        generate(pipe, prompt_embeds=unpooled, steps=1)


def test_readable_prompt_on_sdxl_still_uses_the_first_clip(tmp_path):
    from conftest import make_picture

    make_picture(3).save(tmp_path / "p.png")
    out = tmp_path / "out"
    code = cli.main(["optimize-prompt", "--model", "demo-sdxl", "--image", str(tmp_path / "p.png"), "--hard", "--steps", "3",
                     "--length", "4", "--output", str(out)])
    assert code == 0 and len((out / "prompt.txt").read_text().split()) == 4
