"""Notebook front end: HTML renderings and the live training panel (IPython + matplotlib)."""
