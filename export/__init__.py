"""ONNX export, runtime check and standalone edge inference (``export/infer.py`` imports no torch and no metaseg)."""
