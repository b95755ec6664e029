"""Data: importers and the procedural generator (prepare), the prepared format, episodes and samplers (splits)."""
