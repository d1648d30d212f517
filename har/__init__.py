"""The ``har`` command: one entry point with a subcommand per role."""
