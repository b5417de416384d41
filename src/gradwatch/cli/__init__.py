"""Command-line entry point; see `gradwatch --help`."""
