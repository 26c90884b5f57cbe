"""The ``fiber-plugins`` command line."""
