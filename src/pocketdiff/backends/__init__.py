"""Runtimes other than torch for exported models (``pocketdiff generate --backend``)."""
