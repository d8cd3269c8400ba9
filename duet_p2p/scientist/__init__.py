"""The scientist's side: the session, pointers, the remote store and torch, plans, DP.

``session`` holds the connection and the requests; ``pointer``, ``plans``,
``remote_torch``, ``remote_store`` and ``dp`` see it only through ``protocol.SessionCore``,
so imports here only ever point down. Nothing here imports the owner's side.
"""
