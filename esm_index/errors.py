"""Typed errors. Every problem a user can cause is one of these, so the CLI can print a
single line and exit 2, and API callers can catch ``EsmIndexError`` alone."""


class EsmIndexError(Exception):
    """Base class of every error esm-index raises on bad input or a bad index."""


class InvalidTargetError(EsmIndexError, ValueError):
    """The target (texts + labels) cannot be scored: empty, one class, bad labels..."""


class InvalidESMError(EsmIndexError, ValueError):
    """An ESM has the wrong shape, non-finite weights, or an unreadable file."""


class ModelMismatchError(EsmIndexError, ValueError):
    """An ESM or embedding was made for another base model, pooling or dimension."""


class UnsafeFileError(EsmIndexError):
    """A file would need unpickling (e.g. ``pytorch_model.bin``); we never unpickle."""


class DataFileError(EsmIndexError):
    """A data file is missing, unreadable, or lacks the requested columns."""


class IndexStoreError(EsmIndexError):
    """The index folder is missing, corrupt, or of an unknown schema."""


class InvalidArgumentError(EsmIndexError, ValueError):
    """An option is out of range or conflicts with another (``epochs=0``, shortlist < top...)."""


class SourceExistsError(EsmIndexError):
    """A source of that name is in the index already (pass ``replace`` to overwrite it)."""


class NoSourcesError(EsmIndexError):
    """Nothing to rank: the filters match no source of the index."""


def plural(count: int, word: str, many: str | None = None) -> str:
    """'1 source', '2 sources': messages are read by people ("1 sources" reads as a bug)."""
    return f"{count} {word if count == 1 else many or word + 's'}"
