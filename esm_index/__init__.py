"""esm-index: which public datasets to fine-tune on first, ranked by ESM-LogME from an index.

Names are imported lazily (PEP 562) so that ``import esm_index`` and ``esm-index --help``
do not pay for torch, transformers and faiss.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "LabelledData": "data", "load_labelled": "data",
    "EmbeddingSpec": "embed", "Embedder": "embed",
    "EsmIndexError": "errors", "DataFileError": "errors", "IndexStoreError": "errors", "InvalidESMError": "errors",
    "InvalidTargetError": "errors", "ModelMismatchError": "errors", "UnsafeFileError": "errors",
    "InvalidArgumentError": "errors", "SourceExistsError": "errors", "NoSourcesError": "errors",
    "ESM": "esm", "fit_ridge": "esm", "fit_sgd": "esm",
    "Filters": "results", "Query": "results", "Ranking": "results", "Result": "results", "SourceIndex": "index",
    "Client": "client", "ServiceError": "client",
    "TargetStats": "logme", "score_esms": "logme",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'esm_index' has no attribute {name!r}")
