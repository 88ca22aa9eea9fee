"""magic3d: a modular PyTorch Lightning toolkit for Magic3D-style text-to-3D."""

__version__ = "0.1.0"
