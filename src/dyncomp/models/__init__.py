"""Model loading and `<COMP>` token registration."""

from dyncomp.models.loading import DEFAULT_MODEL, PACKAGED_MODEL_NAME, LoadedModel, load_model
from dyncomp.models.tokens import COMP_MARKER, CompTokens, base_fingerprint, register_comp_tokens

__all__ = [
    "COMP_MARKER",
    "DEFAULT_MODEL",
    "PACKAGED_MODEL_NAME",
    "CompTokens",
    "LoadedModel",
    "base_fingerprint",
    "load_model",
    "register_comp_tokens",
]
