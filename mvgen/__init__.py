"""The ``mvgen`` command: the root of the package graph, dispatching to ``engine``, ``export`` and ``server``."""
