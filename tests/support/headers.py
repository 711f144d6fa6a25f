"""CT headers as scanners write them, encoded as a C-STORE data set arrives (no file meta):
for the header reader's tests and ``benchmarks.header``."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets


def encode_dataset(ds: Dataset, *, implicit: bool = False, little: bool = True) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = little
    write_dataset(fp, ds)
    return fp.getvalue()


def plain_ct(size: int = 8) -> Dataset:
    """One slice of the demo phantom, ``size`` x ``size`` pixels."""
    phantom = make_chest_phantom(ChestSpec(rows=size, columns=size, slices=2))
    ds = slice_datasets(phantom.hu, phantom.affine, SeriesInfo(seed="header"))[0]
    del ds.file_meta
    return ds


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def vendor_ct(size: int = 8) -> Dataset:
    """A CT header as scanners write it: sequences of undefined length (nested, with undefined
    length items), private groups with long values, multi-valued and empty Type 2 attributes,
    a Latin-1 description."""
    ds = plain_ct(size)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SeriesDescription = "Thorax nativ Lunge éà 1.0 B70f"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "CT_SOM5 SPI"]
    ds.BodyPartExamined = ""  # Type 2, empty
    ds.SeriesNumber = None
    ds.ReferencedImageSequence = Sequence([
        _item(ReferencedSOPClassUID="1.2.840.10008.5.1.4.1.1.2", ReferencedSOPInstanceUID="1.2.3.4.5"),
        _item(ReferencedSOPClassUID="1.2.840.10008.5.1.4.1.1.2", ReferencedSOPInstanceUID="1.2.3.4.6"),
    ])
    ds.ReferencedImageSequence.is_undefined_length = True
    for item in ds.ReferencedImageSequence:
        item.is_undefined_length_sequence_item = True
    ds.ProcedureCodeSequence = Sequence([_item(
        CodeValue="CTCHEST", CodingSchemeDesignator="L", CodeMeaning="CT Thorax",
        ConceptNameCodeSequence=Sequence([_item(CodeValue="1", CodingSchemeDesignator="L", CodeMeaning="x")]),
    )])
    ds.ProcedureCodeSequence.is_undefined_length = True
    ds.ProcedureCodeSequence[0].ConceptNameCodeSequence.is_undefined_length = True
    ds.add_new(0x00190010, "LO", "SIEMENS CT VA1 DUMMY")
    ds.add_new(0x00191090, "OB", bytes(range(256)) * 4)
    ds.add_new(0x00290010, "LO", "SIEMENS CSA HEADER")
    ds.add_new(0x00291010, "OB", b"SV10\x04\x03\x02\x01" + bytes(900))
    return ds
