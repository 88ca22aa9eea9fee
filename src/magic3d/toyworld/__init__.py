"""Procedural toy world: captioned 3D objects with known geometry (SDFs), rendered with the
text-to-3D cameras, for training small diffusion priors and scoring text-to-3D against truth."""
