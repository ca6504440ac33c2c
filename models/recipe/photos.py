"""Labelled photos for finetune.py: the labels CSV and the images it names, read as the models take them.

A factory's files come from whatever its camera and labelling tools write: Excel's CSV UTF-8, Windows
paths, 8- and 16-bit PNG, JPEG, BMP, TIFF, 12-bit camera data in a 16-bit file, float TIFFs, frames
beyond Pillow's decompression-bomb limit. Each problem is reported with its CSV line, all of them at
once (InputError), never as a traceback.
"""

import contextlib
import csv
import io
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

UTF16_MARKS = (b"\xff\xfe", b"\xfe\xff")


class InputError(ValueError):
    """A flag, the labels file, an image or --out cannot be used: main() prints the message (one problem a
    line) without a traceback and exits 2."""


class Row(NamedTuple):
    line: int
    file: str
    label: int


def read_labels(path: Path) -> list[Row]:
    """Rows of `file,label` (label 0 or 1) after a header, with their line numbers; InputError names the line.
    UTF-8 with or without the byte-order mark of Excel's "CSV UTF-8"; empty cells at the end of a row (a
    trailing comma) are ignored."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"labels file {path}: {exc.strerror}") from None
    if raw.startswith(UTF16_MARKS):
        raise InputError(f"{path} is UTF-16 (Excel's 'Unicode text'); save it as 'CSV UTF-8'")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(
            f"{path}, line {line}: byte 0x{raw[exc.start]:02x} is not UTF-8; save the labels as 'CSV UTF-8'"
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    rows = [(reader.line_num, row, _without_trailing_blanks(row)) for row in reader]
    if not rows:
        raise InputError(f"{path} is empty; the first line must be the header 'file,label'")
    _, header, cells = rows[0]
    if [cell.strip().lower() for cell in cells] != ["file", "label"]:
        hint = (
            "; cells are separated by commas, not semicolons" if len(cells) == 1 and ";" in cells[0] else ""
        )
        raise InputError(
            f"{path}, line 1: {','.join(header)!r}; the first line must be the header 'file,label'{hint}"
        )
    labelled = []
    for line, row, cells in rows[1:]:
        if not "".join(cells).strip():
            continue
        if len(cells) != 2 or not cells[0].strip() or cells[1].strip() not in ("0", "1"):
            raise InputError(
                f"{path}, line {line}: {','.join(row)!r}; expected 'file,label' with label 0 or 1"
            )
        labelled.append(Row(line, cells[0].strip(), int(cells[1])))
    if not labelled:
        raise InputError(f"{path}: no images listed")
    return labelled


def _without_trailing_blanks(row: list[str]) -> list[str]:
    while row and not row[-1].strip():
        row = row[:-1]
    return row


def image_paths(folder: Path, rows: list[Row], labels_path: Path) -> list[Path]:
    """Each row's file under `folder`, resolved ("\\" read as a folder separator, as Windows tools write
    paths). InputError names every image listed twice, under any spelling: a second row would put one
    photo in both the training and the kept-aside set, or train it both ways."""
    first_row: dict[Path, Row] = {}
    paths, problems = [], []
    for row in rows:
        path = (folder / row.file.replace("\\", "/")).resolve()
        if (first := first_row.setdefault(path, row)) is not row:
            spelt = "" if first.file == row.file else f" as {first.file}"
            labels = "" if first.label == row.label else f"; labelled {first.label} there, {row.label} here"
            problems.append(f"line {row.line}: {row.file}: already on line {first.line}{spelt}{labels}")
        paths.append(path)
    if problems:
        raise _problems(f"{labels_path}: images listed twice; list each once", problems)
    return paths


def load_images(
    paths: list[Path],
    rows: list[Row],
    size_px: int,
    channels: int,
    labels_path: Path,
    order: np.ndarray | None = None,
) -> np.ndarray:
    """The images in the rows' order or in `order` (a permutation of the row indices), stacked in place as
    [N, channels, size_px, size_px] on the 0..255 scale: uint8 while all are 8-bit (a quarter of float32's
    memory, and what train.fit takes), float32 once one is deeper, so its levels between two 8-bit ones are
    kept. InputError lists every image that cannot be read, not only the first."""
    pixels = np.empty((len(rows), channels, size_px, size_px), np.uint8)
    slots = np.arange(len(rows)) if order is None else np.argsort(order)
    problems = []
    for index, (path, row) in enumerate(zip(paths, rows, strict=True)):
        try:
            image = load_image(path, size_px, channels)
        except Exception as exc:  # noqa: BLE001 - each of Pillow's decoders raises its own kinds
            problems.append(f"line {row.line}: {row.file}: {_reason(exc)}")
            continue
        if image.dtype != pixels.dtype:
            pixels = pixels.astype(np.float32)
        pixels[slots[index]] = image
    if problems:
        raise _problems(f"{labels_path}: {len(problems)} of {len(rows)} images cannot be used", problems)
    return pixels


@contextlib.contextmanager
def _own_files():
    """Lift Pillow's decompression-bomb limit (179 MP) while reading the user's own photos: a line-scan
    frame is larger, and the files are not from a stranger."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _reason(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image Pillow can read"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _problems(heading: str, problems: list[str]) -> InputError:
    return InputError("\n  ".join([f"{heading}:", *problems]))


def load_image(path: Path, size_px: int, channels: int) -> np.ndarray:
    """One image as [channels, size_px, size_px] on the 0..255 scale, resized whole (antialiased): uint8 from
    an 8-bit file, float32 from a deeper grey one (_deep_grey) resized in float, so that 12-bit levels are
    not rounded to 8 bits. Raises what Pillow raises, and ValueError for pixels it cannot scale."""
    with _own_files(), Image.open(path) as opened:
        if opened.mode in ("F", "I") or opened.mode.startswith("I;16"):
            grey = Image.fromarray(_deep_grey(opened, path) * np.float32(255))
            resized = np.asarray(grey.resize((size_px, size_px), Image.Resampling.BILINEAR), np.float32)
            return np.repeat(resized[None], channels, axis=0)
        picture = opened.convert("RGB" if channels == 3 else "L")
        pixels = np.asarray(picture.resize((size_px, size_px), Image.Resampling.BILINEAR))
    return pixels[None] if channels == 1 else np.moveaxis(pixels, -1, 0)


def _deep_grey(opened: Image.Image, path: Path) -> np.ndarray:
    """A 16- or 32-bit integer or a float grey image as float32 in [0, 1].

    Integers are divided by their real full scale, not by 65535: 12-bit camera data saved in a 16-bit file
    (0..4095) would otherwise use a sixteenth of the range, and 11 grey levels after rounding. With a PNG
    sBIT chunk of s bits the scale is 2^s - 1 if the values fit in s bits (camera tools write them so), and
    65535 if not (a PNG scaled up to 16 bits, as the PNG spec asks); without one it is the smallest 2^k - 1,
    k from 8 to 16, at or above the brightest pixel, so a dark frame may read brighter than its siblings
    (the models standardise each image, which takes out the gain). Floats must lie in 0..1."""
    values = np.asarray(opened)
    if opened.mode == "F":
        if not np.isfinite(values).all():
            raise ValueError("float pixels include NaN or infinity")
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 1:
            raise ValueError(f"float pixels span {low:g}..{high:g}; expected 0..1")
        return values.astype(np.float32)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        raise ValueError(f"integer pixels span {low}..{high}; expected 0..65535 (8 to 16 bits)")
    bits = _png_significant_bits(path) if opened.format == "PNG" else None
    if bits is not None:
        full = 2**bits - 1 if high <= 2**bits - 1 else 65535
    else:
        full = next(2**k - 1 for k in range(8, 17) if high <= 2**k - 1)
    return values.astype(np.float32) / np.float32(full)


def _png_significant_bits(path: Path) -> int | None:
    """The grey sample's significant bits (1 to 16) from a PNG's sBIT chunk, which Pillow does not read."""
    with path.open("rb") as stream:
        stream.seek(8)
        while len(header := stream.read(8)) == 8:
            length, kind = struct.unpack(">I4s", header)
            if kind in (b"IDAT", b"IEND"):
                return None
            data = stream.read(length)
            if kind == b"sBIT":
                return data[0] if data and 1 <= data[0] <= 16 else None
            stream.seek(4, io.SEEK_CUR)
    return None
