"""Batch arrays: one command per task id or value over many machines (``rawvm.batch``, ``rawvm batch ...``).

``array`` launches and retries, ``plan`` turns ids, files and ``# rawvm:`` headers into a spec, ``watch``
follows a running array and merges what the machines and their sink say.
"""
