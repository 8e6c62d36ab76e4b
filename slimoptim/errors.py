"""Errors shared by the state-dict, checkpoint and distributed layers."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this model or optimizer; says what mismatches."""
