"""Safe image opening, checks, EXIF orientation, RGB conversion and square resizing.

Everything here works on one image and is a plain function, so the validate and
preprocess stages can run it in worker processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError

# EXIF orientations 5-8 swap width and height.
_SWAPS_SIDES = {5, 6, 7, 8}
_HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# Decode failures Pillow raises for truncated or corrupt data, depending on the format.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError)


class ImageProblem(Exception):
    """An image that cannot be used; `code` is the stable finding code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class ImageInfo:
    """What validate learned from fully decoding one image."""

    width: int  # after EXIF orientation
    height: int
    mode: str
    format: str | None
    content_hash: str  # of the decoded pixels, so a re-saved copy is still a duplicate
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (code, message)


def image_extensions() -> set[str]:
    """File extensions Pillow can open, lower case with the dot."""
    return {ext.lower() for ext in Image.registered_extensions()}


def resolve_inside(folder: str | Path, name: str) -> Path:
    """Return folder/name, refusing any name that could reach outside `folder`.

    Refuses absolute paths (POSIX or Windows), '..' parts and symlinks whose target lies
    outside the folder, before anything is opened. Raises ImageProblem.
    """
    if not name:
        raise ImageProblem("EMPTY_FILE_NAME", "the file name is empty")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or (
        PureWindowsPath(name).drive
    ):
        raise ImageProblem(
            "UNSAFE_PATH",
            f"absolute path {name!r} refused; use a path relative to the image folder",
        )
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        raise ImageProblem(
            "UNSAFE_PATH", f"path {name!r} goes up with '..'; keep images inside the folder"
        )
    root = Path(folder)
    path = _on_disk(root, name)
    if path is None:
        raise ImageProblem("FILE_MISSING", f"file {name!r} not found in {root}")
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise ImageProblem(
            "UNSAFE_PATH",
            f"{name!r} is a link to {real}, outside the image folder; copy the file in instead",
        )
    if not path.exists():
        raise ImageProblem("FILE_MISSING", f"{name!r} is a broken link")
    if not path.is_file():
        raise ImageProblem("NOT_AN_IMAGE", f"{name!r} is not a file")
    return path


def normalise_name(name: str) -> str:
    """The canonical form of a metadata file name: forward slashes (a CSV written on Windows
    has 'sub\\a.png'), no '.' or empty parts, Unicode NFC (macOS stores names decomposed,
    most editors type them composed). '..' is kept, so resolve_inside still refuses it."""
    name = unicodedata.normalize("NFC", name.strip().replace("\\", "/"))
    parts = [part for part in name.split("/") if part not in ("", ".")]
    return ("/" if name.startswith("/") else "") + "/".join(parts)


def _on_disk(root: Path, name: str) -> Path | None:
    """root/name if it exists (a broken link counts), else the one path whose parts equal
    name's parts after NFC normalisation; None when there is no such file."""
    path = root / name
    if os.path.lexists(path):
        return path
    found = root
    for part in PurePosixPath(name).parts:
        wanted = unicodedata.normalize("NFC", part)
        try:
            matches = [entry for entry in os.listdir(found)
                       if unicodedata.normalize("NFC", entry) == wanted]
        except OSError:
            return None
        if len(matches) != 1:
            return None
        found = found / matches[0]
    return found


@contextlib.contextmanager
def _pixel_limit(max_pixels: int | None):
    """Make Pillow refuse images over `max_pixels` at open, before decoding (None: no limit).

    Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; turning the warning
    into an error gives one exact limit.
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(ExifTags.Base.Orientation, 1) or 1)
    except Exception:  # a broken EXIF block is not worth refusing the image for
        return 1


def inspect_image(path: str | Path, max_pixels: int) -> ImageInfo:
    """Open and fully decode one image; raise ImageProblem or return what preprocess must fix."""
    name = Path(path).name
    with _pixel_limit(max_pixels):
        try:
            im = Image.open(path)
        except UnidentifiedImageError:
            raise ImageProblem(
                "NOT_AN_IMAGE", f"{name} is not an image Pillow can read{_format_hint(path)}"
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageProblem("TOO_MANY_PIXELS", _too_many(name, None, max_pixels)) from None
        except _DECODE_ERRORS as exc:
            raise ImageProblem("CORRUPT_IMAGE", f"{name} cannot be read: {exc}") from None
        with im:
            pixels = im.width * im.height
            if pixels > max_pixels:
                raise ImageProblem("TOO_MANY_PIXELS", _too_many(name, im.size, max_pixels))
            try:
                im.load()  # decodes every byte: truncation and corrupt data show up here
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise ImageProblem(
                    "TOO_MANY_PIXELS", _too_many(name, im.size, max_pixels)
                ) from None
            except _DECODE_ERRORS as exc:
                raise ImageProblem(
                    "CORRUPT_IMAGE", f"{name} is truncated or corrupt: {exc}"
                ) from None
            orientation = _orientation(im)
            width, height = im.size
            if orientation in _SWAPS_SIDES:
                width, height = height, width
            digest = hashlib.sha256(f"{im.mode}{im.size}".encode())
            digest.update(im.tobytes())
            info = ImageInfo(width, height, im.mode, im.format, digest.hexdigest())
            info.warnings = _conversion_warnings(im, orientation)
    return info


# ISO base media brands of HEIF (iPhone photos) and AVIF: Pillow reads them only with plugins.
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1",
                b"avif", b"avis"}


def _format_hint(path: str | Path) -> str:
    """What to do with a file Pillow cannot identify, when its bytes say what it is."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return ""
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        kind = "AVIF" if head[8:12] in (b"avif", b"avis") else "HEIC/HEIF"
        return (f": it is a {kind} image, which this Pillow cannot decode; convert it to PNG "
                "or JPEG (e.g. `heif-convert photo.heic photo.png`, or export from your photo "
                "app) and list the converted file")
    return ""


def _too_many(name: str, size, max_pixels: int) -> str:
    dims = f" ({size[0]}x{size[1]})" if size else ""
    return (
        f"{name}{dims} has more than validate.max_pixels={max_pixels} pixels and was not "
        "decoded (possible decompression bomb); shrink it or raise validate.max_pixels"
    )


def _conversion_warnings(im: Image.Image, orientation: int) -> list[tuple[str, str]]:
    out = []
    has_alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
    if has_alpha:
        out.append(("ALPHA", f"mode {im.mode} has transparency; it will be composited on white"))
    elif im.mode in _HIGH_BIT_MODES:
        out.append(("COLOR_MODE", f"mode {im.mode} (16-bit) will be reduced to 8-bit RGB"))
    elif im.mode != "RGB":
        out.append(("COLOR_MODE", f"mode {im.mode} will be converted to RGB"))
    if getattr(im, "n_frames", 1) > 1:
        out.append(("ANIMATED", f"{im.n_frames} frames; only the first frame is used"))
    if orientation != 1:
        out.append(("EXIF_ROTATION", f"EXIF orientation {orientation} will be applied"))
    return out


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit scaled down, alpha composited on white, ICC profiles to sRGB."""
    if im.mode in _HIGH_BIT_MODES:
        arr = np.asarray(im, dtype=np.int64)
        # 16-bit data spans 0..65535; /257 maps it exactly onto 0..255.
        arr = np.clip(np.rint(arr / 257.0), 0, 255) if arr.max(initial=0) > 255 else arr
        im = Image.fromarray(arr.astype(np.uint8), "L")
    if im.mode == "P" or (im.mode in ("L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    icc = im.info.get("icc_profile")
    if icc and im.mode in ("RGB", "CMYK"):
        with contextlib.suppress(ImageCms.PyCMSError, OSError, ValueError):
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(im, src, srgb, outputMode="RGB")
    return im.convert("RGB")


def _open_rgb(path: str | Path, cover: tuple[int, int]):
    """An image with its EXIF orientation applied, as RGB, and its size after orientation
    (before any JPEG draft). cover=(w, h): the oriented image will be scaled to cover that
    size, so libjpeg may decode a JPEG at 1/2, 1/4 or 1/8 scale (DCT scaling) while it
    still covers it: for a 2048 px photo going to 512 px this skips most of the decode
    work, the stage's largest cost.

    No pixel limit here: validate already refused images over validate.max_pixels.
    """
    with _pixel_limit(None), Image.open(path) as im:
        swapped = _orientation(im) in _SWAPS_SIDES
        source_size = im.size[::-1] if swapped else im.size
        if im.format == "JPEG":
            need = cover[::-1] if swapped else cover  # in the stored orientation
            scale = max(need[0] / im.width, need[1] / im.height)
            im.draft(None, (math.ceil(im.width * scale), math.ceil(im.height * scale)))
        im.seek(0)
        im = ImageOps.exif_transpose(im)
        return to_rgb(im), source_size


def load_square(path: str | Path, resolution: int) -> tuple[Image.Image, tuple[int, int]]:
    """Open an image, apply EXIF orientation, make it RGB, resize the shorter side to
    `resolution` with Lanczos and center-crop it to a square.

    Returns the square and the source size (after orientation, before any JPEG draft).
    """
    im, source_size = _open_rgb(path, (resolution, resolution))
    side = min(im.size)
    left = (im.width - side) / 2
    top = (im.height - side) / 2
    # Resizing the centered square in one call equals resize-then-crop, but the filter
    # only computes the pixels that are kept.
    box = (left, top, left + side, top + side)
    return im.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box), source_size


def load_placed(path: str | Path, placement) -> Image.Image:
    """Open an image as load_square does and cut it as a buckets.Placement says: resized to
    cover its bucket, centre-cropped on the overhanging axis, in one resampling pass."""
    im, (width, height) = _open_rgb(path, (placement.width, placement.height))
    # the placement is in the source's coordinates; a JPEG draft shrank the decode
    fx, fy = im.width / width, im.height / height
    sx, sy = width / placement.resized[0], height / placement.resized[1]
    box = (placement.crop_left * sx * fx, placement.crop_top * sy * fy,
           (placement.crop_left + placement.width) * sx * fx,
           (placement.crop_top + placement.height) * sy * fy)
    return im.resize((placement.width, placement.height), Image.Resampling.LANCZOS, box=box)


def save_square_png(src: str | Path, dst: str | Path, resolution: int) -> tuple[int, int]:
    """load_square(src) written to dst as PNG; returns the source size after orientation.

    PNG holds no timestamp, so the same pixels always give the same bytes. zlib level 1:
    at 512 px it encodes ~3x faster than the default 6 (28 vs 78 ms, measured) for files
    ~8% larger; these PNGs are an intermediate cache, so speed wins.
    """
    square, source_size = load_square(src, resolution)
    square.save(dst, format="PNG", compress_level=1)
    return source_size


def save_placed_png(src: str | Path, dst: str | Path, placement) -> None:
    """load_placed(src, placement) written to dst as PNG (as save_square_png)."""
    load_placed(src, placement).save(dst, format="PNG", compress_level=1)


def oriented_size(path: str | Path) -> tuple[int, int]:
    """(width, height) after the EXIF orientation, from the header only."""
    with _pixel_limit(None), Image.open(path) as im:
        return im.size[::-1] if _orientation(im) in _SWAPS_SIDES else im.size
