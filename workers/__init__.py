"""Celery glue: the app, its configuration and thin tasks that call ``dicom_node``/``inference``."""
