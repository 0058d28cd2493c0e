"""Evaluation: CLIP image and text similarity of generated pictures, with the initializer as baseline."""

import json
import math

import pytest
import torch
from conftest import cli_here
from PIL import Image

from tinv_gui.clip_space import image_features
from tinv_gui.data import load_dataset
from tinv_gui.device import choose_placement
from tinv_gui.embeddings import save_embedding
from tinv_gui.engine import Engine
from tinv_gui.evaluate import EvalSettings, clip_similarities, without_token
from tinv_gui.events import Failed, Finished

FIGURES = ("clip_image_similarity", "clip_text_similarity", "baseline_clip_image_similarity", "baseline_clip_text_similarity")


def test_prompt_without_token_follows_the_paper():
    assert without_token("a photo of <cat> on the beach", "<cat>") == "a photo of on the beach"
    assert without_token("<cat> and <cat>", "<cat>", "dog") == "dog and dog"


def test_similarities_measure_the_right_thing(store, picture_dir):
    clip = store.clip("demo")
    pictures = [p.image for p in load_dataset(picture_dir, size=clip.image_size)]
    reference = image_features(clip, pictures[:1], crops=1)
    same, _ = clip_similarities(clip, pictures[:1], reference, "a photo")
    assert math.isclose(same, 1.0, abs_tol=1e-5)  # a picture against itself
    others, text = clip_similarities(clip, pictures[1:], reference, "a photo")
    _, other_text = clip_similarities(clip, pictures[1:], reference, "a red car parked in the snow")
    assert others < same and text != other_text  # the text figure depends on the text


def test_evaluation_job_reports_figures_and_leaves_the_cached_pipeline_clean(tmp_path, store, picture_dir):
    placement = choose_placement("cpu", "fp32")  # the pipeline the job will use
    pipe = store.pipeline("demo", placement)
    table_before = pipe.text_encoder.get_input_embeddings().weight.clone()
    embedding = save_embedding(tmp_path / "e.safetensors", "<my-cat>", torch.randn(2, 64) * 0.02, {"init": "cat"})
    saved = tmp_path / "drawn"
    settings = EvalSettings(model="demo", embedding=str(embedding), images=str(picture_dir), prompt="a photo of <my-cat>", n=1, steps=2,
                            device="cpu", precision="fp32", save_images=str(saved))
    engine = Engine(store)
    event = engine.evaluate(settings).wait()
    assert isinstance(event, Finished), getattr(event, "message", event)
    assert set(event.metrics) == {*FIGURES, "guidance"}
    assert event.metrics["guidance"] == 7.5  # none asked: SD 1.x pipelines' own default, the value the pictures were drawn at
    # The figures are those of the pictures it drew: scored again from the saved files, against the
    # training pictures and the prompt without its token.
    clip = store.clip("demo", placement=placement)
    reference = image_features(clip, [p.image for p in load_dataset(picture_dir, size=clip.image_size)], crops=1)
    for kind, prefix in (("token", ""), ("baseline", "baseline_")):
        drawn = [Image.open(path).convert("RGB") for path in sorted(saved.glob(f"{kind}-*.png"))]
        image_similarity, text_similarity = clip_similarities(clip, drawn, reference, "a photo of")
        assert event.metrics[f"{prefix}clip_image_similarity"] == pytest.approx(image_similarity, abs=1e-5)
        assert event.metrics[f"{prefix}clip_text_similarity"] == pytest.approx(text_similarity, abs=1e-5)
    assert store.pipeline("demo", placement) is pipe  # reused, and as it was
    assert len(pipe.tokenizer) == 49408
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table, table_before) and not table.requires_grad

    wrong = save_embedding(tmp_path / "sd1.safetensors", "<x>", torch.randn(1, 768))
    failed = engine.evaluate(EvalSettings(embedding=str(wrong), images=str(picture_dir), prompt="<x>", n=1, steps=2, device="cpu")).wait()
    assert isinstance(failed, Failed) and "text width 768 (SD 1.x); the chosen model has 64" in failed.message
    missing = engine.evaluate(EvalSettings(embedding=str(embedding), images=str(picture_dir), prompt="a photo", n=1, steps=2, device="cpu")).wait()
    assert isinstance(missing, Failed) and "'<my-cat>'" in missing.message


def test_evaluate_command_writes_both_figures(tmp_path, picture_dir, capsys):
    embedding = save_embedding(tmp_path / "e.safetensors", "<my-cat>", torch.randn(1, 64) * 0.02, {"init": "cat"})
    out = tmp_path / "eval.json"
    done = cli_here(
        capsys, "evaluate", "--model", "demo", "--embedding", str(embedding), "--images", str(picture_dir),
        "--prompt", "a photo of <my-cat> on a beach", "--n", "1", "--steps", "2", "--seed", "3", "--device", "cpu", "--json", str(out),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    printed = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    for key in FIGURES:  # the terminal shows the figures the JSON holds
        assert float(printed[key]) == pytest.approx(result[key], abs=1e-4), key
    assert result["baseline_word"] == "cat" and result["text_prompt"] == "a photo of on a beach"
    assert (result["n"], result["seed"]) == (1, 3)
    assert "clip_image_similarity:" in done.stdout
