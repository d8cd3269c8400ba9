"""End-to-end encrypted store-and-forward messages between identities, through a mailbox."""
