"""Settings: one TOML file plus ``DICOM_NODE_<SECTION>__<KEY>`` environment overrides.

Built once in ``main()`` and passed down.  Unknown keys and wrong types stop the program with
one readable line naming the key (:func:`load_settings` raises :class:`ConfigError`).
Paths (storage root, ``sqlite:`` database and broker files, model paths) may start with ``~``
(the user's home); relative ones resolve against the folder of the configuration file.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from datetime import date
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dicom_node.errors import ConfigError
from dicom_node.matching import validate_match

ENV_PREFIX = "DICOM_NODE_"
DEFAULT_CONFIG = Path("config/dicom-node.toml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_ae_title(value: str) -> str:
    if not 0 < len(value) <= 16 or "\\" in value or not value.isprintable():
        raise ValueError(f"an AE title has 1-16 printable characters without backslash, got {value!r}")
    return value


class TlsSettings(_Section):
    """DICOM TLS (PS3.15 BCP 195): TLS >= 1.2 with a server certificate."""

    certificate: Path
    private_key: Path
    #: CA bundle used to verify client certificates; set it to require them.
    ca_certificates: Path | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _client_certificates_need_a_ca(self) -> TlsSettings:
        # Without our own CA bundle, "required" would accept any publicly signed certificate.
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates (the CA that signs client certificates)")
        return self


class ListenerSettings(_Section):
    ae_title: str = "DICOM_NODE"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    #: Calling AE titles allowed to associate; empty means any.
    allowed_calling_ae_titles: list[str] = Field(default_factory=list)
    #: Reject associations whose called AE title is not ``ae_title``.
    require_called_ae_title: bool = True
    max_associations: int = Field(16, ge=1)
    #: Largest PDU we accept (0 = unlimited; DCMTK then sends 128 KiB PDUs).
    maximum_pdu_size: int = Field(0, ge=0)
    #: Whole A-ASSOCIATE-RQ (and TLS handshake) within this many seconds of the connection.
    acse_timeout: float = Field(30.0, gt=0)
    #: Whole DIMSE message (command and data set) within this many seconds of its first PDU.
    dimse_timeout: float = Field(60.0, gt=0)
    #: Next PDU within this many seconds while no DIMSE message is under way.
    network_timeout: float = Field(60.0, gt=0)
    #: Largest data set received (MiB): a bigger one aborts the association; a deflated one
    #: that inflates to more is answered 0xA700.
    max_instance_mb: int = Field(2048, ge=1)
    #: TCP connections not associated yet (A-ASSOCIATE-RQ not complete) served at once; one
    #: more sheds the oldest of them.
    max_pending_connections: int = Field(64, ge=1)
    #: Largest A-ASSOCIATE-RQ PDU accepted (KiB; 128 contexts x 13 syntaxes is 46 KiB).
    max_associate_request_kb: int = Field(64, ge=16)
    tls: TlsSettings | None = None

    _v_ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))


class StorageSettings(_Section):
    root: Path = Path("var/spool")
    #: Below this much free space (MiB) C-STORE is answered 0xA700 (out of resources).
    min_free_mb: int = Field(512, ge=0)
    #: Delivered series are removed after this many days (``dicom-node gc``); 0 keeps them.
    retention_days: float = Field(0, ge=0)
    #: How often ``serve`` runs the retention clean-up (when ``retention_days`` > 0).
    gc_interval_seconds: float = Field(3600.0, gt=0)
    #: Group (name or number) given to spool and outbox files (0640) and folders (0750), e.g.
    #: for a backup user; unset: the group of the node's process.
    group: str | None = None

    @field_validator("group")
    @classmethod
    def _group_exists(cls, value: str | None) -> str | None:
        import grp

        if value is None or value.isdigit():
            return value
        try:
            grp.getgrnam(value)
        except KeyError:
            raise ValueError(f"no group named {value!r} on this machine") from None
        return value


class DatabaseSettings(_Section):
    url: str = "sqlite:///var/dicom-node.db"


class BrokerSettings(_Section):
    url: str = "sqla+sqlite:///var/broker.db"

    @property
    def embedded(self) -> bool:
        """True for the SQLite-backed broker that ``serve`` pairs with an in-process worker."""
        return self.url.startswith("sqla+sqlite:")


class WebSettings(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    #: Bearer token for mutating API calls; unset means mutating calls are refused.
    api_token: str | None = None


class LateInstancePolicy(str, Enum):
    REPROCESS = "reprocess"
    IGNORE = "ignore"


class CompletionSettings(_Section):
    #: A series is complete after this many seconds without a new instance.
    idle_seconds: float = Field(5.0, gt=0)
    #: How often the completion loop looks at the catalog (and when an association grace ends).
    poll_seconds: float = Field(0.25, gt=0)
    late_instances: LateInstancePolicy = LateInstancePolicy.REPROCESS
    #: A sender whose last ``learn_min_series`` (or more) series each ended with the association
    #: that carried them is "learned": its series without a count complete this long after the
    #: association is released, instead of after ``idle_seconds``.
    association_grace_seconds: float = Field(0.5, ge=0)
    #: Series a sender (per rule) must have sent, none of them split over associations, before
    #: its series complete at association release.
    learn_min_series: int = Field(5, ge=1)
    #: Completed series remembered per sender and rule (the split rate is over these).
    history_size: int = Field(50, ge=1)
    #: While an association that carries a series is open, the idle timer does not complete it,
    #: for at most this many seconds without a new instance (a stalled sender).
    max_open_seconds: float = Field(600.0, gt=0)
    #: A series that announced a count (ImagesInAcquisition, or a rule's ``expected_instances``)
    #: and is idle short of it waits this much longer, then goes to the rule's ``on_incomplete``.
    incomplete_grace_seconds: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _history_holds_the_minimum(self) -> CompletionSettings:
        if self.history_size < self.learn_min_series:
            raise ValueError(f"history_size ({self.history_size}) must be at least learn_min_series "
                             f"({self.learn_min_series})")
        return self


class WorkerSettings(_Section):
    #: ``auto`` picks CUDA when ``torch.cuda.is_available()``, else CPU.
    device: str = "auto"
    #: Run a worker next to ``serve``: ``auto`` does so for the embedded SQLite broker.
    in_process: Literal["auto", "yes", "no"] = "auto"
    concurrency: int = Field(1, ge=1)
    #: Inference attempts before a job that keeps failing is ``failed``.
    max_attempts: int = Field(3, ge=1)
    soft_time_limit: float = Field(600.0, gt=0)
    time_limit: float = Field(900.0, gt=0)
    #: A job ``queued`` (or ``encoded``) this long while no worker is busy is sent to the broker
    #: again: its message was lost (broker restarted without its data).  ``running`` jobs get
    #: ``time_limit`` on top, ``delivering`` jobs ``delivery.backoff_max_seconds``.
    requeue_after_seconds: float = Field(300.0, gt=0)
    #: While a job's model runs, load the series of the job most likely to come next (one at a
    #: time, in a background thread), so the device does not wait for files to be read.  Costs
    #: at most one more volume in memory per worker process.  ``auto``: only when the models run
    #: on a GPU (on the CPU, reading competes with the model for the same cores).
    prefetch: bool | Literal["auto"] = "auto"
    #: Models each worker process keeps loaded (warm), least recently used dropped beyond it
    #: (its GPU memory given back).  At start a process loads the first ones the rules name.
    max_warm_models: int = Field(2, ge=1)


class DeliverySettings(_Section):
    #: 10 attempts, 2 s doubling to 300 s, ride out an archive that is down about 7-13 minutes.
    max_attempts: int = Field(10, ge=1)
    backoff_seconds: float = Field(2.0, ge=0)
    backoff_max_seconds: float = Field(300.0, ge=0)
    #: How often ``serve`` checks that each destination answers (shown by ``/readyz``, never a
    #: reason to be unready, and by the metric ``dicom_node_destination_reachable``).
    probe_interval_seconds: float = Field(60.0, gt=0)


class ResultsSettings(_Section):
    """Series numbers and equipment of the results.

    Each model's results get their own block of Series Numbers: ``series_number_base + 10 *
    slot + offset`` with offset 1 SEG, 2 SR, 3 GSPS, 4 KOS, 5 SC, 6/7 not-applied notice SR/SC.
    A model's slot (1..89) is a hash of its name unless ``model_series_slots`` names it.
    """

    series_number_base: int = Field(9000, ge=0, le=2**31 - 1000)
    #: Model name -> slot (1..89), to move a model whose hashed slot collides with another's.
    model_series_slots: dict[str, int] = Field(default_factory=dict)
    manufacturer: str = "dicom-node"

    @field_validator("model_series_slots")
    @classmethod
    def _slots_in_range(cls, value: dict[str, int]) -> dict[str, int]:
        bad = {name: slot for name, slot in value.items() if not 1 <= slot <= 89}
        if bad:
            raise ValueError(f"series slots are 1..89, got {bad}")
        return value


class DriftSettings(_Section):
    """Input and output drift monitoring per model and scanner (``dicom_node.drift``)."""

    #: Record each job's input and output features and evaluate drift.
    enabled: bool = True
    #: The baseline of a (model, scanner): its first this many jobs (unless ``baseline_start``).
    baseline_jobs: int = Field(200, ge=1)
    #: Instead of the first jobs, the jobs of this date range (``baseline_start <= day <
    #: baseline_end``, UTC; both or neither).
    baseline_start: date | None = None
    baseline_end: date | None = None
    #: The recent window: the last this many jobs after the baseline ...
    window_jobs: int = Field(200, ge=1)
    #: ... or, when > 0, the jobs of the last this many days.
    window_days: float = Field(0.0, ge=0)
    #: No PSI (status ``collecting``) until the recent window holds this many jobs: a PSI of
    #: small windows is mostly chance (docs/models.md gives the figures).
    min_window_jobs: int = Field(200, ge=1)
    #: Quantile bins of a numeric feature, cut at the baseline's quantiles (plus one below and
    #: one above the baseline's range).
    bins: int = Field(5, ge=2, le=50)
    #: A feature whose population stability index exceeds this raises the pair's alert.
    psi_alert: float = Field(0.25, gt=0)
    #: A tracked scanner with no series for this many days is flagged silent (0: never).
    silent_scanner_days: float = Field(7.0, ge=0)
    #: Scanners tracked one by one; later ones are counted together as ``other``.
    max_scanners: int = Field(50, ge=1, le=1000)
    #: Observations older than this are removed by the retention clean-up, except each pair's
    #: baseline (0 keeps them).
    retention_days: float = Field(365.0, ge=0)

    @model_validator(mode="after")
    def _baseline_range(self) -> DriftSettings:
        if (self.baseline_start is None) != (self.baseline_end is None):
            raise ValueError("give both baseline_start and baseline_end, or neither")
        if self.baseline_start is not None and self.baseline_end is not None \
                and self.baseline_end <= self.baseline_start:
            raise ValueError("baseline_end must be after baseline_start")
        return self


class DestinationSettings(_Section):
    name: str
    #: How results reach it: ``dicom`` (C-STORE to ae_title@host:port) or ``dicomweb`` (STOW-RS to
    #: ``url``); each is a target type of :mod:`dicom_node.delivery`.
    type: Literal["dicom", "dicomweb"] = "dicom"
    ae_title: str = ""
    host: str = ""
    port: int | None = Field(None, ge=1, le=65535)
    #: Our calling AE title towards this destination (defaults to ``listener.ae_title``).
    calling_ae_title: str | None = None
    #: Result types this destination receives (``dicom_node.results.registry``): by default all
    #: of them, so every viewer shows something (SEG/SR: OHIF, Slicer; GSPS, KOS, SC: PACS).
    outputs: list[str] = Field(default_factory=lambda: list(_default_outputs()))
    #: Send a "<model> was not applied: <reason>" SR (and SC when ``sc`` is in ``outputs``)
    #: when a routed series is refused, so no result is never read as "nothing found".
    notify_not_applied: bool = True
    #: dicomweb: the service root (``https://pacs.example/dicom-web``).
    url: str | None = None
    #: dicomweb: ``basic`` (``username`` + the password from ``password_env`` or ``password_file``)
    #: or ``bearer`` (the token from ``token_env`` or ``token_file``); never a secret in this file.
    auth: Literal["none", "basic", "bearer"] = "none"
    username: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    token_env: str | None = None
    token_file: Path | None = None
    #: dicomweb: verify the server's TLS certificate (against ``ca_bundle`` when given).
    verify_tls: bool = True
    ca_bundle: Path | None = None
    #: dicomweb: seconds to wait for the server's answer to one request.
    timeout_seconds: float = Field(60.0, gt=0)
    #: dicom: how delivery is proven. ``none`` (a C-STORE success is the evidence), ``find``
    #: (after the C-STORE, an IMAGE-level C-FIND per delivered object: present = confirmed) or
    #: ``storage-commitment`` (an N-ACTION of the Storage Commitment Push Model after the C-STORE;
    #: the archive's N-EVENT-REPORT, on the same or a new association, confirms each object).
    commitment: Literal["none", "find", "storage-commitment"] = "none"
    #: storage-commitment: seconds to keep the N-ACTION's association open for the archive's
    #: N-EVENT-REPORT (0: release at once; the report then comes on a new association).
    commitment_wait_seconds: float = Field(5.0, ge=0)
    #: storage-commitment: seconds without a report after an N-ACTION before it is sent again
    #: (same Transaction UID).
    commitment_timeout_seconds: float = Field(300.0, gt=0)
    #: storage-commitment: N-ACTION requests per transaction; after the last one times out, its
    #: objects are ``unconfirmed``.
    commitment_max_requests: int = Field(3, ge=1)
    #: storage-commitment: times an object the archive reports failed is sent again (C-STORE and
    #: a new commitment request) before it is ``unconfirmed`` with the archive's reason.
    commitment_resends: int = Field(1, ge=0)
    #: find: seconds to wait after the C-STORE before the C-FIND (archives index asynchronously).
    find_delay_seconds: float = Field(2.0, ge=0)
    #: find: the archive's query SCP when it differs from the storage SCP (default: ae_title,
    #: host, port of this destination).
    find_ae_title: str | None = None
    find_host: str | None = None
    find_port: int | None = Field(None, ge=1, le=65535)

    _v_ae = field_validator("ae_title")(classmethod(lambda cls, v: v if v == "" else _check_ae_title(v)))
    _v_find_ae = field_validator("find_ae_title")(
        classmethod(lambda cls, v: v if v is None else _check_ae_title(v)))

    @model_validator(mode="after")
    def _check_type(self) -> DestinationSettings:
        if self.type == "dicom":
            if not (self.ae_title and self.host and self.port):
                raise ValueError(f"destination {self.name!r} (type dicom) needs ae_title, host and port")
        elif not self.url or not self.url.startswith(("http://", "https://")):
            raise ValueError(f"destination {self.name!r} (type dicomweb) needs url = \"https://...\"")
        if self.auth == "basic" and not (self.username and (self.password_env or self.password_file)):
            raise ValueError(f"destination {self.name!r}: auth basic needs username and password_env or password_file")
        if self.auth == "bearer" and not (self.token_env or self.token_file):
            raise ValueError(f"destination {self.name!r}: auth bearer needs token_env or token_file")
        if self.commitment == "find" and self.type != "dicom":
            raise ValueError(f"destination {self.name!r}: commitment \"find\" needs type dicom (C-FIND)")
        if self.commitment == "storage-commitment" and self.type != "dicom":
            raise ValueError(f"destination {self.name!r}: commitment \"storage-commitment\" needs type dicom "
                             "(N-ACTION)")
        return self

    @property
    def query_scp(self) -> DestinationSettings:
        """The C-FIND peer of ``commitment = "find"``: ``find_*`` over this destination's own."""
        return self.model_copy(update={
            "ae_title": self.find_ae_title or self.ae_title,
            "host": self.find_host or self.host,
            "port": self.find_port or self.port,
        })

    @property
    def address(self) -> str:
        """Where it is, for messages: ``AE@host:port`` or the DICOMweb URL."""
        return f"{self.ae_title}@{self.host}:{self.port}" if self.type == "dicom" else str(self.url)

    @field_validator("outputs")
    @classmethod
    def _known_outputs(cls, value: list[str]) -> list[str]:
        from dicom_node.results.registry import output_names

        known = output_names()
        unknown = [v for v in value if v not in known]
        if unknown:
            raise ValueError(f"unknown output types {unknown}; known: {', '.join(known)}")
        if not value:
            raise ValueError(f"outputs must name at least one of {', '.join(known)}")
        return list(dict.fromkeys(value))


def _default_outputs() -> tuple[str, ...]:
    from dicom_node.results.registry import DEFAULT_OUTPUTS

    return DEFAULT_OUTPUTS


class Priority(str, Enum):
    NORMAL = "normal"
    URGENT = "urgent"


class RuleSettings(_Section):
    name: str
    #: Attribute -> expected value.  Strings match exactly (case-insensitive); ``/regex/``
    #: matches a regular expression; ``[min, max]`` is a numeric range.
    match: dict[str, Any] = Field(default_factory=dict)
    models: list[str] = Field(min_length=1)
    destinations: list[str] = Field(default_factory=list)
    priority: Priority = Priority.NORMAL
    #: For senders whose series announce no count (no ImagesInAcquisition): a series this rule
    #: matches is complete as soon as the association that sent it is released with at least
    #: this many instances, without waiting ``completion.idle_seconds``.
    expected_instances: int | None = Field(None, ge=1)
    #: When a series this rule matches is complete: ``learn`` (at association release once the
    #: sender is known never to split series, else counts and the idle timer), ``association``
    #: (always at release plus ``completion.association_grace_seconds``), ``idle`` (never at
    #: release without a count: counts and the idle timer only).
    completion: Literal["learn", "association", "idle"] = "learn"
    #: A series short of its announced count after ``completion.incomplete_grace_seconds``:
    #: ``process`` it with a note (series, job events, log), or ``refuse`` it (note, no job).
    on_incomplete: Literal["process", "refuse"] = "process"
    #: ``live``: results go to ``destinations``.  ``shadow``: the models run on the same traffic,
    #: their results are encoded and kept in the node's outbox but never sent anywhere (the
    #: rule's ``destinations`` are ignored), and they are compared with the live models that ran
    #: on the same series (``dicom-node shadow report``).  Promoting is setting ``live`` again.
    mode: Literal["live", "shadow"] = "live"


class CodeSettings(_Section):
    """A coded concept as the configuration spells it (``{ value, scheme, meaning }``)."""

    value: str = Field(min_length=1, max_length=16)
    scheme: str = Field(min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)


class ModelLabelSettings(_Section):
    """Codes for one label index of a MONAI bundle or nnU-Net model (overrides the defaults)."""

    index: int = Field(ge=0)
    name: str | None = None
    category: CodeSettings | None = None
    type: CodeSettings | None = None
    kind: Literal["region", "lesion"] | None = None
    color: tuple[int, int, int] | None = None

    @model_validator(mode="after")
    def _codes_together(self) -> ModelLabelSettings:
        if (self.category is None) != (self.type is None):
            raise ValueError(f"label {self.index}: give both category and type, or neither")
        if self.color is not None and not all(0 <= c <= 255 for c in self.color):
            raise ValueError(f"label {self.index}: color must be three integers 0-255, got {list(self.color)}")
        return self


_NNUNET_KEYS = ("folds", "checkpoint", "orientation", "mirroring", "tile_step_size")
#: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
_DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"


class ModelSettings(_Section):
    """One ``[[models]]`` entry: exactly one of ``path`` (TorchScript folder + ``model.toml``),
    ``bundle`` (MONAI bundle folder) or ``nnunet`` (nnU-Net v2 result folder)."""

    name: str
    path: Path | None = None
    bundle: Path | None = None
    nnunet: Path | None = None
    #: Overrides the version the model gives (bundle metadata ``version``; nnU-Net has none:
    #: ``sha256-`` and the first 12 hex digits of its weights' digest).
    version: str | None = Field(None, min_length=1, max_length=32)
    #: Bundle only: ``"model.pt"`` or ``"model.ts"`` in ``models/`` (default: model.pt if present).
    weights: str | None = None
    #: nnU-Net only: folds to average (default: every ``fold_*`` with the checkpoint).
    folds: list[int | Literal["all"]] | None = Field(None, min_length=1)
    checkpoint: str = "checkpoint_final.pth"
    orientation: Literal["RAS", "native"] = "RAS"
    mirroring: bool = True
    tile_step_size: float = Field(0.5, gt=0.0, le=1.0)
    labels: list[ModelLabelSettings] = Field(default_factory=list)
    #: Where the model runs: ``auto`` (the worker's ``[worker] device``), ``cpu``, ``cuda``,
    #: ``cuda:N``.  A worker without that device fails the model's jobs with the reason.
    device: str = Field("auto", pattern=_DEVICE_PATTERN)
    #: Patches per network call in the sliding window (MONAI's ``sw_batch_size``); default: the
    #: bundle's own inferer setting, 1 for a TorchScript card.  Not for nnU-Net (one tile a call).
    batch_size: int | None = Field(None, ge=1, le=256)
    #: Mixed precision: float16 autocast on CUDA, off on the CPU.  Default: the bundle's own
    #: ``amp`` (its inference config), the card's ``[inference] amp``.  Not for nnU-Net (it
    #: always autocasts on CUDA).
    amp: bool | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelSettings:
        given = [k for k in ("path", "bundle", "nnunet") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"model {self.name!r} needs exactly one of path, bundle, nnunet (got {', '.join(given) or 'none'})"
            )
        if self.nnunet is None:
            wrong = [k for k in _NNUNET_KEYS if k in self.model_fields_set]
            if wrong:
                raise ValueError(f"model {self.name!r}: {', '.join(wrong)} apply to nnunet models only")
        else:
            wrong = [k for k in ("batch_size", "amp") if getattr(self, k) is not None]
            if wrong:
                raise ValueError(f"model {self.name!r}: {', '.join(wrong)} do not apply to nnU-Net models "
                                 f"(nnU-Net predicts one tile at a time, with autocast on CUDA)")
        if self.bundle is None and self.weights is not None:
            raise ValueError(f"model {self.name!r}: weights applies to bundle models only")
        if self.path is not None and self.labels:
            raise ValueError(f"model {self.name!r}: a TorchScript model's labels are in its model.toml")
        return self

    @property
    def kind(self) -> str:
        """``"torchscript"``, ``"monai-bundle"`` or ``"nnunet"``."""
        return "monai-bundle" if self.bundle is not None else "nnunet" if self.nnunet is not None else "torchscript"

    @property
    def source(self) -> Path:
        """The model's folder."""
        folder = self.bundle or self.nnunet or self.path
        assert folder is not None  # _one_source
        return folder

    def options(self) -> dict[str, Any]:
        """The kind's own loader options (for ``inference.user_models.configured_model_factory``)."""
        if self.kind == "monai-bundle":
            return {"weights": self.weights, "batch_size": self.batch_size, "amp": self.amp}
        if self.kind == "nnunet":
            return {k: getattr(self, k) for k in _NNUNET_KEYS}
        return {"batch_size": self.batch_size, "amp": self.amp}

    def factory(self) -> Any:
        """The registry factory of this model (MONAI / nnU-Net load when a worker calls it)."""
        from inference.labels import LabelOverride
        from inference.prediction import Code, SegmentKind
        from inference.user_models import configured_model_factory

        def code(c: CodeSettings | None) -> Code | None:
            return None if c is None else Code(c.value, c.scheme, c.meaning)

        labels = tuple(
            LabelOverride(
                index=lab.index, name=lab.name, category=code(lab.category), type=code(lab.type),
                kind=SegmentKind(lab.kind) if lab.kind else None, color=lab.color,
            )
            for lab in self.labels
        )
        return configured_model_factory(
            self.kind, self.source, name=self.name, version=self.version, labels=labels, **self.options()
        )


class Settings(BaseSettings):
    """The whole configuration of a node (and of its workers)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    listener: ListenerSettings = Field(default_factory=ListenerSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    completion: CompletionSettings = Field(default_factory=CompletionSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    results: ResultsSettings = Field(default_factory=ResultsSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    destinations: list[DestinationSettings] = Field(default_factory=list)
    rules: list[RuleSettings] = Field(default_factory=list)
    models: list[ModelSettings] = Field(default_factory=list)
    #: Folder of the configuration file; relative paths were resolved against it.
    config_dir: Path = Path(".")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file (passed as init kwargs).
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _check_references(self) -> Settings:
        names = [d.name for d in self.destinations]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"destination names must be unique, repeated: {sorted(dupes)}")
        for rule in self.rules:
            validate_match(rule.name, rule.match)
            unknown = [d for d in rule.destinations if d not in names]
            if unknown:
                raise ValueError(f"rule {rule.name!r} names unknown destinations {unknown}")
        return self

    def destination(self, name: str) -> DestinationSettings:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)

    @property
    def run_in_process_worker(self) -> bool:
        if self.worker.in_process == "auto":
            return self.broker.embedded
        return self.worker.in_process == "yes"

    @property
    def outbox(self) -> Path:
        """Where encoded results wait for delivery (next to the spool)."""
        return self.storage.root.parent / "outbox"


_SQLITE_URL = re.compile(r"^(?P<scheme>(sqla\+)?sqlite(\+\w+)?:///)(?P<path>[^?]*)(?P<query>\?.*)?$")


def _resolve_url(url: str, base: Path) -> str:
    """Make the file path of a ``sqlite:///relative`` URL absolute against ``base``."""
    m = _SQLITE_URL.match(url)
    if not m or not m.group("path") or m.group("path") == ":memory:":
        return url
    path = Path(m.group("path")).expanduser()
    if not path.is_absolute():
        path = (base / path).resolve()
    return f"{m.group('scheme')}{path}{m.group('query') or ''}"


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    storage = data.get("storage")
    if isinstance(storage, dict) and isinstance(storage.get("root"), str):
        root = Path(storage["root"]).expanduser()
        storage["root"] = str(root if root.is_absolute() else (base / root).resolve())
    for section in ("database", "broker"):
        sec = data.get(section)
        if isinstance(sec, dict) and isinstance(sec.get("url"), str):
            sec["url"] = _resolve_url(sec["url"], base)
    for model in data.get("models") or []:
        for key in ("path", "bundle", "nnunet"):
            if isinstance(model, dict) and isinstance(model.get(key), str):
                p = Path(model[key])
                model[key] = str(p if p.is_absolute() else (base / p).resolve())
    tls = (data.get("listener") or {}).get("tls")
    if isinstance(tls, dict):
        for key in ("certificate", "private_key", "ca_certificates"):
            if isinstance(tls.get(key), str):
                p = Path(tls[key])
                tls[key] = str(p if p.is_absolute() else (base / p).resolve())
    return data


def _env_overrides(sources: dict[str, str] | None = None) -> dict[str, Any]:
    """Environment overrides as a nested dict, so they pass through path resolution too.

    ``sources`` (when given) receives, for each overridden key (``listener.port``), the name of
    the variable that set it, so an error can name the variable instead of the file.
    """
    out: dict[str, Any] = {}
    for key, raw in os.environ.items():
        if not key.startswith(ENV_PREFIX) or key.startswith(ENV_PREFIX + "TEST_"):
            continue
        value: Any = raw
        if raw[:1] in "[{":  # lists and tables are given as JSON
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{key}: not valid JSON: {exc}") from None
        section, _, name = key[len(ENV_PREFIX):].lower().partition("__")
        if name:
            out.setdefault(section, {})[name] = value
        elif section in ("destinations", "rules", "models"):
            out[section] = value
        else:
            continue
        if sources is not None:
            sources[f"{section}.{name}" if name else section] = key
    return out


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed where ``loc`` points (``("listener", "prot")`` -> ListenerSettings' fields)."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field_info = model.model_fields.get(str(part))
        if field_info is None:
            return []
        inner = _model_in(field_info.annotation)
        if inner is None:
            return []
        model = inner
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The settings model inside an annotation (``X``, ``list[X]``, ``X | None``), if any."""
    import typing

    candidates = [annotation, *typing.get_args(annotation)]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
        for inner in typing.get_args(candidate):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def format_validation_error(exc: ValidationError, env_sources: dict[str, str] | None = None) -> str:
    """One readable line per problem, naming the key (``listener.port: ...``), or the environment
    variable that set it; an unknown key gets the nearest known one ("did you mean ...?")."""
    import difflib

    lines = []
    for err in exc.errors():
        parts = tuple(p for p in err["loc"] if p not in ("function-after[_check_references(), Settings]",))
        loc = ".".join(str(p) for p in parts)
        msg = err["msg"]
        # pydantic prefixes the text of a ValueError raised by a validator; the node's own words suffice.
        msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            close = difflib.get_close_matches(str(parts[-1]), _known_keys(Settings, parts), n=1) if parts else []
            if close:
                msg += f" (did you mean {close[0]}?)"
        if "input" in err and err["type"] not in ("extra_forbidden", "missing") and not isinstance(err["input"], dict):
            msg += f" (got {err['input']!r})"
        variable = (env_sources or {}).get(loc) or (env_sources or {}).get(str(parts[0]) if parts else "")
        where = f"{variable} (environment, {loc})" if variable else loc
        lines.append(f"{where}: {msg}" if where else msg)
    return "; ".join(lines)


def load_settings(path: Path | str | None = None, *, overrides: dict[str, Any] | None = None) -> Settings:
    """Read the TOML file at ``path`` (default ``config/dicom-node.toml`` if present), apply
    ``DICOM_NODE_*`` environment overrides, resolve relative paths and validate.

    Raises
    ------
    ConfigError
        With one line naming each offending key.
    """
    data: dict[str, Any] = {}
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"configuration file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        base = path.resolve().parent
    env_sources: dict[str, str] = {}
    for layer in (_env_overrides(env_sources), overrides or {}):
        for section, values in layer.items():
            if isinstance(values, dict) and isinstance(data.get(section), dict):
                data[section].update(values)
            else:
                data[section] = values
    data = _resolve_paths(data, base)
    data["config_dir"] = str(base)
    try:
        # Environment values were merged above (so their paths resolve); keep pydantic's own
        # env source from reading them a second time.
        return Settings(_env_prefix="DICOM_NODE_IGNORED_", **data)
    except ValidationError as exc:
        text = format_validation_error(exc, env_sources)
        where = f"{path}: " if path and "(environment, " not in text else ""
        raise ConfigError(f"{where}{text}") from None
