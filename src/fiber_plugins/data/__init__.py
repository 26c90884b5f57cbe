"""Data sets that ship inside packages (no downloads)."""
