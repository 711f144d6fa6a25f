"""Input and output drift monitoring per model and scanner.

``features`` turns a finished job (source headers, volume, prediction) into a flat dict of
features, ``scanners`` names the scanner that made the series, ``psi`` is the population
stability index (pure maths), ``monitor`` compares each (model, scanner)'s baseline with its
recent window and flags silent scanners, ``prometheus`` exposes the result on ``/metrics``.
The SQL is in ``dicom_node.catalog.drift``.
"""
