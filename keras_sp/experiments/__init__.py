"""Config-driven experiment runners and the `keras-sp` command line."""
