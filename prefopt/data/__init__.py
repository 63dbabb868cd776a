"""The data layer: read preference files, convert every row to standard strings, and tokenize pairs.

``load_pairs`` / ``load_hub_pairs`` -> standard rows ``{"prompt", "chosen", "rejected"}`` plus stats;
``tokenize_pairs`` -> ``{"prompt_ids", "chosen_ids", "rejected_ids", "truncated"}`` plus stats. Every data problem
is a one-line :class:`DataError` naming the file, the row and the field.
"""

from .errors import DataError
from .formats import detect_format, to_standard
from .loading import load_hub_pairs, load_pairs, load_rows
from .tokenize import tokenize_pair, tokenize_pairs

__all__ = [
    "DataError",
    "detect_format",
    "load_hub_pairs",
    "load_pairs",
    "load_rows",
    "to_standard",
    "tokenize_pair",
    "tokenize_pairs",
]
