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
