"""Procedural toy world: captioned 3D objects with known geometry, rendered like text-to-3D.

- ``shapes``: objects as signed distance functions (primitives and asymmetric composites),
  colours, captions, occupancy and surface samples.
- ``render``: vectorised sphere tracing of a shape for a ``CameraBatch`` with the
  text-to-3D soft shading, backgrounds and supersampling.
- ``dataset``: seeded image sets (image, caption, labels), shards on disk, and ground-truth
  views for evaluating text-to-3D results.
"""
