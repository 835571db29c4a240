"""Operating runs: ``msif status``, the one-screen summary that ends every command, ``msif nightly``."""
