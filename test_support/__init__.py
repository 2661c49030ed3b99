"""Helpers shared by ``tests/`` and ``benchmarks/``: one copy each, never shipped (``pyproject.toml`` packages only
``reflect_trainer``). Importable from the repository root: pytest puts it on ``sys.path`` (``pythonpath`` in
setup.cfg), benchmarks run with ``PYTHONPATH=.``, and subprocesses that import this package get the root on their
``PYTHONPATH``.

* :mod:`test_support.oracles`: scripted and counting oracles (fault injection, "zero oracle calls" proofs).
* :mod:`test_support.data`: the real AlpacaEval pairs the tests recycle, and the injected basil pair.
* :mod:`test_support.recycling`: one ``Recycler`` over one data set, as the recycling tests run it.
* :mod:`test_support.students`: the tiny student and the ``SFTConfig`` the trainer tests train with.
* :mod:`test_support.cache_files`: the cache's records as they lie on disk, segment by segment.
* :mod:`test_support.cache_workload`: the scripted cache workload the cache fault tests and harness run as processes.
* :mod:`test_support.http_server`: a scripted OpenAI-compatible loopback server that injects faults.
"""
