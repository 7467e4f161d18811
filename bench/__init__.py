"""Benchmarks. Run each as a module from the repository root: ``python -m bench.<name>``
(``bench/gguf.py`` run as a plain script would shadow the ``gguf`` package)."""
