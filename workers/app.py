"""The Celery app, configured from dicom-node settings.

``create_celery_app(settings)`` builds it; ``celery -A workers.app worker`` finds a default
app built from ``$DICOM_NODE_CONFIG`` (or ``config/dicom-node.toml``) on first access.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from kombu import Queue  # type: ignore[attr-defined]  # kombu has no type hints

from dicom_node._compat import kombu as sqla_transport
from dicom_node.settings import Settings, load_settings
from workers.names import DISPATCH_QUEUE, DISPATCH_TASK, INFERENCE_QUEUE, INFERENCE_TASK, PRIORITIES

#: How often a worker on a SQLAlchemy broker that is not a SQLite file (no wake-up socket, see
#: :mod:`dicom_node._compat.kombu`) looks for a new message.  With the SQLite broker the worker
#: sleeps on its wake-up socket, up to ``sqla_transport.WAKE_POLLING_SECONDS``, between polls.
SQLA_POLLING_SECONDS = 0.1


def create_celery_app(settings: Settings, *, with_tasks: bool = False) -> Celery:
    """A Celery app on ``settings.broker.url``.

    The producer side (``serve``) sends tasks by name and does not import them (no torch);
    workers pass ``with_tasks=True``.
    """
    app = Celery("dicom_node", broker=settings.broker.url, set_as_current=False)
    transport_options: dict[str, Any] = {}
    if settings.broker.url.startswith(("sqla+", "sqlalchemy+")):
        # kombu polls the broker tables every second by default: one second between "queued"
        # and "running", another before delivery.  A poll is one small SQLite transaction.
        sqla_transport.register()
        transport_options = {"polling_interval": SQLA_POLLING_SECONDS}
    elif settings.broker.url.startswith(("redis://", "rediss://", "redis+socket://")):
        transport_options = {
            "priority_steps": list(range(10)),
            "sep": ":",
            "queue_order_strategy": "priority",
            # A job whose worker died is redelivered after this long without an ack.
            "visibility_timeout": int(settings.worker.time_limit * 2),
        }
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_default_queue=INFERENCE_QUEUE,
        task_queues=[Queue(INFERENCE_QUEUE), Queue(DISPATCH_QUEUE)],  # type: ignore[no-untyped-call]
        task_routes={INFERENCE_TASK: {"queue": INFERENCE_QUEUE}, DISPATCH_TASK: {"queue": DISPATCH_QUEUE}},
        task_soft_time_limit=settings.worker.soft_time_limit,
        task_time_limit=settings.worker.time_limit,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        # Events on, so Flower works out of the box.
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # A pool process reports "up" after its warm-up (models loaded, :func:`warm_up`), which
        # takes longer than Celery's default 4 s on a busy CPU.
        worker_proc_alive_timeout=120.0,
    )
    app.dicom_node_settings = settings
    if with_tasks:
        from workers.heartbeat import install_heartbeat
        from workers.tasks import register_tasks

        register_tasks(app)
        install_heartbeat(app, settings.database.url, warm_models=warm_models)
        install_warm_up(settings)
        install_prompt_stop()
    return app


def rule_models(settings: Settings) -> list[str]:
    """The models the routing rules use, in rule order, each once."""
    return list(dict.fromkeys(model for rule in settings.rules for model in rule.models))


def warm_up(settings: Settings) -> list[str]:
    """Build this process's worker context and create the models the rules use, so the first
    job does not pay for the imports, the device and the model weights.  At most
    ``[worker] max_warm_models`` of them, in rule order (more would only evict the first ones);
    the others stay cold until a job needs them.  Returns the models loaded; a model that
    cannot be created is logged and left to fail its job as before."""
    import time

    import structlog

    from workers.tasks import NodeTask

    log = structlog.get_logger(__name__)
    started = time.monotonic()
    if NodeTask._ctx is None:
        from workers.pipeline import build_context

        NodeTask._ctx = build_context(settings)
    ctx = NodeTask._ctx
    # Encoding (highdicom, pydicom's codecs) is imported on first use otherwise.
    import dicom_node.results.seg
    import dicom_node.results.sr  # noqa: F401

    loaded = []
    wanted = rule_models(settings)
    for name in wanted[: settings.worker.max_warm_models]:
        try:
            ctx.registry.get(name)
            loaded.append(name)
        except Exception as exc:  # process boundary: a broken model fails its jobs, not the worker
            log.warning("model_warm_up_failed", model=name, error=f"{type(exc).__name__}: {exc}"[:300])
    log.info("worker_warmed_up", models=loaded, cold=wanted[settings.worker.max_warm_models:],
             seconds=round(time.monotonic() - started, 2))
    return loaded


def warm_models() -> list[dict[str, Any]]:
    """The models this process holds warm (for its heartbeat), least recently used first."""
    from workers.tasks import NodeTask

    ctx = NodeTask._ctx
    return [] if ctx is None else [w.as_dict() for w in ctx.registry.warm()]


def install_warm_up(settings: Settings) -> None:
    """Warm each worker pool process up as it starts (Celery's ``worker_process_init``; the solo
    and threads pools run tasks in the main process: ``worker_init``)."""
    from celery import signals

    def _in_child(**_: Any) -> None:
        warm_up(settings)

    def _in_main(sender: Any = None, **_: Any) -> None:
        pool = getattr(getattr(sender, "app", None), "conf", None)
        if pool is not None and str(pool.get("worker_pool", "prefork")) in ("solo", "threads"):
            warm_up(settings)

    signals.worker_process_init.connect(_in_child, weak=False)
    signals.worker_init.connect(_in_main, weak=False)


def _stop_consuming(**_: Any) -> None:
    sqla_transport.stop_consuming()


def install_prompt_stop() -> None:
    """End the embedded broker's wait for messages as soon as the worker is told to stop.

    Celery sends ``worker_shutting_down`` from its SIGTERM/SIGINT/SIGQUIT handler in the main
    process; without the wake-up a stop sat out up to two 2 s broker waits (see
    :mod:`dicom_node._compat.kombu`) before closing the pool.  Other brokers are not affected.
    """
    from celery import signals

    signals.worker_shutting_down.connect(_stop_consuming, weak=False)


class CeleryJobQueue:
    """:class:`dicom_node.scheduling.jobs.JobQueue` over Celery (sends by task name: no task import)."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def enqueue_inference(self, job_id: int, priority: str) -> None:
        self.app.send_task(INFERENCE_TASK, args=[job_id], queue=INFERENCE_QUEUE,
                           priority=PRIORITIES.get(priority, PRIORITIES["normal"]))

    def enqueue_dispatch(self, job_id: int) -> None:
        self.app.send_task(DISPATCH_TASK, args=[job_id], queue=DISPATCH_QUEUE)


_default: Celery | None = None


def __getattr__(name: str) -> Any:
    # ``celery -A workers.app worker`` looks up ``app``/``celery`` here.
    global _default
    if name in ("app", "celery"):
        if _default is None:
            _default = create_celery_app(load_settings(os.environ.get("DICOM_NODE_CONFIG")), with_tasks=True)
        return _default
    raise AttributeError(name)
