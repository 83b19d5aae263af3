"""dyncomp: a language model that compresses its own key/value cache while it reasons."""

from dyncomp.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
