"""Prediction outputs, from the model's answer to a stored file.

names, formats (the real extension), sources and downloads (the bytes), saving (atomic, under the
root), placement (no-clobber), shapes (non-curated outputs); storage: where files end up (the disk,
or a bucket: s3); base: shared types and errors.
"""

from replicate_generation.outputs.base import DownloadError, SavedFile
from replicate_generation.outputs.formats import sniff_extension
from replicate_generation.outputs.names import default_stem, safe_filename
from replicate_generation.outputs.placement import (
    IF_EXISTS_CHOICES,
    IfExists,
    OutputNames,
    check_if_exists,
    place_without_clobbering,
    replace_into,
)
from replicate_generation.outputs.saving import save_outputs
from replicate_generation.outputs.shapes import is_empty, save_any
from replicate_generation.outputs.sources import output_sources
from replicate_generation.outputs.storage import (
    ChecksumMismatch,
    DiskStorage,
    FileInfo,
    Opened,
    OutputStorage,
    OutputStoreUnavailable,
    copy_out,
    local_copies,
)

__all__ = [
    "IF_EXISTS_CHOICES",
    "ChecksumMismatch",
    "DiskStorage",
    "DownloadError",
    "FileInfo",
    "IfExists",
    "Opened",
    "OutputNames",
    "OutputStorage",
    "OutputStoreUnavailable",
    "SavedFile",
    "check_if_exists",
    "copy_out",
    "default_stem",
    "is_empty",
    "local_copies",
    "output_sources",
    "place_without_clobbering",
    "replace_into",
    "safe_filename",
    "save_any",
    "save_outputs",
    "sniff_extension",
]
