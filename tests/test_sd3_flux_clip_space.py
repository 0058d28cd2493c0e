"""Evaluation and prompt-from-image on SD 3.x and Flux.1 (demo-sd3, demo-flux): the CLIP-space
jobs score with CLIP-L's towers, optimize the CLIP parts of a prompt, let T5 read the nearest
words, and what they make draws in the family's pipeline. Everything runs on the job's own fp32
pipeline, so the figures do not depend on the CPU's native precision."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import make_picture
from safetensors.torch import load_file

from tinv_gui.device import choose_placement
from tinv_gui.embeddings import save_embedding
from tinv_gui.evaluate import EvalSettings
from tinv_gui.events import Reporter
from tinv_gui.families import family_of
from tinv_gui.generate import generate
from tinv_gui.jobs import run_evaluation, run_prompt_optimization
from tinv_gui.models import pipeline_text_widths
from tinv_gui.settings import PromptSettings

JOB = dict(device="cpu", precision="fp32")  # the jobs' placement, pinned
TOKEN = "<sd3-flux-thing>"


@pytest.fixture(scope="module", params=["demo-sd3", "demo-flux"])
def model(request, store):
    """Each family in turn; every test of the module runs on one before the next loads."""
    return request.param


@pytest.fixture(scope="module")
def pipe(store, model):
    return store.pipeline(model, choose_placement(**JOB))  # the jobs' own pipeline


@pytest.fixture(scope="module")
def continuous(store, model, pipe, tmp_path_factory):
    """One continuous prompt search on one picture: (its outputs, its log lines)."""
    folder = tmp_path_factory.mktemp(f"prompt-{model}")
    make_picture(5).save(folder / "picture.png")
    settings = PromptSettings(images=[str(folder / "picture.png")], model=model, steps=2, length=3, crops=1, output_dir=str(folder / "out"), **JOB)
    settings = settings.resolved()
    logs = []
    outputs = run_prompt_optimization(settings, store, Reporter(lambda e: logs.append(e.message) if e.kind == "log" else None, total_steps=2))
    return outputs, logs


def draw(pipe, **what):
    """One small picture; guidance 1 draws without a second, negative pass (SD 3.x)."""
    return np.asarray(generate(pipe, steps=1, size=(32, 32), seed=0, guidance=1.0, **what)[0]).astype(np.int16)


def test_evaluation_scores_the_token_against_the_prompt_without_it(store, model, pipe, picture_dir, tmp_path):
    family = family_of(pipe)
    widths = pipeline_text_widths(pipe)
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(1, sum(widths), generator=generator)  # a made-up token: any vectors change the picture
    embedding = save_embedding(tmp_path / "e.safetensors", TOKEN, vectors, {"init": "cat"}, widths, family.embedding_keys)
    settings = EvalSettings(model=model, embedding=str(embedding), images=str(picture_dir), prompt=f"a photo of {TOKEN}", n=1, steps=1,
                            size="32x32", guidance=1.0, init="", json_path=str(tmp_path / "figures.json"), **JOB)
    reporter = Reporter(lambda e: None, total_steps=settings.total_steps)
    run_evaluation(settings, store, reporter)
    figures = {k: v for k, v in reporter.metrics.items() if k != "guidance"}
    assert reporter.metrics["guidance"] == 1.0  # the asked guidance, reported beside the figures
    assert len(figures) == 4 and all(math.isfinite(v) and -1 <= v <= 1 for v in figures.values())
    # The baseline is the prompt without the token: the token's pictures differ, so do their figures.
    assert figures["clip_image_similarity"] != figures["baseline_clip_image_similarity"]
    saved = json.loads((tmp_path / "figures.json").read_text())
    assert saved["baseline_prompt"] == "a photo of" and saved["clip_model"].endswith("clip_l")  # CLIP-L's towers score
    # Drawing with the token and unloading it leaves the pipeline's tokenizers decoding as before
    # (diffusers' unload gives them a new backend): the words T5 reads are decoded by them.
    for tokenizer in family.tokenizers(pipe):
        assert tokenizer.decode(tokenizer("a photo of a cat", add_special_tokens=False).input_ids) == "a photo of a cat"


def test_continuous_prompt_learns_the_clip_parts_and_t5_reads_the_nearest_words(model, pipe, continuous):
    outputs, logs = continuous
    saved = load_file(outputs["prompt_embeds"])
    words = open(outputs["t5_prompt"], encoding="utf-8").read().strip()
    assert len(words.split()) >= 3 and any(words in line for line in logs)
    assert json.loads(open(outputs["result"]).read())["t5_prompt"] == words
    # The conditioning the pipeline computes for those words, to compare with what was saved.
    with torch.no_grad():
        if model == "demo-sd3":
            hidden, _, pooled, _ = pipe.encode_prompt(words, words, words, do_classifier_free_guidance=False)
            t5_rows, clip_rows = slice(77, None), slice(0, 77)
        else:
            hidden, pooled, _ = pipe.encode_prompt(words, words)
            t5_rows, clip_rows = slice(None), slice(0, 0)  # Flux.1 takes only CLIP-L's pooled vector
    assert saved["prompt_embeds"].shape == hidden.shape and saved["pooled_prompt_embeds"].shape == pooled.shape
    assert "negative_prompt_embeds" not in saved  # the pipeline encodes the negative itself (SD 3.x) or has none (Flux.1)
    torch.testing.assert_close(saved["prompt_embeds"][:, t5_rows], hidden[:, t5_rows])  # T5 reads the words
    assert not torch.allclose(saved["pooled_prompt_embeds"], pooled, atol=1e-3)  # the CLIPs read the learned vectors
    if model == "demo-sd3":
        assert not torch.allclose(saved["prompt_embeds"][:, clip_rows], hidden[:, clip_rows], atol=1e-3)


def test_the_continuous_prompt_draws_in_the_familys_pipeline(pipe, continuous):
    outputs, _ = continuous
    words = open(outputs["t5_prompt"], encoding="utf-8").read().strip()
    found = draw(pipe, prompt_embeds=outputs["prompt_embeds"])
    assert found.shape == (32, 32, 3)
    assert np.abs(found - draw(pipe, prompt=words)).mean() > 0  # the learned CLIP vectors change the picture


def test_readable_prompt_is_words_every_encoder_reads(store, model, tmp_path):
    picture = tmp_path / "picture.png"
    make_picture(6).save(picture)
    settings = PromptSettings(images=[str(picture)], model=model, hard=True, steps=2, length=3, output_dir=str(tmp_path / "out"), **JOB)
    outputs = run_prompt_optimization(settings.resolved(), store, Reporter(lambda e: None, total_steps=2))
    words = open(outputs["prompt"], encoding="utf-8").read().strip()
    assert len(words.split()) == 3 and "t5_prompt" not in outputs  # plain text: T5 reads it as the CLIPs do
    assert "prompt_embeds" not in outputs
    if model == "demo-flux":  # no negative prompt to optimize away from
        settings.negative = "blurry"
        with pytest.raises(ValueError, match="Flux.1 runs without a negative prompt"):
            run_prompt_optimization(settings.resolved(), store, Reporter(lambda e: None, total_steps=2))
