"""Any valid image is read as the RGB picture it shows; broken input is refused with one clear
reason (an ImageError naming the file), never another exception."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from captioner.cli import main
from captioner.images import ImageError, load_image


def _rgb(path):
    return np.asarray(load_image(path), dtype=np.int64)


def _png_header_only(path, width, height):
    """A PNG whose header declares width x height but that holds no pixel data at all."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize(
    "mode,value,fmt,want",
    [
        ("L", 100, "png", (100, 100, 100)),
        ("I;16", 32896, "png", (128, 128, 128)),  # 16-bit grey: scaled, not clipped to white
        ("I", 65535, "tiff", (255, 255, 255)),
        ("I", 8224, "tiff", (32, 32, 32)),  # 32-bit integer grey holding 16-bit values
        ("F", 0.5, "tiff", (128, 128, 128)),  # float grey in [0, 1]
        ("CMYK", (0, 255, 255, 0), "jpeg", (255, 0, 0)),  # no black ink, full magenta + yellow: red
        ("RGBA", (200, 10, 10, 0), "png", (255, 255, 255)),  # fully transparent: the white background
        ("RGBA", (200, 10, 10, 255), "png", (200, 10, 10)),
        ("LA", (0, 0), "png", (255, 255, 255)),
        ("1", 1, "bmp", (255, 255, 255)),
    ],
)
def test_every_mode_becomes_the_rgb_it_shows(tmp_path, mode, value, fmt, want):
    path = tmp_path / f"x.{fmt}"
    Image.new(mode, (12, 9), value).save(path)
    got = _rgb(path)
    assert got.shape == (9, 12, 3)
    assert np.abs(got - np.array(want)).max() <= (12 if fmt == "jpeg" else 1), (mode, got[0, 0])


def test_palette_transparency_is_white_and_animations_give_their_first_frame(tmp_path):
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(tmp_path / "p.png", transparency=1)  # index 1 (red) is transparent
    assert (_rgb(tmp_path / "p.png") == 255).all()
    frames = [Image.new("RGB", (8, 8), c) for c in ((250, 0, 0), (0, 0, 250))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], duration=50)
    for name in ("anim.gif", "anim.webp"):
        first = _rgb(tmp_path / name)[0, 0]
        assert first[0] > 200 and first[2] < 50, (name, first)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    got = _rgb(tmp_path / "rot.jpg")
    assert got.shape == (40, 20, 3)  # displayed upright: 20 wide, 40 tall
    assert got[5, 10, 2] > 200 and got[35, 10, 0] > 200  # the blue half is now on top


def test_extreme_sizes_odd_names_and_misleading_extensions_are_captioned(captioner_model, tmp_path):
    paths = []
    for name, size in (("one pixel.png", (1, 1)), ("strip é 漢.png", (4000, 60)), ("tall.png", (60, 4000))):
        Image.new("RGB", size, (30, 60, 220)).save(tmp_path / name)
        paths.append(tmp_path / name)
    Image.new("RGB", (64, 64), (30, 60, 220)).save(tmp_path / "really_a_png.jpg", format="PNG")
    paths.append(tmp_path / "really_a_png.jpg")
    captions = captioner_model.caption(paths)
    assert all(isinstance(c, str) and c for c in captions)


def test_broken_files_each_get_one_clear_reason(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(good)
    data = good.read_bytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello, not an image")
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.png").write_bytes(data[:33] + bytes(range(256)) * 4)  # valid header, then junk
    (tmp_path / "folder.png").mkdir()
    _png_header_only(tmp_path / "bomb.png", 40000, 40000)
    expected = {
        "empty.jpg": "not an image",
        "text.png": "not an image",
        "truncated.png": "unreadable",
        "garbage.png": "corrupt header",
        "folder.png": "directory",
        "missing.png": "no such file",
        "bomb.png": "over the limit",
    }
    for name, reason in expected.items():
        with pytest.raises(ImageError) as e:
            load_image(tmp_path / name)
        assert e.value.path.endswith(name) and reason in e.value.reason, (name, e.value.reason)
        assert "\n" not in str(e.value)


def test_the_pixel_limit_is_checked_before_decoding_and_can_be_raised(tmp_path):
    _png_header_only(tmp_path / "big.png", 5000, 5000)  # 25 MP declared, no data behind it
    with pytest.raises(ImageError, match="over the limit of 1,000,000"):
        load_image(tmp_path / "big.png", max_pixels=1_000_000)
    with pytest.raises(ImageError, match="unreadable"):  # under the limit it is decoded, and fails there
        load_image(tmp_path / "big.png", max_pixels=30_000_000)


def test_cli_reports_each_bad_file_in_one_line_and_captions_the_rest(trained_run, tmp_path, capsys):
    Image.new("RGB", (64, 64), (220, 30, 30)).save(tmp_path / "good.png")
    _png_header_only(tmp_path / "bomb.png", 40000, 40000)
    (tmp_path / "empty.png").write_bytes(b"")
    rc = main(
        [
            "caption",
            str(tmp_path / "good.png"),
            str(tmp_path / "bomb.png"),
            str(tmp_path / "empty.png"),
            "--model",
            str(trained_run / "best.pt"),
            "--max-pixels",
            "50000000",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 1 and "good.png\t" in out and len(out.strip().splitlines()) == 1
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "bomb.png" in lines[0] and "50,000,000" in lines[0] and "empty.png" in lines[1]
    assert "Traceback" not in err
