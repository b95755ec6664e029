"""ONNX export, runtime check and standalone edge inference (``export/infer.py`` and the image reader it shares with
the prepare stage, ``export/image_reader.py``, import no torch and no metaseg)."""
