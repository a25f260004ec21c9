"""Pictures for the command line and the demo: pipeline outputs as PIL frames, captioned comparison rows, masks."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

CAPTION_HEIGHT = 18


def frames_of(output) -> list[Image.Image]:
    """PIL images of a pipeline output (the first video's frames for video pipelines)."""
    images = getattr(output, "images", None)
    if images is None:
        video = output.frames[0]
        return [Image.fromarray((np.clip(np.asarray(f), 0, 1) * 255).round().astype("uint8")) for f in video]
    return list(images)


def difference(left: Image.Image, right: Image.Image) -> tuple[Image.Image, str]:
    """|left - right| (mean over RGB), amplified to full range, and its caption."""
    a = np.asarray(left.convert("RGB"), dtype=np.float32)
    b = np.asarray(right.convert("RGB"), dtype=np.float32)
    diff = np.abs(a - b).mean(-1)
    gain = 255.0 / max(float(diff.max()), 1e-6)
    image = Image.fromarray((diff * gain).clip(0, 255).astype("uint8")).convert("RGB")
    return image, (f"|difference| x{gain:.0f}" if diff.max() > 0 else "identical")


def captioned_row(panels, labels, min_size: int = 256) -> Image.Image:
    """Panels side by side with a caption above each; small images are enlarged (nearest)."""
    panels = [p.convert("RGB") for p in panels]
    factor = max(1, -(-min_size // max(panels[0].size)))
    w, h = panels[0].width * factor, panels[0].height * factor
    canvas = Image.new("RGB", (len(panels) * w, h + CAPTION_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (panel, text) in enumerate(zip(panels, labels)):
        canvas.paste(panel.resize((w, h), Image.NEAREST), (i * w, CAPTION_HEIGHT))
        draw.text((i * w + 4, 3), text, fill="black")
    return canvas


def side_by_side(left, right, labels=("off", "on"), min_size: int = 256) -> Image.Image:
    """[left | right | amplified |difference|] with captions."""
    diff, diff_label = difference(left, right)
    return captioned_row([left, right, diff], [*labels, diff_label], min_size)


def centred_mask(width: int, height: int) -> Image.Image:
    """A white (= remove) centred rectangle of half the width and half the height (1/4 of the area)."""
    mask = Image.new("L", (width, height), 0)
    x0, y0 = width // 4, height // 4
    ImageDraw.Draw(mask).rectangle((x0, y0, x0 + width // 2 - 1, y0 + height // 2 - 1), fill=255)
    return mask


def mask_overlay(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The image with the object mask tinted red."""
    image = image.convert("RGB")
    red = Image.new("RGB", image.size, (255, 0, 0))
    alpha = mask.convert("L").resize(image.size, Image.NEAREST).point(lambda v: 110 if v >= 128 else 0)
    return Image.composite(red, image, alpha)
