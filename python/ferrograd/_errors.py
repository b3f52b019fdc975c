"""Exception types shared by the ops."""


class DimensionError(IndexError, ValueError):
    """A ``dim`` argument out of range (an IndexError as in torch, and a ValueError)."""
