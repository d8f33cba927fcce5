"""The central server (see broker.py)."""
