"""Command-line tools beside the two entry scripts (run them as ``python scripts/<name>.py``).

A package only so that ``scripts.bench`` imports as one, ahead of any ``scripts`` module an
installed distribution may bring.
"""
