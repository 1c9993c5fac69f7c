"""The simulator's demo pictures decode in a real imaging library and show the prompt's words."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from replicate_generation.devtools.simulator import pictures

WHITE = (255, 255, 255)


def decoded(ext: str, prompt: str, ratio: str) -> Image.Image:
    data = pictures.picture(ext, prompt, ratio)
    assert data is not None
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def text_cells(prompt: str, width: int, height: int, cell: int) -> set[tuple[int, int]]:
    grid = pictures.cells(prompt, -(-width // cell), -(-height // cell))
    return {(x, y) for y, row in enumerate(grid) for x, colour in enumerate(row) if colour == WHITE}


@pytest.mark.parametrize("ratio", ["16:9", "1:1", "9:16"])
@pytest.mark.parametrize("prompt", ["a red fox", "a blue whale at night", "zebra 42"])
def test_webp_pictures_draw_the_prompts_words_pixel_for_pixel(prompt: str, ratio: str) -> None:
    image = decoded("webp", prompt, ratio)
    assert image.size == pictures.size_for(ratio)
    background, pixels = bytes(pictures.colour_of(prompt)), image.tobytes()
    inked = {divmod(i // 3, image.width)[::-1] for i in range(0, len(pixels), 3)
             if pixels[i:i + 3] != background}
    words = text_cells(prompt, *image.size, cell=2)
    expected = {(x, y) for y in range(image.height) for x in range(image.width)
                if (x // 2, y // 2) in words}
    assert inked == expected and len(expected) > 100  # the words, and nothing but the words


@pytest.mark.parametrize("ext", ["png", "jpg", "webp"])
def test_every_format_shows_words_that_differ_by_prompt(ext: str) -> None:
    fox, whale = decoded(ext, "a red fox", "16:9"), decoded(ext, "a whale", "16:9")
    assert fox.size == whale.size == (256, 144)
    middle = fox.height // 2  # the words sit on the middle rows
    assert fox.crop((0, middle - 8, 256, middle + 8)).tobytes() != \
        whale.crop((0, middle - 8, 256, middle + 8)).tobytes()
    assert len(set(fox.tobytes()[i:i + 3] for i in range(0, len(fox.tobytes()), 3))) >= 2
