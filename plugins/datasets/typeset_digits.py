"""Typeset digits: the ten digits rendered from the fonts matplotlib ships, made like scikit-learn's digits.

A public dataset for the server that comes from another *source* than the clients' handwritten
digits, not a transformation of them: printed glyphs (DejaVu Sans/Serif/Mono, STIX, Computer Modern,
in regular, bold, italic) with random slant, rotation, stroke weight and placement. Each image is made
the way the UCI handwritten digits were: a 32x32 binary bitmap, size-normalised and centred, cut into
4x4 blocks whose counts of ink pixels (0..16) are the 8x8 grey values. The gap to the clients'
domain is that of a model pre-trained on printed text meeting handwriting: same classes and
geometry, other shapes (serifs, uniform strokes, closed 4s, barred 7s are rare in handwriting).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fedmmkt_plugins.datasets.digits import DIGIT_NAMES
from pydantic import Field

from fedmmkt_core.data import DataSplits, ImageSet, TaskSpec
from fedmmkt_core.errors import MissingDependencyError
from fedmmkt_core.interfaces import Dataset
from fedmmkt_core.splits import SplitConfig, protocol_splits

FONT_FILES = {
    "sans": ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf"],
    "serif": ["DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "STIXGeneral.ttf",
              "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "cmr10.ttf", "cmb10.ttf", "cmti10.ttf"],
    "mono": ["DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "cmtt10.ttf"],
}  # fmt: skip


class TypesetDigitsConfig(SplitConfig):
    per_class: int = Field(120, ge=1, le=10_000, description="images rendered per digit")
    max_rotation: float = Field(8.0, ge=0, le=45, description="largest random rotation, degrees")
    caption_template: str = Field("a photo of the digit {name}", description="caption from the class name")
    caption_style: bool = Field(True, description="append the typeface family to each caption ('... in serif type')")


def font_folder() -> Path:
    try:
        import matplotlib
    except ImportError:
        hint = 'typeset-digits renders the fonts matplotlib ships: pip install "fedmmkt[plots]"'
        raise MissingDependencyError("matplotlib", hint) from None
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


class TypesetDigitsDataset(Dataset):
    """Digits typeset in 20 fonts, 8x8 like scikit-learn's digits; for the server's public data."""

    Config = TypesetDigitsConfig
    config: TypesetDigitsConfig

    def class_names(self) -> tuple[str, ...]:
        return DIGIT_NAMES

    def load(self, seed: int) -> DataSplits:
        try:
            from PIL import Image, ImageDraw, ImageFilter, ImageFont
        except ImportError:
            raise MissingDependencyError("PIL", 'Install it with: pip install "fedmmkt[hf]"') from None
        cfg = self.config
        folder = font_folder()
        fonts = [(family, name) for family, names in FONT_FILES.items() for name in names if (folder / name).is_file()]
        if not fonts:
            raise MissingDependencyError("matplotlib fonts", f"no font of {sorted(FONT_FILES)} found in {folder}")
        rng = np.random.default_rng(seed)
        images, labels, captions = [], [], []
        for digit, name in enumerate(DIGIT_NAMES):
            for _ in range(cfg.per_class):
                family, file = fonts[int(rng.integers(len(fonts)))]
                font = ImageFont.truetype(str(folder / file), 96)
                canvas = Image.new("L", (160, 160), 0)
                ImageDraw.Draw(canvas).text((30, 10), str(digit), fill=255, font=font)
                shear = float(rng.uniform(-0.25, 0.25))
                canvas = canvas.transform(canvas.size, Image.Transform.AFFINE, (1, shear, -shear * 80, 0, 1, 0))
                canvas = canvas.rotate(float(rng.uniform(-cfg.max_rotation, cfg.max_rotation)), fillcolor=0)
                weight = int(rng.integers(0, 3))  # thicker strokes, as a pen or a blurred scan would give
                if weight:
                    canvas = canvas.filter(ImageFilter.MaxFilter(2 * weight + 1))
                images.append(_to_uci_8x8(canvas, rng))
                labels.append(digit)
                caption = cfg.caption_template.format(name=name)
                captions.append(f"{caption} in {family} type" if cfg.caption_style else caption)
        full = ImageSet(np.stack(images)[..., None], np.array(labels), captions)
        task = TaskSpec(class_names=DIGIT_NAMES, image_size=8, channels=1)
        return protocol_splits(full, task, cfg, seed)


def _to_uci_8x8(glyph, rng: np.random.Generator) -> np.ndarray:
    """Crop to the ink, fit in a 32x32 box (aspect kept, a little random margin), binarise, and count
    ink pixels in 4x4 blocks: values 0..16, scaled to 0..255 like the digits plugin's images."""
    from PIL import Image

    box = glyph.getbbox()
    if box is None:
        return np.zeros((8, 8), np.uint8)
    ink = glyph.crop(box)
    side = int(rng.integers(26, 33))
    scale = side / max(ink.size)
    size = (max(1, round(ink.size[0] * scale)), max(1, round(ink.size[1] * scale)))
    ink = ink.resize(size, Image.Resampling.BILINEAR)
    bitmap = Image.new("L", (32, 32), 0)
    bitmap.paste(ink, ((32 - size[0]) // 2, (32 - size[1]) // 2))
    binary = np.asarray(bitmap) >= 128
    counts = binary.reshape(8, 4, 8, 4).sum(axis=(1, 3))
    return np.round(counts * (255.0 / 16.0)).astype(np.uint8)
