"""Model families. Importing this package registers the bundled families."""

from mu2net.models.base import (
    Family,
    FamilyError,
    apply_split,
    family_names,
    get_family,
    num_params,
    register_family,
    shape_signature,
)

__all__ = [
    "Family",
    "FamilyError",
    "apply_split",
    "family_names",
    "get_family",
    "num_params",
    "register_family",
    "shape_signature",
]
