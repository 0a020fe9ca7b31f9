"""napari widgets. Thin: the model core runs in thread workers; no model code lives here.

Nothing heavy is imported at package import time (napari imports the widget modules lazily
through the manifest), and torch_geometric/triton stay off these import paths (triton imported
after napari has an OpenGL context segfaults).
"""
