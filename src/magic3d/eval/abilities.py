"""What a scene can do, found by probing its attributes.

Each probe is one function so that the scene protocol's declared methods can replace it in
one place; nothing else in the evaluator looks at a scene's attributes.
"""

from __future__ import annotations

from typing import Any


def can_extract_mesh(scene: Any) -> bool:
    """A mesh scene (DMTet): ``extract_mesh()`` gives its surface as triangles."""
    return callable(getattr(scene, "extract_mesh", None))


def can_query_density(scene: Any) -> bool:
    """A density scene (NeRF): ``density(points)`` gives its volume density."""
    return callable(getattr(scene, "density", None))


def scene_radius(scene: Any) -> float:
    """Half the side of the box [-radius, radius]^3 the scene lives in (1 when it says nothing)."""
    return float(getattr(scene, "radius", 1.0))
