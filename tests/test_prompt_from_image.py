"""Prompt from an image, continuous and hard, on the demo model."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import cli_here, make_picture
from safetensors.torch import load_file

from tinv_gui.clip_space import image_features
from tinv_gui.device import choose_placement
from tinv_gui.engine import Engine
from tinv_gui.events import Failed, Finished, Progress, Reporter
from tinv_gui.methods.prompt_from_image import (
    optimize_prompt,
    readable_token_ids,
    text_features,
)
from tinv_gui.settings import PromptSettings, SettingsError


@pytest.fixture(scope="module")
def clip(store):
    return store.clip("demo")


@pytest.fixture(scope="module")
def picture():
    return make_picture(3)


def run(clip, picture, stop_after=None, **settings):
    """optimize_prompt on one picture; returns (result, progress events)."""
    events = []
    reporter = Reporter(events.append)

    def emit(event):
        events.append(event)
        if stop_after and isinstance(event, Progress) and event.step >= stop_after:
            reporter.stop_event.set()

    reporter._emit = emit
    resolved = PromptSettings(images=["unused"], **settings).resolved()
    result = optimize_prompt(clip, [picture], resolved, reporter)
    return result, [e for e in events if isinstance(e, Progress)]


def test_continuous_loss_falls_and_similarity_rises(clip, picture):
    result, progress = run(clip, picture, prompt="a photo of", steps=15)
    assert len(progress) == 15 and result.steps_done == 15
    assert progress[-1].loss < 0.7 * progress[0].loss
    assert all(p.elapsed_s >= 0 and p.phase == "prompt" for p in progress)
    start = float(text_features(clip, ["a photo of"])[0] @ image_features(clip, [picture], 1)[0])
    assert result.similarity > start + 0.1


def test_saved_prompt_embeds_are_the_pipelines_and_generate_an_image(store, tmp_path, picture):
    path = tmp_path / "picture.png"
    picture.save(path)
    job = Engine(store).optimize_prompt(PromptSettings(images=[str(path)], output_dir=str(tmp_path / "out"), steps=8, device="cpu", precision="fp32"))
    events = list(job.events())
    finished = events[-1]
    assert isinstance(finished, Finished), events[-1]
    assert [e.step for e in events if isinstance(e, Progress)] == list(range(1, 9))
    saved = load_file(finished.outputs["prompt_embeds"])
    pipe = store.pipeline("demo", choose_placement("cpu", "fp32"))  # the job's own pipeline
    width = pipe.text_encoder.config.hidden_size
    assert saved["prompt_embeds"].shape == saved["negative_prompt_embeds"].shape == (1, 77, width)
    # No negative was optimized: the negative is the empty prompt exactly as diffusers encodes it.
    empty = pipe.encode_prompt("", torch.device("cpu"), 1, False)[0]
    torch.testing.assert_close(saved["negative_prompt_embeds"], empty)
    # The demo's text encoder is its CLIP's text tower, so the saved hidden state at the end-of-text
    # position, projected, must reproduce the similarity the job reports.
    clip = store.clip("demo")
    length = json.loads(Path(finished.outputs["result"]).read_text())["length"]
    pooled = clip.model.text_projection(saved["prompt_embeds"][0, length + 1])
    target = image_features(clip, [picture], 1)[0]
    assert float(F.normalize(pooled, dim=-1) @ target) == pytest.approx(finished.metrics["clip_similarity"], abs=1e-4)

    image = pipe(
        prompt_embeds=saved["prompt_embeds"],
        negative_prompt_embeds=saved["negative_prompt_embeds"],
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


def test_hard_prompt_is_vocabulary_words_that_round_trip(clip, picture):
    result, progress = run(clip, picture, hard=True, steps=25, length=8)
    tokenizer = clip.tokenizer
    ids = result.token_ids[0]
    assert len(ids) == 8
    assert all(0 <= i < len(tokenizer) and i not in tokenizer.all_special_ids for i in ids)
    assert tokenizer(result.texts[0], add_special_tokens=False).input_ids == ids
    assert set(ids) <= set(readable_token_ids(tokenizer).tolist())
    # The best prompt seen is kept, and its similarity is the one its plain text gets.
    assert result.loss == pytest.approx(min(p.loss for p in progress))
    assert result.loss < progress[0].loss
    recomputed = float(text_features(clip, [result.texts[0]])[0] @ image_features(clip, [picture], 1)[0])
    assert result.similarity == pytest.approx(recomputed, abs=1e-5)
    assert all(p.phase == "hard prompt" for p in progress)


def test_hard_prompt_stopped_early_keeps_the_best_so_far(clip, picture):
    result, progress = run(clip, picture, stop_after=3, hard=True, steps=50, length=4, negative="blurry")
    assert result.stopped_early and result.steps_done == 3 and len(progress) == 3
    assert len(result.texts) == 2  # the negative is optimized too
    assert result.loss == pytest.approx(min(p.loss for p in progress))


def test_anchor_weight_pulls_towards_the_anchor(clip, picture):
    free, _ = run(clip, picture, steps=15, anchor="a red apple on a table", anchor_weight=0.0)
    anchored, _ = run(clip, picture, steps=15, anchor="a red apple on a table", anchor_weight=3.0)
    assert anchored.anchor_similarity > free.anchor_similarity + 0.05
    assert anchored.similarity < free.similarity  # the pull costs some likeness to the picture


def test_settings_are_checked_with_the_field_named(clip, picture):
    with pytest.raises(SettingsError) as error:
        PromptSettings(images=["x"], length=76).resolved()
    assert error.value.field == "length"
    with pytest.raises(SettingsError) as error:
        PromptSettings(images=["x"], image_weights=[-1.0]).resolved()
    assert error.value.field == "image_weights"
    with pytest.raises(SettingsError) as error:
        run(clip, picture, prompt="a very long prompt about many things", length=3, steps=1)
    assert error.value.field == "length"


def test_picture_and_weight_counts_must_match(store, tmp_path, picture):
    picture.save(tmp_path / "a.png")
    settings = PromptSettings(images=[str(tmp_path / "a.png")], image_weights=[1.0, 2.0], output_dir=str(tmp_path / "out"), steps=2)
    event = Engine(store).optimize_prompt(settings).wait()
    assert isinstance(event, Failed) and "image_weights" in event.message


def _cli(capsys, *args):
    done = cli_here(capsys, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_cli_continuous_prompt_then_generate(tmp_path, picture, store, capsys):
    picture.save(tmp_path / "p.png")
    out, log = tmp_path / "out", tmp_path / "log.jsonl"
    _cli(capsys, "optimize-prompt", "--model", "demo", "--image", str(tmp_path / "p.png"), "--prompt", "a photo",
         "--steps", "4", "--output", str(out), "--log-jsonl", str(log), "--device", "cpu", "--precision", "fp32")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert all({"loss", "elapsed_s"} <= set(line) for line in lines)
    # The similarity it reports is the one the saved prompt gets (the demo's text encoder is its CLIP's text tower).
    result = json.loads((out / "result.json").read_text())
    clip = store.clip("demo", placement=choose_placement("cpu", "fp32"))
    saved = load_file(str(out / "prompt_embeds.safetensors"))
    pooled = clip.model.text_projection(saved["prompt_embeds"][0, result["length"] + 1])
    target = image_features(clip, [picture], 1)[0]
    assert float(F.normalize(pooled, dim=-1) @ target) == pytest.approx(result["metrics"]["clip_similarity"], abs=1e-4)
    _cli(capsys, "generate", "--model", "demo", "--prompt-embeds", str(out / "prompt_embeds.safetensors"), "--steps", "2",
         "--size", "64x48", "--output", str(tmp_path / "image.png"))
    from PIL import Image

    assert Image.open(tmp_path / "image.png").size == (64, 48)


def test_cli_hard_prompt_writes_readable_text(tmp_path, picture, capsys):
    picture.save(tmp_path / "p.png")
    out = tmp_path / "out"
    done = _cli(capsys, "optimize-prompt", "--model", "demo", "--image", str(tmp_path / "p.png"), "--hard", "--steps", "5",
                "--length", "6", "--output", str(out))
    text = (out / "prompt.txt").read_text().strip()
    assert len(text.split()) == 6 and f"prompt: {text}" in done.stderr
    assert json.loads((out / "result.json").read_text())["prompt"] == text
