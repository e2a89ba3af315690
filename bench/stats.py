"""Figures: a Layerlog measurement per run, its baseline per run, and the target it is held to.

A run measures Layerlog and its baseline back to back, so each run gives a ratio made under the
same load from whatever else shares the machine; the table reports the median of those ratios.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile: an observed value, never an interpolation between two."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


@dataclass(frozen=True)
class Target:
    """`on` is "value" (the Layerlog figure itself) or "ratio" (Layerlog / baseline)."""

    on: str
    op: str  # ">=" or "<="
    bound: float
    text: str

    def met(self, value: float, ratio: float) -> bool:
        subject = value if self.on == "value" else ratio
        if math.isnan(subject):
            return False
        return subject >= self.bound if self.op == ">=" else subject <= self.bound


@dataclass
class Figure:
    key: str
    title: str
    unit: str
    baseline_label: str
    values: list[float] = field(default_factory=list)
    baselines: list[float] = field(default_factory=list)
    target: Target | None = None
    higher_is_better: bool = True
    note: str = ""

    def add(self, value: float, baseline: float) -> None:
        self.values.append(value)
        self.baselines.append(baseline)

    @property
    def ratios(self) -> list[float]:
        return [v / b if b else math.nan for v, b in zip(self.values, self.baselines, strict=True)]

    @property
    def median(self) -> float:
        return median(self.values)

    @property
    def ratio(self) -> float:
        return median(self.ratios)

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.target.met(self.median, self.ratio)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(median=self.median, ratio=self.ratio, ratios=self.ratios, met=self.met)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Figure:
        target = data.get("target")
        return cls(
            key=data["key"],
            title=data["title"],
            unit=data["unit"],
            baseline_label=data["baseline_label"],
            values=list(data["values"]),
            baselines=list(data["baselines"]),
            target=Target(**target) if target else None,
            higher_is_better=data.get("higher_is_better", True),
            note=data.get("note", ""),
        )


def throughput_mib_s(size: int, seconds: float) -> float:
    return size / (1 << 20) / seconds if seconds > 0 else math.nan
