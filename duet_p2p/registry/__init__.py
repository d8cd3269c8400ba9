"""The OpenGrid registry: signed listings of datasets and models held by standing hosts."""
