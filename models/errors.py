"""Errors of the export path, in a module of their own so that models/export.py and models/stock.py (which export
calls) both raise them without importing each other."""


class ExportError(ValueError):
    """An export that cannot be done or a directory that is not a complete export; names the file or key."""
