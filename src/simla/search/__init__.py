"""Search a collection of images with a SIMLA checkpoint: index, query by text or image, ITM re-ranking.

    from simla.search import Index
    index = Index.build("photos/", "photos.idx", checkpoint="simla.safetensors")
    hits = index.search(text="a dog on a beach", k=20, rerank=100)
    index.update()   # later: embeds only new and changed files
"""

from .build import SyncSummary
from .fingerprint import ModelMismatchError, model_fingerprint
from .index import Index, IndexExistsError, IndexNotFoundError, SearchError
from .precision import PrecisionMismatchError
from .results import Hit

__all__ = ["Hit", "Index", "IndexExistsError", "IndexNotFoundError", "ModelMismatchError", "PrecisionMismatchError",
           "SearchError", "SyncSummary", "model_fingerprint"]
