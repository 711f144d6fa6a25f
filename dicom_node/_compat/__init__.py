"""Every use of a library's private or unstable names, one module per library.

An upgrade of pynetdicom, highdicom or kombu that renames or reshapes one of these names breaks
``tests/unit/test_compat.py`` instead of the node, silently, in production.
"""
