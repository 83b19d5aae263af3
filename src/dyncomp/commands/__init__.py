"""Subcommands of the `dyncomp` command line."""
