"""What the model sees: Grad-CAM maps per word and per caption, and concept tags (`simla explain`)."""

from .concepts import ConceptTags, MissingConceptHead, concepts, has_concept_head
from .gradcam import Explanation, gradcam, upsample_map

__all__ = ["ConceptTags", "Explanation", "MissingConceptHead", "concepts", "gradcam", "has_concept_head",
           "upsample_map"]
