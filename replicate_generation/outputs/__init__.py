"""Prediction outputs, from the model's answer to a file on disk.

names, formats (the real extension), sources and downloads (the bytes), saving (atomic, under the
root), placement (no-clobber), shapes (non-curated outputs); base: shared types and errors.
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

__all__ = [
    "IF_EXISTS_CHOICES",
    "DownloadError",
    "IfExists",
    "OutputNames",
    "SavedFile",
    "check_if_exists",
    "default_stem",
    "is_empty",
    "output_sources",
    "place_without_clobbering",
    "replace_into",
    "safe_filename",
    "save_any",
    "save_outputs",
    "sniff_extension",
]
