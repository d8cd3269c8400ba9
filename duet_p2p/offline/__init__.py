"""Offline jobs: signed job documents, host-signed receipts and the job lifecycle."""
