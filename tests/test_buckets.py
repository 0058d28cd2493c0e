"""Aspect-ratio buckets and repeats: a picture trains at its own shape, concept folders and
--repeats set how often each picture is drawn, and SDXL is told each picture's real sizes."""

import random
from collections import Counter

import numpy as np
import pytest
from conftest import make_picture

from tinv_gui.data import (
    bucket_sizes,
    bucket_step,
    find_pictures,
    load_dataset,
    picture_batches,
)
from tinv_gui.device import choose_placement
from tinv_gui.events import Reporter
from tinv_gui.families.sdxl import StableDiffusionXL
from tinv_gui.jobs import run_training
from tinv_gui.settings import SettingsError, TrainSettings


@pytest.mark.parametrize("resolution", [64, 80, 512, 768, 1024])
def test_buckets_hold_about_the_squared_resolution_on_their_grid(resolution):
    step = bucket_step(resolution)
    sizes = bucket_sizes(resolution)
    assert (resolution, resolution) in sizes and step == (64 if resolution >= 512 else 8)
    for width, height in sizes:
        assert width % step == 0 and height % step == 0
        assert width * height <= resolution**2
        assert max(width, height) <= 4 * min(width, height)
        # One side is the longest the grid allows beside the other: as near resolution² pixels as the grid goes.
        assert any(a * (b + step) > resolution**2 or b + step > 4 * a for a, b in ((width, height), (height, width)))
        assert (height, width) in sizes


def test_each_picture_fills_its_nearest_bucket_and_sdxl_is_told_its_real_sizes(tmp_path):
    make_picture(0, (300, 150)).save(tmp_path / "wide.png")  # 2:1
    make_picture(1, (150, 200)).save(tmp_path / "tall.png")  # 3:4
    make_picture(2, (120, 120)).save(tmp_path / "square.png")
    bucketed = {p.path.split("/")[-1]: p for p in load_dataset(tmp_path, 80, buckets=True)}
    assert {name: p.image.size for name, p in bucketed.items()} == {"wide.png": (112, 56), "tall.png": (72, 88), "square.png": (80, 80)}
    # 150x200 scaled by 0.48 (to 72x96) fills 72x88 with 4 pixels cut at the top and the bottom.
    assert bucketed["tall.png"].crop_top_left == (4, 0) and bucketed["wide.png"].crop_top_left == (0, 0)
    ids = StableDiffusionXL().size_conditioning(list(bucketed.values()), 80)
    rows = {name: row.tolist() for name, row in zip(bucketed, ids)}
    assert rows["wide.png"] == [150, 300, 0, 0, 56, 112] and rows["tall.png"] == [200, 150, 4, 0, 88, 72]
    square = load_dataset(tmp_path, 80, buckets=False)
    assert {p.image.size for p in square} == {(80, 80)}


def test_concept_folders_and_repeats_set_how_often_each_picture_counts(tmp_path):
    make_picture(0).save(tmp_path / "plain.png")
    for name, seed in (("10_closeups", 1), ("2_wide", 2), ("notes", 3)):
        (tmp_path / name).mkdir()
        make_picture(seed).save(tmp_path / name / f"{name}.png")
    (tmp_path / "10_closeups" / "10_closeups.txt").write_text("a close-up of {}\n")
    found = {path.name: times for path, times in find_pictures(tmp_path, repeats=3)}
    assert found == {"plain.png": 3, "10_closeups.png": 10, "2_wide.png": 2}  # "notes" is no concept folder
    loaded = {p.path.split("/")[-1]: p for p in load_dataset(tmp_path, 64, repeats=3)}
    assert loaded["10_closeups.png"].caption == "a close-up of {}" and loaded["10_closeups.png"].repeats == 10
    (tmp_path / "0_empty").mkdir()
    with pytest.raises(ValueError, match="0_empty.*1 to 1000"):
        find_pictures(tmp_path)
    with pytest.raises(SettingsError, match="repeats"):
        TrainSettings(images=str(tmp_path), token="<t>", method="textual-inversion", repeats=0).resolved()


def test_the_dataset_tab_keeps_a_zips_concept_folders_with_their_repeats(tmp_path):
    import io
    import zipfile

    from tinv_gui.ui import dataset
    from tinv_gui.ui.workspace import Workspaces

    def png(seed: int) -> bytes:
        buffer = io.BytesIO()
        make_picture(seed).save(buffer, "PNG")
        return buffer.getvalue()

    ws = Workspaces(tmp_path / "visitors").get("visitor-c")
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as zf:
        zf.writestr("set/10_closeups/a.png", png(1))
        zf.writestr("set/10_closeups/a.txt", "a close-up of {}")
        zf.writestr("set/10_closeups/b.png", png(2))
        zf.writestr("set/2024_holiday/c.png", png(3))  # not a concept: 2024 repeats are out of range
        zf.writestr("set/d.png", png(4))
    dataset.add_files(ws, [str(tmp_path / "set.zip")])

    pictures = {p.name: p for p in dataset.list_pictures(ws)}
    assert {name: p.repeats for name, p in pictures.items()} == {"c.png": 1, "d.png": 1, "10_closeups/a.png": 10, "10_closeups/b.png": 10}
    assert pictures["10_closeups/a.png"].caption == "a close-up of {}"
    assert dataset.concepts_text(list(pictures.values())) == "10_closeups: 2 picture(s), each counting 10 times"
    assert any(label.startswith("10_closeups/b.png ×10 →") for _, label in dataset.gallery_items(ws, size=32))
    # What training reads from the visitor's folder: the same pictures, with the same repeats.
    assert {p.path.split("visitor-c/pictures/")[-1]: p.repeats for p in load_dataset(ws.pictures, 64)} == {
        name: p.repeats for name, p in pictures.items()
    }
    dataset.save_captions(ws, [["10_closeups/b.png", "a close-up of {} again"], ["../../escape.png", "no"]])
    assert (ws.pictures / "10_closeups" / "b.txt").read_text() == "a close-up of {} again\n"
    dataset.clear(ws)
    assert dataset.list_pictures(ws) == [] and not any(ws.pictures.iterdir())


def test_an_epoch_draws_each_picture_its_repeats_and_a_batch_from_one_bucket():
    shapes = [(4, 8, 8), (4, 8, 8), (4, 4, 8), (4, 4, 8), (4, 4, 8)]
    repeats = [10, 1, 2, 2, 5]
    batches = picture_batches(shapes, repeats, 1, random.Random(0))
    for _ in range(3):  # every epoch, exactly
        assert Counter(next(batches)[0] for _ in range(sum(repeats))) == Counter({0: 10, 4: 5, 2: 2, 3: 2, 1: 1})
    batches = picture_batches(shapes, repeats, 4, random.Random(1))
    drawn = [next(batches) for _ in range(50)]
    assert all(len(b) == 4 and len({shapes[i] for i in b}) == 1 for b in drawn)
    counts = Counter(i for b in drawn for i in b)
    assert counts[0] > 3 * counts[1]  # ten repeats against one


@pytest.fixture(scope="module")
def bucketed_run(store, tmp_path_factory):
    """Three steps of textual inversion at 80 px, batch 1, on a 2:1 picture in a 2_ concept folder
    and a square one: the shapes of the latents the UNet saw, step by step."""
    folder = tmp_path_factory.mktemp("pictures")
    (folder / "2_wide").mkdir()
    make_picture(0, (160, 80)).save(folder / "2_wide" / "wide.png")
    make_picture(1, (96, 96)).save(folder / "square.png")
    settings = TrainSettings(
        images=str(folder), token="<bkt>", method="textual-inversion", output_dir=str(tmp_path_factory.mktemp("out")),
        steps=3, batch_size=1, grad_accum=1, resolution=80, log_with="none",
    ).resolved()
    pipe = store.pipeline("demo", choose_placement("auto", "auto"))  # the pipeline run_training uses
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    try:
        run_training(settings, store, Reporter(lambda _e: None, total_steps=settings.total_steps))
    finally:
        hook.remove()
    return seen


def test_a_two_to_one_picture_trains_at_two_to_one_and_repeats_weigh_it(bucketed_run):
    # The demo VAE halves each side: the 2:1 picture's bucket is 112x56 px, its latents 56 wide, 28 high.
    assert Counter(bucketed_run) == {(1, 4, 28, 56): 2, (1, 4, 40, 40): 1}  # one epoch: 2 draws of the 2_ folder's, 1 of the square


def test_the_crop_the_dataset_tab_shows_is_the_crop_trained(tmp_path):
    from PIL import Image

    from tinv_gui.ui import dataset
    from tinv_gui.ui.workspace import Workspaces

    ws = Workspaces(tmp_path / "visitors").get("visitor")
    make_picture(3, (240, 80)).save(tmp_path / "banner.png")  # 3:1: its nearest bucket at 80 px is 128x48 (8:3), narrower
    dataset.add_files(ws, [str(tmp_path / "banner.png")])
    ((preview, label),) = dataset.gallery_items(ws, size=240, buckets=True, resolution=80)
    (trained,) = load_dataset(ws.pictures, 80, buckets=True)
    assert label.startswith("banner.png → 128x48 ") and trained.image.size == (128, 48)

    def framed(picture):
        """(left, right, top, bottom) of the frame drawn in a preview: where training's crop lies."""
        frame = np.all(np.asarray(picture) == dataset.FRAME, axis=2)
        down, across = frame.sum(axis=0), frame.sum(axis=1)  # the frame's sides are its longest runs
        columns, rows = np.flatnonzero(down >= 0.9 * down.max()), np.flatnonzero(across >= 0.9 * across.max())
        return columns[0], columns[-1] + 1, rows[0], rows[-1] + 1

    shown = np.asarray(preview).astype(int)
    left, right, top, bottom = framed(preview)
    assert (left, right, top, bottom) == (13, 227, 0, 80)  # 240x80 scaled by 0.6 is 144x48: 8 px of it cut each side
    original = Image.open(ws.pictures / "banner.png").convert("RGB")
    inside, outside = shown[2:-2, left + 2 : right - 2], shown[:, : left - 1]
    assert np.abs(inside - np.asarray(original)[2:-2, left + 2 : right - 2]).max() <= 1  # kept: as it is
    assert np.abs(outside - np.asarray(original)[:, : left - 1]).mean() > 20  # cut: faded
    cropped = np.asarray(original.resize((128, 48), Image.Resampling.BICUBIC, box=(left, top, right, bottom)), dtype=float)
    assert np.abs(cropped - np.asarray(trained.image, dtype=float)).mean() < 3
    ((square, square_label),) = dataset.gallery_items(ws, size=240, buckets=False, resolution=80)
    assert square_label.startswith("banner.png → 80x80 ") and framed(square) == (80, 160, 0, 80)
