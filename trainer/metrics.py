"""Prometheus metrics of the trainer service, one registry per service instance.

Job counts by status are read from the store at scrape time (they survive restarts); step time and
throughput are observed by the worker, swaps and their stall by the deployer, as they happen.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from humpback.contracts import ACTIVE_STATUSES, TERMINAL_STATUSES
from trainer.store import Store


class _JobsByStatus(Collector):
    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("humpback_trainer_jobs", "Fine-tuning jobs by status.", labels=["status"])
        counts = self.store.count_by_status()
        for status in ACTIVE_STATUSES + TERMINAL_STATUSES:
            family.add_metric([status], counts.get(status, 0))
        yield family


class TrainerMetrics:
    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_JobsByStatus(store))
        self.step_seconds = Histogram(
            "humpback_trainer_step_seconds", "Wall time of one optimizer step.",
            buckets=(0.5, 1, 2, 5, 10, 20, 40, 80, 160), registry=self.registry,
        )
        self.tokens_per_second = Gauge(
            "humpback_trainer_tokens_per_second", "Training tokens per second over the last step.", registry=self.registry
        )
        self.trained_tokens = Counter(
            "humpback_trainer_trained_tokens", "Tokens trained on, all jobs.", registry=self.registry
        )
        self.swap_stall_seconds = Gauge(
            "humpback_trainer_swap_stall_seconds", "Request stall of the last hot-swap.", ["role"], registry=self.registry
        )
        self.swaps = Counter(
            "humpback_trainer_swaps", "Hot-swaps by role and outcome.", ["role", "outcome"], registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
