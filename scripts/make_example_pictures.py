"""Draw the example pictures under assets/examples: a small toy robot on different backgrounds,
at different sizes and angles, as a person would photograph a toy. Run once; the PNGs are committed."""

from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

OUT = Path(__file__).resolve().parent.parent / "assets" / "examples"
SCENES = [  # background top, background bottom, robot centre x, y, scale, tilt (degrees)
    ((222, 236, 250), (160, 190, 215), 256, 280, 1.0, 0),
    ((250, 232, 205), (205, 160, 120), 220, 300, 0.8, -10),
    ((214, 240, 214), (120, 170, 110), 300, 260, 1.15, 8),
    ((238, 230, 245), (150, 140, 170), 250, 300, 0.9, 15),
]


def robot(scale: float) -> Image.Image:
    """The toy: a red box body, a head with round eyes and an antenna, arms and feet."""
    size = int(320 * scale)
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    s = lambda *xy: [int(v * scale) for v in xy]  # noqa: E731
    d.rounded_rectangle(s(95, 140, 225, 250), radius=int(14 * scale), fill=(200, 40, 45), outline=(90, 20, 25), width=int(4 * scale))
    d.rounded_rectangle(s(110, 60, 210, 140), radius=int(12 * scale), fill=(215, 215, 220), outline=(80, 80, 90), width=int(4 * scale))
    for x in (135, 185):
        d.ellipse(s(x - 13, 85, x + 13, 111), fill=(30, 30, 40))
        d.ellipse(s(x - 5, 90, x + 3, 98), fill=(255, 255, 255))
    d.line(s(160, 60, 160, 32), fill=(80, 80, 90), width=int(5 * scale))
    d.ellipse(s(150, 20, 170, 40), fill=(250, 200, 40))
    d.rectangle(s(120, 160, 200, 200), fill=(240, 200, 60))
    for x0, x1 in ((60, 95), (225, 260)):
        d.rounded_rectangle(s(x0, 150, x1, 230), radius=int(10 * scale), fill=(215, 215, 220), outline=(80, 80, 90), width=int(3 * scale))
    for x0 in (105, 175):
        d.rounded_rectangle(s(x0, 250, x0 + 40, 285), radius=int(8 * scale), fill=(60, 60, 70))
    return layer


def scene(top, bottom, cx, cy, scale, tilt) -> Image.Image:
    image = Image.new("RGB", (512, 512))
    d = ImageDraw.Draw(image)
    for y in range(512):
        t = y / 511
        d.line([(0, y), (511, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    toy = robot(scale).rotate(tilt, resample=Image.Resampling.BICUBIC, expand=True)
    shadow = Image.new("RGBA", toy.size, (0, 0, 0, 0))
    shadow.putalpha(toy.getchannel("A").point(lambda a: a // 3))
    shadow = shadow.filter(ImageFilter.GaussianBlur(8))
    x, y = cx - toy.width // 2, cy - toy.height // 2
    image.paste(shadow, (x + 12, y + 14), shadow)
    image.paste(toy, (x, y), toy)
    return image


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for i, args in enumerate(SCENES, 1):
        scene(*args).save(OUT / f"toy-robot-{i}.png", optimize=True)
    print(f"wrote {len(SCENES)} pictures to {OUT}")
