"""Operations web app: dashboard, REST API, ``/metrics``, ``/healthz`` and ``/readyz``.

``create_app`` builds the FastAPI app; ``WebServer`` runs it with uvicorn in a background thread.
"""

from dicom_node.web.app import create_app, readiness_checks
from dicom_node.web.server import WebServer

__all__ = ["WebServer", "create_app", "readiness_checks"]
