"""validate: one test per bad input, each built in a temporary folder."""

from __future__ import annotations

import io
import json
import os

import pytest
from PIL import Image

from conftest import rgb_image, tree_digest, write_csv
from lorapipe.diffusion import metadata
from lorapipe.diffusion.metadata import validate_dataset
from stages import validate as validate_stage

MAX_PIXELS = 10_000_000


def run(folder, min_side=64, max_pixels=MAX_PIXELS):
    # workers=1: in-process, so monkeypatches apply and the tests stay quick
    return validate_dataset(folder, min_side=min_side, max_pixels=max_pixels, workers=1)


def codes(report, file=None):
    return [f.code for f in report.findings if file is None or f.file == file]


def only(report, code):
    [finding] = [f for f in report.findings if f.code == code]
    return finding


def add_row(folder, name, text="a caption"):
    with open(folder / "metadata.csv", "a", encoding="utf-8") as f:
        f.write(f'"{name}","{text}"\n')


def test_good_dataset_has_no_findings(dataset):
    report = run(dataset)
    assert report.findings == []
    assert [r.file_name for r in report.usable] == ["img0.png", "img1.png", "img2.png"]
    assert report.usable[0].line == 2


# --- row errors -------------------------------------------------------------------------

def test_missing_file(dataset):
    add_row(dataset, "nope.png")
    report = run(dataset)
    finding = only(report, "FILE_MISSING")
    assert finding.row == 5 and finding.file == "nope.png" and finding.severity == "error"
    assert "not found" in finding.message
    assert len(report.usable) == 3


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.png", "sub/../../outside.png",
                                  "C:\\images\\a.png"])
def test_path_escaping_the_folder_is_refused_unopened(dataset, monkeypatch, name):
    (dataset.parent / "outside.png").write_bytes(b"")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda p, *a, **k: (opened.append(str(p)),
                                                           real_open(p, *a, **k))[1])
    add_row(dataset, name)
    report = run(dataset)
    assert codes(report, name) == ["UNSAFE_PATH"]
    assert not any("outside" in p or "passwd" in p for p in opened)


def test_symlink_pointing_outside_is_refused_unopened(dataset, monkeypatch):
    secret = rgb_image(dataset.parent / "secret.png")
    os.symlink(secret, dataset / "link.png")
    os.symlink(dataset / "img0.png", dataset / "inside_link.png")  # inside: fine
    add_row(dataset, "link.png")
    add_row(dataset, "inside_link.png")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda p, *a, **k: (opened.append(str(p)),
                                                           real_open(p, *a, **k))[1])
    report = run(dataset)
    assert codes(report, "link.png") == ["UNSAFE_PATH"]
    assert "outside the image folder" in only(report, "UNSAFE_PATH").message
    assert not any(p.endswith("link.png") and "inside" not in p for p in opened)
    assert "inside_link.png" in [r.file_name for r in report.usable]


def test_not_an_image(dataset):
    (dataset / "notes.png").write_text("this is text, not a PNG")
    add_row(dataset, "notes.png")
    assert codes(run(dataset), "notes.png") == ["NOT_AN_IMAGE"]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(dataset, fmt):
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(buf, fmt)
    data = buf.getvalue()
    (dataset / "cut.img").write_bytes(data[: len(data) // 2])  # header intact, pixels cut
    add_row(dataset, "cut.img")
    report = run(dataset)
    assert codes(report, "cut.img") == ["CORRUPT_IMAGE"]
    assert "truncated or corrupt" in only(report, "CORRUPT_IMAGE").message


def test_corrupt_pixel_data(dataset):
    buf = io.BytesIO()
    Image.effect_noise((128, 128), 64).convert("RGB").save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[200:400] = b"\x00" * 200  # inside the compressed IDAT stream
    (dataset / "bad.png").write_bytes(bytes(data))
    add_row(dataset, "bad.png")
    assert codes(run(dataset), "bad.png") == ["CORRUPT_IMAGE"]


def test_decompression_bomb(dataset):
    rgb_image(dataset / "big.png", size=(400, 300))
    add_row(dataset, "big.png")
    report = run(dataset, max_pixels=100_000)
    assert codes(report, "big.png") == ["TOO_MANY_PIXELS"]
    assert "validate.max_pixels=100000" in only(report, "TOO_MANY_PIXELS").message
    # over twice the limit Pillow raises instead of warning: same finding
    report = run(dataset, max_pixels=50_000)
    assert codes(report, "big.png") == ["TOO_MANY_PIXELS"]


def test_too_small(dataset):
    rgb_image(dataset / "tiny.png", size=(48, 200))
    add_row(dataset, "tiny.png")
    report = run(dataset, min_side=64)
    finding = only(report, "TOO_SMALL")
    assert finding.file == "tiny.png"
    assert "48x200 is smaller than validate.min_side=64" in finding.message


@pytest.mark.parametrize("caption", ["", "   ", "\t"])
def test_empty_caption(dataset, caption):
    rgb_image(dataset / "x.png")
    add_row(dataset, "x.png", caption)
    report = run(dataset)
    assert codes(report, "x.png") == ["EMPTY_CAPTION"]
    assert "x.png" not in [r.file_name for r in report.usable]


def test_duplicate_file_name(dataset):
    add_row(dataset, "./img1.png", "again")
    report = run(dataset)
    finding = only(report, "DUPLICATE_FILE")
    assert finding.row == 5 and "also listed on line 3" in finding.message
    assert len(report.usable) == 3


def test_row_with_more_cells_than_the_header(dataset):
    """An unquoted caption with commas used to be cut to its first cell, silently."""
    rgb_image(dataset / "x.png")
    with open(dataset / "metadata.csv", "a", encoding="utf-8") as f:
        f.write("x.png,a red circle, lpstyle, bold\n")
    report = run(dataset)
    finding = only(report, "EXTRA_CELLS")
    assert finding.severity == "error" and finding.row == 5 and finding.file == "x.png"
    assert "2 more cell(s)" in finding.message and "' lpstyle' | ' bold'" in finding.message
    assert "double quotes" in finding.message
    assert "metadata.csv line 5 has 2 more cell(s)" in str(finding)  # names the file
    assert "x.png" not in [r.file_name for r in report.usable]
    # a trailing empty cell loses nothing: not an error
    with open(dataset / "metadata.csv", "a", encoding="utf-8") as f:
        f.write("img0.png,again,\n")
    assert "EXTRA_CELLS" not in codes(run(dataset), "img0.png")


def test_windows_style_path_is_found_and_not_unlisted(dataset):
    (dataset / "sub").mkdir()
    rgb_image(dataset / "sub" / "deep.png")
    add_row(dataset, "sub\\deep.png")
    report = run(dataset)
    assert codes(report) == []  # neither FILE_MISSING nor UNLISTED_IMAGE
    assert report.usable[-1].file_name == "sub\\deep.png"  # findings show it as written
    assert report.usable[-1].name == "sub/deep.png"  # every lookup uses this


def test_decomposed_name_on_disk_matches_composed_name_in_csv(dataset):
    """macOS writes 'café' decomposed (NFD); a CSV typed elsewhere has it composed (NFC)."""
    import unicodedata

    rgb_image(dataset / unicodedata.normalize("NFD", "café.png"))
    add_row(dataset, unicodedata.normalize("NFC", "café.png"))
    report = run(dataset)
    assert codes(report) == []
    assert report.usable[-1].name == unicodedata.normalize("NFC", "café.png")


def test_heic_file_gets_a_hint_to_convert(dataset):
    # the start of an iPhone photo: an ISO base media 'ftyp' box with the heic brand
    (dataset / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00" + b"\0" * 64)
    add_row(dataset, "photo.heic")
    finding = only(run(dataset), "NOT_AN_IMAGE")
    assert "it is a HEIC/HEIF image" in finding.message and "convert it to PNG" in finding.message


# --- warnings: usable, fixed by preprocess ----------------------------------------------

def _add_image(folder, name, im, **save):
    im.save(folder / name, **save)
    add_row(folder, name)


@pytest.mark.parametrize(
    "name, make, code",
    [
        ("cmyk.jpg", lambda: Image.new("CMYK", (80, 80), (0, 255, 0, 0)), "COLOR_MODE"),
        ("pal.png", lambda: Image.new("RGB", (80, 80), "red").convert("P"), "COLOR_MODE"),
        ("grey16.png", lambda: Image.new("I;16", (80, 80), 40000), "COLOR_MODE"),
        ("alpha.png", lambda: Image.new("RGBA", (80, 80), (255, 0, 0, 128)), "ALPHA"),
    ],
)
def test_non_rgb_modes_warn(dataset, name, make, code):
    _add_image(dataset, name, make())
    report = run(dataset)
    assert codes(report, name) == [code]
    assert only(report, code).severity == "warning"
    assert name in [r.file_name for r in report.usable]


def test_animated_image_warns(dataset):
    frames = [Image.new("RGB", (80, 80), c).convert("P") for c in ("red", "blue", "green")]
    frames[0].save(dataset / "anim.gif", save_all=True, append_images=frames[1:])
    add_row(dataset, "anim.gif")
    report = run(dataset)
    assert "ANIMATED" in codes(report, "anim.gif")
    assert "3 frames" in only(report, "ANIMATED").message


def test_exif_rotation_warns_and_swaps_sides(dataset):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 200x70 shows as 70x200
    rgb_image(dataset / "rot.jpg", size=(200, 70), exif=exif.tobytes())
    add_row(dataset, "rot.jpg")
    report = run(dataset, min_side=64)
    assert codes(report, "rot.jpg") == ["EXIF_ROTATION"]


def test_unlisted_image(dataset):
    rgb_image(dataset / "forgotten.png")
    (dataset / "sub").mkdir()
    rgb_image(dataset / "sub" / "deep.jpg")
    (dataset / "readme.txt").write_text("not an image")
    (dataset / ".hidden.png").write_bytes(b"")
    report = run(dataset)
    unlisted = [f.file for f in report.findings if f.code == "UNLISTED_IMAGE"]
    assert unlisted == ["forgotten.png", "sub/deep.jpg"]
    assert report.summary()["unlisted"] == 2


def test_identical_content_listed_twice(dataset):
    Image.open(dataset / "img0.png").save(dataset / "copy.png", compress_level=1)
    add_row(dataset, "copy.png")
    report = run(dataset)
    finding = only(report, "DUPLICATE_CONTENT")
    assert finding.file == "copy.png" and "img0.png" in finding.message
    assert finding.severity == "warning"


# --- metadata.csv as a whole ------------------------------------------------------------

def csv_error(folder, content: bytes) -> metadata.Finding:
    (folder / "metadata.csv").write_bytes(content)
    report = run(folder)
    assert report.usable == []
    [finding] = report.findings
    assert finding.severity == "error" and finding.file == "metadata.csv"
    return finding


def test_missing_metadata(dataset):
    (dataset / "metadata.csv").unlink()
    report = run(dataset)
    assert codes(report) == ["CSV_MISSING"]


def test_empty_csv(dataset):
    assert csv_error(dataset, b"").code == "CSV_EMPTY"
    assert csv_error(dataset, b"file_name,text\n").code == "CSV_EMPTY"


def test_non_utf8_csv(dataset):
    finding = csv_error(dataset, "file_name,text\nimg0.png,caf\u00e9\n".encode("latin-1"))
    assert finding.code == "CSV_ENCODING"
    assert "byte 0xe9 on line 2" in finding.message


def test_utf16_csv_is_named_as_such(dataset):
    finding = csv_error(dataset, "file_name,text\nimg0.png,a red circle\n".encode("utf-16"))
    assert finding.code == "CSV_ENCODING"
    assert "UTF-16" in finding.message and "re-save it as UTF-8" in finding.message
    assert "0xff" not in finding.message


@pytest.mark.parametrize("delimiter, word", [(";", "semicolons"), ("\t", "tabs")])
def test_other_delimiter_is_named(dataset, delimiter, word):
    finding = csv_error(dataset, f"file_name{delimiter}text\nimg0.png{delimiter}a\n".encode())
    assert finding.code == "CSV_DELIMITER"
    assert f"separated by {word}" in finding.message and "did you mean" not in finding.message


def test_misspelled_header(dataset):
    finding = csv_error(dataset, b"file_nme,text\nimg0.png,a\n")
    assert finding.code == "CSV_HEADER"
    assert "did you mean 'file_name' instead of 'file_nme'?" in finding.message


def test_missing_caption_column(dataset):
    finding = csv_error(dataset, b"file_name\nimg0.png\n")
    assert finding.code == "CSV_HEADER" and "no caption column" in finding.message


def test_ambiguous_header(dataset):
    finding = csv_error(dataset, b"file_name,image,text\nimg0.png,img0.png,a\n")
    assert finding.code == "CSV_HEADER" and "both name the image file" in finding.message


@pytest.mark.parametrize("header", ["image,caption", "filename,prompt", "File_Name , Text"])
def test_header_aliases_and_bom(dataset, header):
    body = f"{header}\nimg0.png,a red square\n"
    (dataset / "metadata.csv").write_bytes(b"\xef\xbb\xbf" + body.encode())
    report = run(dataset)
    assert [(r.file_name, r.text) for r in report.usable] == [("img0.png", "a red square")]


# --- the stage: report, exit codes, on_error, raw data untouched ------------------------

def _break(folder):
    add_row(folder, "missing.png")
    rgb_image(folder / "tiny.png", size=(10, 10))
    add_row(folder, "tiny.png")
    rgb_image(folder / "rgba.png", size=(80, 80))
    Image.new("RGBA", (80, 80), (0, 0, 0, 0)).save(folder / "rgba.png")
    add_row(folder, "rgba.png")


def _stage(workspace_dir, dataset):
    return validate_stage.main(["--images", str(dataset), "--report", "reports/v.json",
                                "--usable", "reports/usable.csv"])


def test_stage_fails_on_errors_and_reports_everything(workspace, dataset, capsys):
    _break(dataset)
    before = tree_digest(dataset)
    ws = workspace(data__dir=str(dataset), validate__on_error="fail")
    assert _stage(ws, dataset) == 1
    report = json.loads((ws / "reports/v.json").read_text())
    assert report["passed"] is False
    assert (report["rows"], report["usable"], report["errors"], report["warnings"]) == (6, 4, 2, 1)
    assert {f["code"] for f in report["findings"]} == {"FILE_MISSING", "TOO_SMALL", "ALPHA"}
    assert all({"file", "row", "code", "message", "severity"} <= f.keys()
               for f in report["findings"])
    assert not (ws / "reports/usable.csv").exists()
    out = capsys.readouterr()
    assert "6 rows, 4 usable, 2 errors, 1 warnings" in out.out
    assert "error FILE_MISSING: line 5 missing.png" in out.out
    assert "validate.on_error: skip" in out.err
    assert tree_digest(dataset) == before


def test_stage_skip_drops_bad_rows(workspace, dataset, capsys):
    _break(dataset)
    before = tree_digest(dataset)
    ws = workspace(data__dir=str(dataset), validate__on_error="skip")
    assert _stage(ws, dataset) == 0
    usable = (ws / "reports/usable.csv").read_text().splitlines()
    assert usable == ["file_name,text", "img0.png,caption 0", "img1.png,caption 1",
                      "img2.png,caption 2", "rgba.png,a caption"]
    assert "skipped 2 rows with errors" in capsys.readouterr().out
    assert tree_digest(dataset) == before


def test_stage_fails_when_nothing_is_usable_even_with_skip(workspace, dataset):
    write_csv(dataset / "metadata.csv", [["missing.png", "x"]])
    ws = workspace(data__dir=str(dataset), validate__on_error="skip")
    assert _stage(ws, dataset) == 1
    assert not (ws / "reports/usable.csv").exists()


def test_stage_uses_worker_processes(workspace, dataset):
    """The default path (all cores) gives the same report as the in-process one."""
    _break(dataset)
    ws = workspace(data__dir=str(dataset), validate__on_error="skip")
    assert _stage(ws, dataset) == 0
    report = json.loads((ws / "reports/v.json").read_text())
    inline = run(dataset)
    assert report["findings"] == [f.to_dict() for f in inline.findings]
