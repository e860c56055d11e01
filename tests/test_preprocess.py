"""preprocess: size, mode, orientation, colour handling, determinism, atomic output."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import rgb_image, tree_digest, write_csv
from lorapipe.diffusion.images import load_square
from stages import preprocess as preprocess_stage


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def square(im: Image.Image, tmp_path, resolution=64, name="src.png", **save) -> np.ndarray:
    im.save(tmp_path / name, **save)
    out, _ = load_square(tmp_path / name, resolution)
    assert out.mode == "RGB" and out.size == (resolution, resolution)
    return np.asarray(out, dtype=np.int16)


def test_center_crop_keeps_the_middle(tmp_path):
    im = Image.new("RGB", (300, 100), "red")
    im.paste((0, 255, 0), (100, 0, 200, 100))  # green middle third
    im.paste((0, 0, 255), (200, 0, 300, 100))
    out = square(im, tmp_path)
    # only the green square is left; the outermost columns see a little of the neighbours
    # through the Lanczos kernel, exactly as resize-then-crop would
    assert np.abs(out[:, 2:-2] - [0, 255, 0]).max() <= 2
    assert np.abs(out - [0, 255, 0]).max() <= 16


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (120, 80), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 120, 20))  # red along the stored top edge
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the top edge goes right
    out = square(im, tmp_path, name="rot.jpg", exif=exif.tobytes(), quality=95)
    assert out[:, -3:, 0].mean() > 200 and out[:, -3:, 2].mean() < 60  # right edge red
    assert out[:, :3, 2].mean() > 200  # left edge blue
    assert out[:3, :, 2].mean() > 150  # top no longer red


def test_alpha_is_composited_on_white(tmp_path):
    im = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    im.paste((255, 0, 0, 255), (0, 0, 40, 80))
    out = square(im, tmp_path)
    assert (out[:, -20:] == 255).all()  # transparent half is white, not black
    assert (out[:, :20] == [255, 0, 0]).all()


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (80, 80), 0)
    im.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)
    im.paste(1, (0, 0, 40, 80))
    out = square(im, tmp_path, transparency=0)
    assert (out[:, -20:] == 255).all() and (out[:, :20] == [0, 128, 0]).all()


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    im = Image.new("I;16", (80, 80), 32896)  # half of 65535 -> 128 in 8 bit
    out = square(im, tmp_path)
    assert (out == 128).all()


def test_cmyk_becomes_rgb(tmp_path):
    out = square(Image.new("CMYK", (80, 80), (0, 255, 255, 0)), tmp_path, name="c.jpg", quality=95)
    assert out[..., 0].mean() > 230 and out[..., 1].mean() < 30  # red


def test_animated_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (80, 80), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    out, _ = load_square(tmp_path / "a.gif", 64)
    assert np.asarray(out)[..., 0].mean() > 240


def test_jpeg_draft_decode_matches_full_decode(tmp_path):
    """Fast DCT-scaled decoding of big JPEGs must look like the full decode + Lanczos."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((2048, 1536), Image.Resampling.BICUBIC)
    big.save(tmp_path / "big.jpg", quality=92)
    fast, size = load_square(tmp_path / "big.jpg", 256)
    assert size == (2048, 1536)
    with Image.open(tmp_path / "big.jpg") as full:
        full.load()
        reference = ImageOps.fit(full.convert("RGB"), (256, 256), Image.Resampling.LANCZOS)
    diff = np.abs(np.asarray(fast, np.int16) - np.asarray(reference, np.int16))
    assert diff.mean() < 2.0


# --- the stage ----------------------------------------------------------------------------

@pytest.fixture
def prepared(workspace, tmp_path):
    """A dataset with awkward images, its usable.csv, and params for the stage."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        arr = rng.integers(0, 255, (90 + 10 * i, 130, 3), dtype=np.uint8)
        Image.fromarray(arr).save(images / f"n{i}.jpg", quality=90)
    Image.new("RGBA", (100, 100), (0, 0, 255, 100)).save(images / "alpha.png")
    (images / "sub").mkdir()
    rgb_image(images / "sub" / "x.jpg", size=(120, 90))
    rgb_image(images / "x.jpg", size=(120, 90))
    rgb_image(images / "x.png", size=(90, 120))  # x.png would collide with x.jpg's output
    names = [f"n{i}.jpg" for i in range(6)] + ["alpha.png", "sub/x.jpg", "x.jpg", "x.png"]
    write_csv(tmp_path / "usable.csv", [[n, f"caption {n}"] for n in names])
    ws = workspace(data__dir=str(images), preprocess__resolution=64, preprocess__workers=0)
    return ws, images, names


def run_stage(ws, images, out="processed"):
    return preprocess_stage.main(
        ["--images", str(images), "--usable", str(ws / "usable.csv"), "--out", str(ws / out)]
    )


def test_stage_writes_squares_and_metadata(prepared):
    ws, images, names = prepared
    before = tree_digest(images)
    assert run_stage(ws, images) == 0
    lines = (ws / "processed/metadata.csv").read_text().splitlines()
    assert lines[0] == ("file_name,text,source,width,height,original_width,original_height,"
                        "crop_left,crop_top")
    # 120x90 to 64 px: resized to 85.3x64, so 11 px cut off the left (SDXL is told so)
    assert lines[-3:] == ["sub/x.png,caption sub/x.jpg,sub/x.jpg,64,64,120,90,11,0",
                          "x.png,caption x.jpg,x.jpg,64,64,120,90,11,0",
                          "x.png.png,caption x.png,x.png,64,64,90,120,0,11"]
    outputs = sorted(p.relative_to(ws / "processed").as_posix()
                     for p in (ws / "processed").rglob("*.png"))
    assert len(outputs) == len(names)
    for rel in outputs:
        with Image.open(ws / "processed" / rel) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 64))
    assert tree_digest(images) == before  # raw data untouched
    assert not [p for p in os.listdir(ws) if p.endswith(".tmp")]  # no temp folder left


def test_stage_output_is_byte_identical_across_runs_and_worker_counts(prepared, workspace):
    ws, images, _ = prepared
    assert run_stage(ws, images, "first") == 0
    assert run_stage(ws, images, "second") == 0
    workspace(data__dir=str(images), preprocess__resolution=64, preprocess__workers=1)
    assert run_stage(ws, images, "serial") == 0
    first = tree_digest(ws / "first")
    assert first == tree_digest(ws / "second") == tree_digest(ws / "serial")


def test_failed_run_keeps_previous_output(prepared, capsys):
    ws, images, _ = prepared
    assert run_stage(ws, images) == 0
    before = tree_digest(ws / "processed")
    data = (images / "n3.jpg").read_bytes()
    (images / "n3.jpg").write_bytes(data[: len(data) // 3])  # corrupt after validation
    with pytest.raises(OSError):
        run_stage(ws, images)
    (images / "n3.jpg").write_bytes(data)
    assert tree_digest(ws / "processed") == before
    assert not [p for p in os.listdir(ws) if ".tmp" in p]


def test_missing_usable_list_is_a_clear_error(prepared):
    ws, images, _ = prepared
    from lorapipe.core.errors import LorapipeError

    (ws / "usable.csv").unlink()
    with pytest.raises(LorapipeError, match="run the validate stage first"):
        run_stage(ws, images)


def test_upscaling_is_reported(prepared, workspace, capsys):
    ws, images, names = prepared
    workspace(data__dir=str(images), preprocess__resolution=128, preprocess__workers=1)
    assert run_stage(ws, images) == 0
    # shorter sides: n0..n5 90..130, alpha 100, the x images 90 -> 8 below 128
    assert "8 image(s) were smaller than their output size" in capsys.readouterr().err


def test_pixels_survive_the_round_trip(tmp_path):
    """A square image already at the target size comes out with the same pixels."""
    arr = np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    (tmp_path / "s.png").write_bytes(buf.getvalue())
    out, _ = load_square(tmp_path / "s.png", 64)
    assert (np.asarray(out) == arr).all()


def test_embedded_icc_profile_is_converted(tmp_path, monkeypatch):
    """An image carrying an ICC profile goes through ImageCms to sRGB (here sRGB itself,
    the one RGB profile Pillow can build, so the colours must survive unchanged)."""
    from PIL import ImageCms

    calls = []
    real = ImageCms.profileToProfile
    monkeypatch.setattr(ImageCms, "profileToProfile",
                        lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1])
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    im = Image.new("RGB", (80, 80), (200, 100, 50))
    out = square(im, tmp_path, name="icc.png", icc_profile=profile)
    assert len(calls) == 1  # the conversion ran
    with Image.open(tmp_path / "icc.png") as check:
        assert check.info.get("icc_profile")  # the test image really carries a profile
    assert np.abs(out - [200, 100, 50]).max() <= 2

