"""DICOM files written with pydicom from known arrays (for tests/test_dicom.py and the end-to-end tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 16,
                signed: bool = False, window: tuple[float, float] | None = None, voi_function: str | None = None,
                rescale: tuple[float, float] | None = None, voi_lut: tuple[list[int], list[int]] | None = None,
                transfer_syntax: str | None = None, pixel_data: bytes | None = None) -> Path:
    """A single-frame DICOM Part 10 file holding ``pixels`` (2-D, stored as 16 bits allocated).

    ``window``: (center, width); ``rescale``: (slope, intercept); ``voi_lut``: (LUTDescriptor, LUTData).
    ``transfer_syntax`` and ``pixel_data`` write already-encoded (e.g. compressed) pixel data as given."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = "P0"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "US"
    if voi_lut is not None:
        item = Dataset()
        item.add_new(0x00283002, "US", list(voi_lut[0]))  # LUTDescriptor: entries, first value mapped, bits
        item.add_new(0x00283006, "OW", np.asarray(voi_lut[1], np.uint16).tobytes())  # LUTData
        ds.VOILUTSequence = [item]
    if pixel_data is not None:
        ds.PixelData = pixel_data
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
