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

# Importing a family module registers it (get_family imports this package first).
from mu2net.models import (
    bert,  # noqa: F401,E402
    efficientnet,  # noqa: F401,E402
    multipath,  # noqa: F401,E402  (registers multipath:<family> twins)
    vit,  # noqa: F401,E402  (registers the family)
)
