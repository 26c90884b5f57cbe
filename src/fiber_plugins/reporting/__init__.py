"""Pages made from fiber results: ``fiber-plugins report`` (:mod:`.report`) and its HTML builder.

The sample grid itself is drawn by :mod:`fiber_plugins.grid`.
"""
