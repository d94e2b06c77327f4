"""Reading MLflow runs back in tests (the tracking module only writes them)."""

from __future__ import annotations

from cluster_service.runtime.tracking import resolve_tracking_uri


def client_for(tracking_uri: str | None = None):
    """An MlflowClient on the resolved tracking URI."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))


def metric_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
