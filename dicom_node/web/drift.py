"""``/api/drift``: the drift monitor's report for the dashboard panel and for scripts.

No patient data: scanners are named by Manufacturer, model name, station (cut to 16
characters) and a normalised protocol; values are binned shares, never a series' identity.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from dicom_node.drift.monitor import DriftMonitor, DriftReport
from dicom_node.settings import DriftSettings


class FeatureOut(BaseModel):
    feature: str = Field(description="input.* (acquisition) or output.* (what the model said).")
    kind: str = Field(description="numeric (baseline quantile bins) or categorical.")
    psi: float = Field(description="Population stability index, recent window against the baseline.")
    alert: bool
    bins: list[str]
    baseline: list[float] = Field(description="Share of the baseline in each bin.")
    recent: list[float] = Field(description="Share of the recent window in each bin.")


class PairOut(BaseModel):
    model: str
    scanner: str = Field(description="The scanner's short label (also the metrics' label).")
    status: str = Field(description="collecting, stable or drift.")
    alert: bool
    baseline_jobs: int
    recent_jobs: int
    max_psi: float | None
    worst_feature: str | None
    features: list[FeatureOut]


class ScannerOut(BaseModel):
    label: str
    manufacturer: str
    model_name: str
    station: str
    protocol: str
    first_seen: float
    last_seen: float
    silent: bool


class DriftOut(BaseModel):
    enabled: bool
    generated_at: float
    psi_alert: float
    silent_scanner_days: float
    baseline: str = Field(description="How the baseline window is chosen.")
    window: str = Field(description="How the recent window is chosen.")
    alerts: int = Field(description="Pairs whose PSI exceeds psi_alert on some feature.")
    silent: int = Field(description="Scanners silent for silent_scanner_days.")
    pairs: list[PairOut]
    scanners: list[ScannerOut]


def describe(settings: DriftSettings) -> tuple[str, str]:
    """The baseline and recent windows in words."""
    if settings.baseline_start is not None:
        baseline = f"jobs from {settings.baseline_start} to {settings.baseline_end}"
    else:
        baseline = f"first {settings.baseline_jobs} jobs"
    window = f"last {settings.window_days:g} days" if settings.window_days > 0 else f"last {settings.window_jobs} jobs"
    return baseline, window + f" (at least {settings.min_window_jobs})"


def drift_out(report: DriftReport, settings: DriftSettings) -> DriftOut:
    """The API's view of a report: drifting pairs first, then by model and scanner."""
    baseline, window = describe(settings)
    pairs = []
    for p in sorted(report.pairs, key=lambda p: (not p.alert, p.model, p.scanner)):
        worst = p.worst
        pairs.append(PairOut(
            model=p.model, scanner=p.scanner, status=p.status, alert=p.alert, baseline_jobs=p.baseline_n,
            recent_jobs=p.recent_n, max_psi=worst.psi if worst else None,
            worst_feature=worst.feature if worst else None,
            features=[FeatureOut(feature=f.feature, kind=f.kind, psi=f.psi, alert=f.alert, bins=f.bins,
                                 baseline=f.baseline, recent=f.recent)
                      for f in sorted(p.features, key=lambda f: -f.psi)]))
    scanners = [ScannerOut(label=s.label, manufacturer=s.manufacturer, model_name=s.model_name, station=s.station,
                           protocol=s.protocol, first_seen=s.first_seen, last_seen=s.last_seen, silent=s.silent)
                for s in report.scanners]
    return DriftOut(enabled=settings.enabled, generated_at=report.generated_at, psi_alert=settings.psi_alert,
                    silent_scanner_days=settings.silent_scanner_days, baseline=baseline, window=window,
                    alerts=len(report.alerts), silent=len(report.silent), pairs=pairs, scanners=scanners)


def create_drift_router(monitor: DriftMonitor) -> APIRouter:
    """``GET /api/drift``."""
    router = APIRouter(prefix="/api")

    @router.get("/drift", response_model=DriftOut, tags=["operations"],
                summary="Input and output drift per model and scanner (PSI), and silent scanners")
    def drift() -> DriftOut:
        return drift_out(monitor.report(), monitor.settings)

    return router
