"""Picture loading: every odd mode becomes RGB, orientation is fixed, bad files are named."""

import io

import numpy as np
import pytest
from PIL import Image

from tinv_gui.data import ImageError, load_dataset, open_image, training_prompts


def test_rgba_is_composited_over_white(tmp_path):
    image = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red
    image.paste((0, 0, 255, 255), (0, 0, 32, 64))  # opaque blue left half
    image.save(tmp_path / "a.png")
    rgb = open_image(tmp_path / "a.png")
    assert rgb.mode == "RGB"
    assert rgb.getpixel((48, 10)) == (255, 255, 255)
    assert rgb.getpixel((10, 10)) == (0, 0, 255)


@pytest.mark.parametrize("mode", ["P", "L", "LA", "1", "CMYK", "I;16", "I", "F"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    base = Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8))
    if mode == "I;16":
        image = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    else:
        image = base.convert(mode)
    path = tmp_path / ("x.tiff" if mode in ("I;16", "I", "F", "CMYK") else "x.png")
    image.save(path)
    rgb = open_image(path)
    assert rgb.mode == "RGB" and rgb.size == (64, 64)
    assert np.asarray(rgb).std() > 0  # not flattened to one colour


def test_sixteen_bit_keeps_its_range(tmp_path):
    image = Image.fromarray(np.full((64, 64), 65535, dtype=np.uint16))
    image.save(tmp_path / "white16.png")
    assert open_image(tmp_path / "white16.png").getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (80, 40), (255, 0, 0))
    image.paste((0, 255, 0), (0, 0, 10, 40))  # a green stripe on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    shown = open_image(tmp_path / "rot.jpg")
    assert shown.size == (40, 80)
    r, g, b = shown.getpixel((20, 3))  # the left stripe is now at the top
    assert g > 200 and r < 60


def test_dataset_is_square_at_working_size_with_captions(picture_dir):
    (picture_dir / "picture1.txt").write_text("a red ball on grass\n")
    images = load_dataset(picture_dir, size=48)
    assert [i.image.size for i in images] == [(48, 48)] * 4
    assert images[1].caption == "a red ball on grass"
    assert images[0].caption is None


def test_unreadable_and_small_pictures_are_named(tmp_path):
    (tmp_path / "notes.png").write_bytes(b"this is not a picture")
    with pytest.raises(ImageError, match="notes.png"):
        open_image(tmp_path / "notes.png")
    Image.new("RGB", (20, 30)).save(tmp_path / "tiny.png")
    with pytest.raises(ImageError, match=r"tiny.png.*at least 32"):
        open_image(tmp_path / "tiny.png", min_side=32)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buffer, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[:200])
    with pytest.raises(ImageError, match="cut.jpg"):
        open_image(tmp_path / "cut.jpg")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    Image.new("1", (9000, 9000)).save(tmp_path / "bomb.png")  # tiny file, 81 megapixels
    assert (tmp_path / "bomb.png").stat().st_size < 200_000
    with pytest.raises(ImageError, match="bomb.png.*megapixels"):
        open_image(tmp_path / "bomb.png")


def test_templates_and_captions_hold_the_token(picture_dir):
    images = load_dataset(picture_dir, size=32)
    prompts = training_prompts(images, "<t>", "style")
    assert all("<t>" in p for p in prompts) and "painting" in prompts[0]
    for image in images:
        image.caption = "a dog"
    assert training_prompts(images, "<t>", "object", use_captions=True)[0] == "a photo of <t>, a dog"
