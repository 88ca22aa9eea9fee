"""Offline HTML viewer of finished runs (``magic3d view RUN``): each stage's exported mesh with
orbit controls, beside its turntable video and its evaluation metrics (``page.py``).

The page opens from disk with no server and no network: ``viewer.js`` and the vendored
three.js bundle (``vendor/``, with its license and provenance) are copied next to it.
"""
