"""Weight import and export: one name map (names.py) shared by the GGUF and HF readers."""
