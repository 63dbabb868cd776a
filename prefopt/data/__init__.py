"""The data layer, in one place: read preference files, convert every row to standard strings, tokenize pairs, and
prepare a run's train/eval split (with the tokenized-data cache).

``load_pairs`` / ``load_hub_pairs`` -> standard rows ``{"prompt", "chosen", "rejected"}`` plus stats;
``tokenize_pairs`` -> ``{"prompt_ids", "chosen_ids", "rejected_ids", "truncated"}`` plus stats;
``prefopt.data.prepare.prepare_data(DataSettings, tokenizer, cache_dir)`` -> ``PreparedData``. The embedded
synthetic task is ``prefopt.data.synthetic``; pairs sampled from a policy and labelled by a gold reward
(``data=sampled``) are ``prefopt.data.sampled``. Every data problem is a one-line :class:`DataError` naming the file,
the row and the field.
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
