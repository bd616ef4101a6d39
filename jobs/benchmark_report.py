"""`sd3 generate --benchmark`: the job's stage timings, throughput and peak memory.

Each replica renders its first batch once untimed (warm-up), then every pipeline call is timed per
stage (`pipelines.stage_timer`); the write stage forwards each image's share (`_benchmark`) to the
driver, which adds them up here."""

from __future__ import annotations

from typing import Any

import pyarrow as pa


class BenchmarkTally:
    """Sums of the per-image benchmark shares of a job's summaries (see jobs.generate_stage.BENCHMARK_TYPE)."""

    def __init__(self) -> None:
        self.images = 0
        self.render_seconds = 0.0
        self.stages = {"text_encoding": 0.0, "denoising": 0.0, "vae_decode": 0.0}
        self.steps = 0.0
        self.timed_stages = True
        self.peak_rss: dict[str, int] = {}

    def update(self, summary: pa.Table) -> None:
        cols = [summary.column(c).to_pylist() for c in ("status", "seconds", "replica", "_benchmark")]
        for status, seconds, replica, bench in zip(*cols, strict=True):
            if status != "ok" or bench is None:
                continue
            self.images += 1
            self.render_seconds += seconds or 0.0
            if bench["denoising"] is None:
                self.timed_stages = False  # a replica group: its stages run on its ranks
            else:
                for name in self.stages:
                    self.stages[name] += bench[name]
                self.steps += bench["denoising_steps"]
            self.peak_rss[replica] = max(self.peak_rss.get(replica, 0), bench["peak_rss_bytes"])

    def report(self, replicas: int, wall_seconds: float) -> dict[str, Any]:
        """The `benchmark` section of job.json (stage figures null if a replica could not time them)."""
        n = self.images
        stages = None
        if self.timed_stages and n:
            stages = {
                "text_encoding_seconds_per_image": self.stages["text_encoding"] / n,
                "denoising_seconds_per_step": self.stages["denoising"] / self.steps,
                "denoising_steps": round(self.steps),
                "vae_decode_seconds_per_image": self.stages["vae_decode"] / n,
            }
        return {
            "warm_up": "one untimed render of its first batch per replica",
            "images": n,
            "render_seconds": self.render_seconds,
            # Steady state: images over the render time of one replica, the replicas side by side.
            "images_per_second": n * replicas / self.render_seconds if self.render_seconds else None,
            "wall_seconds": wall_seconds,
            "stages": stages,
            "peak_rss_bytes": max(self.peak_rss.values()) if self.peak_rss else None,
            "peak_rss_bytes_per_replica": dict(sorted(self.peak_rss.items())),
        }


def format_report(report: dict[str, Any]) -> str:
    """A short table of `report` for the terminal."""

    def fmt(value: float | None, unit: str) -> str:
        return "n/a" if value is None else f"{value:.4g} {unit}"

    stages = report["stages"] or {}
    rss = report["peak_rss_bytes"]
    lines = [
        ("images timed", str(report["images"])),
        ("text encoding", fmt(stages.get("text_encoding_seconds_per_image"), "s/image")),
        ("denoising", fmt(stages.get("denoising_seconds_per_step"), "s/step")),
        ("VAE decode", fmt(stages.get("vae_decode_seconds_per_image"), "s/image")),
        ("throughput", fmt(report["images_per_second"], "images/s")),
        ("peak RSS", fmt(None if rss is None else rss / 2**20, "MiB (largest replica process)")),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(
        ["benchmark (after one warm-up batch per replica):"] + [f"  {k:<{width}}  {v}" for k, v in lines]
    )
