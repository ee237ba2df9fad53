"""DICOM images decoded to the pipeline's 8-bit grayscale, the way a radiology viewer shows them.

Through pydicom (the optional extra ``covid_tune[dicom]``; compressed transfer syntaxes such as JPEG,
JPEG 2000 and RLE also need its pixel-data handlers, ``covid_tune[dicom-compressed]``). In order:

1. the stored values, first frame of a multi-frame file;
2. the modality transform: Rescale Slope/Intercept or a Modality LUT (pydicom's ``apply_modality_lut``);
3. the VOI transform to 0-255: the first VOI LUT of the VOI LUT Sequence when there is one, else the first
   Window Center/Width with the VOI LUT Function (LINEAR, LINEAR_EXACT or SIGMOID, DICOM PS3.3
   C.11.2.1.2), else the image's own range stretched (min-max), as 16-bit PNGs are;
4. MONOCHROME1 (white is low) inverted, so that bone is bright in every image.

Colour images (RGB, YBR) are taken as pydicom gives them (RGB), stretched to 0-255 when not 8-bit.
Any bit depth (8, 12, 16, signed or not) ends as uint8.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DICOM_EXTENSIONS = (".dcm", ".dicom")
_MAGIC_OFFSET = 128  # a Part 10 file: 128-byte preamble, then b"DICM"


class DicomUnavailable(RuntimeError):
    """pydicom is not installed."""


def has_dicom_magic(path: str | Path) -> bool:
    """Whether ``path`` starts like a DICOM Part 10 file (what identifies one without an extension)."""
    try:
        with open(path, "rb") as f:
            f.seek(_MAGIC_OFFSET)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom(path: str | Path) -> bool:
    """A ``.dcm``/``.dicom`` file, or a file without an extension that carries the DICOM preamble."""
    p = Path(path)
    suffix = p.suffix.lower()
    return suffix in DICOM_EXTENSIONS or (suffix == "" and has_dicom_magic(p))


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise DicomUnavailable("reading DICOM files needs pydicom: pip install 'covid_tune[dicom]' "
                               "(compressed transfer syntaxes: 'covid_tune[dicom-compressed]')") from None
    return pydicom


def _stretch(values: np.ndarray) -> np.ndarray:
    """The image's own range to 0-1 (all-equal pixels: 0)."""
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2-3: a window to 0-1."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    # LINEAR: x <= c - 0.5 - (w-1)/2 -> 0; x > c - 0.5 + (w-1)/2 -> 1; linear in between
    if width <= 1:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _first(value) -> float:
    # Window Center/Width may hold several values (VM 1-n): the first is the default view
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _voi(ds, values: np.ndarray) -> np.ndarray:
    """The VOI transform to 0-1: VOI LUT Sequence, else window, else min-max."""
    from pydicom.pixels import apply_voi

    lut_seq = ds.get("VOILUTSequence")
    if lut_seq:
        item = lut_seq[0]
        bits = int(item.LUTDescriptor[2])
        # the LUT is indexed by the modality transform's output; pydicom applies the descriptor's first value
        out = apply_voi(values if values.dtype.kind in "iu" else np.round(values).astype(np.int64), ds, index=0)
        return np.clip(np.asarray(out, dtype=np.float64) / float(2**bits - 1), 0.0, 1.0)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        if width > 0:
            return _window(values, center, width, function)
    return _stretch(values)


def decode_dicom(path: str | Path) -> np.ndarray:
    """One DICOM image as uint8: ``(H, W)`` for grayscale, ``(H, W, 3)`` for colour.

    Raises :class:`DicomUnavailable` without pydicom, and pydicom's own errors for a file it cannot
    read or whose pixel data it cannot decode (a missing handler for a compressed transfer syntax).
    """
    pydicom = _pydicom()
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(str(path))
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ValueError("no pixel data (not an image: a report, a structured document?)")
    stored = np.asarray(ds.pixel_array)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        stored = stored[0]  # a multi-frame file: its first frame
    if samples > 1:  # colour: pydicom returns RGB
        rgb = stored.astype(np.float64)
        scaled = rgb if stored.dtype == np.uint8 else _stretch(rgb) * 255.0
        return np.round(scaled).astype(np.uint8)
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    out = _voi(ds, values)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        out = 1.0 - out
    return np.round(out * 255.0).astype(np.uint8)
