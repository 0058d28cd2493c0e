"""The app's parts without a server: visitors' folders, uploads, the loss curve, the form, the presets."""

import dataclasses
import io
import os
import time
import zipfile

import numpy as np
import pytest
import torch
from conftest import make_picture
from PIL import Image

from tinv_gui.events import Failed, Finished, Log, Progress, Started
from tinv_gui.generate import generate
from tinv_gui.settings import TrainSettings
from tinv_gui.ui import dataset
from tinv_gui.ui.app import hub_status
from tinv_gui.ui.options import option_fields, settings_from_form
from tinv_gui.ui.progress import RunView, loss_colours, loss_frame
from tinv_gui.ui.workspace import Workspaces, sanitize_filename


@pytest.mark.parametrize(
    "name, expected",
    [
        ("photo.JPG", "photo.jpg"),
        ("cat.SafeTensors", "cat.safetensors"),
        ("../../etc/passwd", "passwd"),
        ("..\\..\\boot.ini", "boot.ini"),
        (".hidden.png", "hidden.png"),
        ("my cat (1).png", "my_cat_1.png"),
        ("..", "file"),
        ("ünïcode名前.webp", "n_code.webp"),
    ],
)
def test_uploaded_names_are_sanitized(name, expected):
    assert sanitize_filename(name) == expected


def test_workspace_refuses_paths_outside_it(tmp_path):
    spaces = Workspaces(tmp_path)
    a, b = spaces.get("visitor-a"), spaces.get("visitor-b")
    (b.pictures / "secret.png").write_bytes(b"x")
    (a.root / "link.png").symlink_to(b.pictures / "secret.png")
    assert a.contains(a.pictures / "mine.png")
    for path in (b.pictures / "secret.png", a.root / ".." / "visitor-b" / "pictures" / "secret.png", a.root / "link.png", "/etc/passwd"):
        assert not a.contains(path)
        with pytest.raises(PermissionError):
            a.inside(path)
    for bad in (None, "", "../x", "a/b", "x" * 100):
        with pytest.raises(PermissionError):
            spaces.get(bad)


def test_old_workspaces_expire_but_busy_and_recent_ones_stay(tmp_path):
    spaces = Workspaces(tmp_path, max_age_s=3600, in_use=lambda key: key == "busy-visitor")
    old, busy, recent = (spaces.get(k) for k in ("old-visitor", "busy-visitor", "recent-visitor"))
    long_ago = time.time() - 7200
    for ws in (old, busy):
        os.utime(ws.root / ".last_used", (long_ago, long_ago))
    assert spaces.expire(now=time.time()) == ["old-visitor"]
    assert not old.root.exists() and busy.root.exists() and recent.root.exists()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_uploads_are_checked_and_problems_named_per_picture(tmp_path):
    ws = Workspaces(tmp_path / "visitors").get("visitor-a")
    up = tmp_path / "uploads"
    up.mkdir()
    make_picture(0, (300, 260)).save(up / "cat one.png")
    make_picture(0, (300, 260)).resize((600, 520)).save(up / "cat-again.png")  # the same picture, larger
    make_picture(1, (40, 40)).save(up / "tiny.png")
    (up / "notes.png").write_text("not a picture")
    with zipfile.ZipFile(up / "more.zip", "w") as zf:
        zf.writestr("folder/dog.png", _png(make_picture(2, (200, 180))))
        zf.writestr("folder/dog.txt", "a dog on a sofa")
        zf.writestr("../../escape.png", _png(make_picture(3, (200, 180))))
        zf.writestr("readme.md", "ignored")
    (up / "broken.zip").write_bytes(b"PK not really")

    added = dataset.add_files(ws, [str(p) for p in sorted(up.iterdir())])

    problems = {p.name: p.problem for p in added if p.problem}
    assert set(problems) == {"cat-again.png", "tiny.png", "notes.png", "broken.zip"}
    assert problems["cat-again.png"] == "duplicate of cat_one.png"
    assert "too small" in problems["tiny.png"] and "not a picture" in problems["notes.png"]
    assert "zip" in problems["broken.zip"]
    usable = sorted(p.name for p in dataset.list_pictures(ws) if not p.problem)
    assert usable == ["cat_one.png", "dog.png", "escape.png"]
    assert all(p.parent == ws.pictures for p in dataset.picture_paths(ws))
    assert not any((tmp_path / "visitors").glob("**/escape.png.*")) and not (tmp_path / "escape.png").exists()
    # Captions: from the zip's sidecar, edited in the table, read back by training's loader.
    assert dict(map(tuple, dataset.caption_rows(ws)))["dog.png"] == "a dog on a sofa"
    dataset.save_captions(ws, [["cat_one.png", "my cat asleep"], ["dog.png", ""], ["../../x.png", "nope"]])
    assert (ws.pictures / "cat_one.txt").read_text().strip() == "my cat asleep" and not (ws.pictures / "dog.txt").exists()
    labels = [label for _, label in dataset.gallery_items(ws)]
    assert any(label.startswith("✗ tiny.png: too small") for label in labels)
    assert any("⚠ small" in label for label in labels if label.startswith("dog.png"))
    dataset.clear(ws)
    assert dataset.list_pictures(ws) == []


def test_a_visitor_keeps_at_most_the_picture_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "MAX_PICTURES", 2)
    ws = Workspaces(tmp_path / "visitors").get("visitor-b")
    up = tmp_path / "uploads"
    up.mkdir()
    for i in range(3):
        make_picture(10 + i, (200, 180)).save(up / f"p{i}.png")
    added = dataset.add_files(ws, [str(p) for p in sorted(up.iterdir())])
    assert [p.problem for p in added][:2] == [None, None]
    assert "at most 2 pictures" in added[2].problem
    assert len([p for p in dataset.list_pictures(ws) if not p.problem]) == 2


def _progress(step, loss, phase, total=4):
    return Progress(step, total, loss, 0.1, step * 0.5, (total - step) * 0.5, phase)


def test_loss_curve_has_raw_and_smoothed_for_each_phase():
    events = [_progress(1, 1.0, "quick"), _progress(2, 0.5, "quick"), _progress(3, 0.02, "ti"), _progress(4, 0.04, "ti")]
    frame = loss_frame(events, smoothing=0.5)
    assert set(frame.curve) == {"quick (raw)", "quick (smoothed)", "ti (raw)", "ti (smoothed)"}
    smoothed = frame[frame.curve.str.endswith("(smoothed)")].set_index("step").loss
    assert smoothed[1] == pytest.approx(1.0)  # corrected for its start: not pulled towards zero
    assert smoothed[2] == pytest.approx((0.5 * 0.5 * 1.0 + 0.5 * 0.5) / 0.75)
    assert smoothed[3] == pytest.approx(0.02)  # restarts with the new phase
    colours = loss_colours(events)
    assert list(colours) == ["quick (raw)", "quick (smoothed)", "ti (raw)", "ti (smoothed)"] and len(set(colours.values())) == 4
    long_run = loss_frame([_progress(i, 1.0 / i, "quick", total=5000) for i in range(1, 5001)])
    assert len(long_run) <= 2 * 501 and long_run.step.iloc[-1] == 5000  # thinned, keeping the last step
    # What the Train tab draws for a run of 600 steps: each curve thinned for the browser, from
    # the first step to the last.
    view = RunView.from_events([Started("job-1", "quick training", 600)] + [_progress(i, 1.0 / i, "quick", total=600) for i in range(1, 601)])
    frame = view.loss_frame()
    for curve in ("quick (raw)", "quick (smoothed)"):
        steps = list(frame[frame.curve == curve].step)
        assert 150 <= len(steps) < 600 and steps[0] == 1 and steps[-1] == 600, curve


def test_run_view_tells_where_a_run_is():
    started = [Started("job-1", "quick training", 4), Log("Loading the CLIP model")]
    assert RunView.from_events([], queue_position=2).summary().startswith("Waiting")
    assert RunView.from_events(started).summary() == "Loading the CLIP model"
    running = RunView.from_events(started + [_progress(1, 0.9, "quick")])
    assert running.status == "running" and "step 1 / 4" in running.summary() and "left" in running.summary()
    done = RunView.from_events(started + [_progress(4, 0.5, "quick"), Finished({"embedding": "x"}, metrics={"clip_image_similarity": 0.7})])
    assert done.done and done.summary().startswith("Done") and done.metrics == {"clip_image_similarity": 0.7}
    failed = RunView.from_events(started + [Failed("lower the learning rate", {"embedding": "x"})])
    assert failed.status == "failed" and "lower the learning rate" in failed.summary() and failed.outputs
    assert "width:100.0%" in RunView.from_events(started + [_progress(4, 0.5, "quick"), Finished({})]).progress_html()


def test_form_leaves_method_defaults_to_the_method():
    values = {"steps": 100.0, "lr": 0.05, "batch_size": 32, "warmup_steps": 0.0, "clip_model": "", "style": "style"}
    assert settings_from_form("quick", values) == {"lr": 0.05, "warmup_steps": 0, "style": "style"}
    with pytest.raises(ValueError, match="steps"):
        settings_from_form("quick", {"steps": 10.5})


def test_every_training_option_is_offered():
    offered = {name for name, _, _ in option_fields()}
    # What the Method tab asks for itself, or the run decides (its folder and step log), is not an option.
    assert offered == {f.name for f in dataclasses.fields(TrainSettings)} - {"images", "token", "output_dir", "method", "model", "init", "log_jsonl", "extra"}


def test_the_presets_are_the_registered_methods_in_order():
    from tinv_gui.methods import METHODS, method_with_label

    assert [m.preset.label for m in METHODS.values()] == ["Quick", "Balanced", "Thorough", "From one picture"]
    assert method_with_label("Balanced").name == "quick-then-ti" and method_with_label("Balanced").loads == {"clip", "pipeline"}
    with pytest.raises(ValueError, match="Quick"):
        method_with_label("Fastest")


def test_hub_status_says_plainly_when_offline():
    ok, reason = hub_status("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert not ok and "HF_HUB_OFFLINE" in reason


def test_playground_generation_uses_the_embedding_and_removes_it_after(store, tmp_path):
    from tinv_gui.embeddings import save_embedding

    pipe = store.pipeline("demo")
    vocabulary = len(pipe.tokenizer)
    thing = save_embedding(tmp_path / "thing.safetensors", "<thing>", torch.randn(2, pipe.text_encoder.config.hidden_size) * 0.5)
    kwargs = dict(prompt="a photo of <thing>", steps=2, seed=7, count=2, size=(32, 32))
    plain = generate(pipe, **kwargs)
    learned = generate(pipe, embeddings=[thing], sampler="Euler", **kwargs)
    again = generate(pipe, embeddings=[thing], sampler="Euler", **kwargs)
    weaker = generate(pipe, embeddings=[thing], sampler="Euler", strength=0.5, **kwargs)
    pixels = lambda images: torch.from_numpy(np.stack([np.asarray(im) for im in images]))  # noqa: E731
    assert len(plain) == len(learned) == 2 and not torch.equal(pixels(learned[:1]), pixels(learned[1:]))
    assert not torch.equal(pixels(plain), pixels(learned))  # the embedding changes the picture
    assert torch.equal(pixels(learned), pixels(again))  # the same seed gives the same picture
    assert not torch.equal(pixels(learned), pixels(weaker))  # strength scales the vectors
    assert list(tmp_path.iterdir()) == [thing]  # nothing is written beside it
    assert len(pipe.tokenizer) == vocabulary and type(pipe.scheduler).__name__ == "PNDMScheduler"
    wide = save_embedding(tmp_path / "wide.safetensors", "<wide>", torch.randn(1, 768))
    with pytest.raises(ValueError, match="width 768"):
        generate(pipe, embeddings=[wide], **kwargs)
    assert len(pipe.tokenizer) == vocabulary


def test_a_shared_server_refuses_visitors_paths_on_it(tmp_path, monkeypatch, picture_dir):
    import gradio as gr

    from tinv_gui.ui.app import TinvApp

    monkeypatch.setenv("TINV_GUI_SHARED", "1")
    app = TinvApp(workspaces=Workspaces(tmp_path), hub=(False, "offline"))
    ws = app.workspaces.get("visitor-a")
    dataset.add_files(ws, [str(p) for p in picture_dir.iterdir()])
    for model in ("/etc", str(picture_dir), "../../secret.ckpt"):
        with pytest.raises(gr.Error, match="Hugging Face Hub"):
            app._submit_training(ws, model, "<x>", "", "Quick", [], {})


def test_a_training_exports_for_other_tools_once_and_drawing_writes_nothing(store, picture_dir, tmp_path):
    from pathlib import Path

    from tinv_gui.engine import Engine
    from tinv_gui.formats import read_embedding
    from tinv_gui.jobs import EXPORTS
    from tinv_gui.ui.app import TinvApp

    app = TinvApp(engine=Engine(store), workspaces=Workspaces(tmp_path), hub=(False, "offline"))
    app.build()
    ws = app.workspaces.get("visitor-a")
    dataset.add_files(ws, [str(p) for p in picture_dir.iterdir()])
    job = app._submit_training(ws, "demo", "<x>", "toy", "Quick", [], {"steps": 2, "batch_size": 4})
    final = job.wait()
    assert final.kind == "finished", final
    run = read_embedding(final.outputs["embedding"])
    assert all(torch.equal(read_embedding(final.outputs[fmt]).vectors, run.vectors) for fmt in EXPORTS)
    files = lambda: {p: p.stat().st_mtime_ns for p in ws.root.rglob("*") if p.is_file()}  # noqa: E731
    written = files()
    for _ in range(2):  # a page load or a poll draws the run again
        shown = app._train_outputs(ws, RunView.from_events(list(job.history)))
    assert files() == written
    names = [Path(p).name for p in shown[app.components["downloads"]]]
    assert names == ["learned_embeds.safetensors", "learned_embeds.bin", "x.pt", "x.safetensors", "x.png", "x-onetrainer.safetensors"]
