"""The OpenGrid registry server: stores signed listings of datasets and models held by
standing hosts, their edits, deletions and heartbeats, and searches them.

Nothing here imports torch: the registry reads listings with
:mod:`duet_p2p.registry.listing` alone.
"""
