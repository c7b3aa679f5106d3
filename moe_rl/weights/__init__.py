"""Training layout -> inference layout: the weight sync.

``plan.py`` (what goes where, plain data) -> ``export.py`` (the stream of buckets on the
live sharded model) -> ``transport/`` (disk, tensor, distributed: SGLang's three update
calls) -> ``verify.py`` + ``probe.py`` (checksums, versions, a log-prob probe) ->
``sync.py`` (pause -> flush -> update -> continue, every engine or none).
"""
