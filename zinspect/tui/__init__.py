"""The Textual app (the only part of zinspect that imports textual)."""
