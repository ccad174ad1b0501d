"""The backbone families: their descriptions (``families``) and their code (``registry``)."""
