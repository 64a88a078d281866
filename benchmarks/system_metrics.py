"""What MLflow's system metrics cost a training: a fixed CPU workload (float32 matmuls on all of torch's threads)
timed alone and with MLflow's SystemMetricsMonitor sampling beside it into a throwaway SQLite store, in
interleaved rounds; at the interval the pipeline uses (stages/tracking.py) and at a 1-second stress interval.
Also the sampling thread's own CPU time per sample, read from /proc (Linux)."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import click
import torch

from benchmarks.common import json_option, print_header, print_table, run_header, write_json
from stages.tracking import SYSTEM_METRICS_INTERVAL_S, SYSTEM_METRICS_SAMPLES

COLUMNS = [
    "sampling interval (s)",
    "samples per point",
    "alone (s)",
    "with system metrics (s)",
    "overhead",
    "ms per sample",
]
MATMUL_SIZE = 512


def matmuls(count: int) -> float:
    """Seconds that `count` float32 matmuls of MATMUL_SIZE take."""
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    started = time.perf_counter()
    for _ in range(count):
        a = torch.tanh(a @ a)  # tanh keeps the values finite
    return time.perf_counter() - started


def thread_cpu_seconds(native_id: int | None) -> float:
    """A thread's user + system CPU time so far; 0 where /proc has no such thread."""
    try:
        fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime and stime, fields 14 and 15


def monitored(count: int, interval: float, samples: int, uri: str) -> tuple[float, float]:
    """Seconds of the workload with the monitor running in a fresh run, and the monitor's CPU ms per sample."""
    from mlflow import MlflowClient
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("bench") or client.get_experiment(client.create_experiment("bench"))
    run_id = client.create_run(experiment.experiment_id).info.run_id
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, samples_before_logging=samples, tracking_uri=uri)
    monitor.start()
    seconds = matmuls(count)
    thread = monitor._process  # MLflow's sampling thread
    cpu = thread_cpu_seconds(thread.native_id if thread is not None else None)
    monitor.finish()
    client.set_terminated(run_id)
    return seconds, 1000 * cpu / max(1.0, seconds / interval)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--seconds", default=30.0, show_default=True, type=click.FloatRange(min=1), help="Workload length.")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1), help="Interleaved rounds.")
@json_option
def main(seconds: float, rounds: int, json_path: Path | None) -> None:
    """Time a CPU workload with and without MLflow's system metrics."""
    header = run_header("System metrics overhead", torch.device("cpu"), "float32")
    print_header(header)
    per_second = 20 / matmuls(20)
    count = max(1, round(seconds * per_second))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        monitored(1, 1.0, 1, uri)  # the store's tables are created once, outside the timing
        for interval, samples in ((SYSTEM_METRICS_INTERVAL_S, SYSTEM_METRICS_SAMPLES), (1.0, 1)):
            alone, beside, cost = [], [], []
            for _ in range(rounds):
                alone.append(matmuls(count))
                with_monitor, ms_per_sample = monitored(count, interval, samples, uri)
                beside.append(with_monitor)
                cost.append(ms_per_sample)
            a, b = statistics.median(alone), statistics.median(beside)
            rows.append(
                {
                    COLUMNS[0]: f"{interval:g}",
                    COLUMNS[1]: samples,
                    COLUMNS[2]: f"{a:.2f}",
                    COLUMNS[3]: f"{b:.2f}",
                    COLUMNS[4]: f"{100 * (b / a - 1):+.2f}%",
                    COLUMNS[5]: f"{statistics.median(cost):.1f}",
                }
            )
    print_table(
        f"{count} matmuls of {MATMUL_SIZE}x{MATMUL_SIZE} on {torch.get_num_threads()} threads, medians of {rounds}",
        COLUMNS,
        rows,
        "overhead: the workload's time with the monitor against alone (noise is a percent or so either way); "
        "ms per sample: the sampling thread's CPU time per sample taken (and per point logged).",
    )
    write_json(json_path, header, {"system_metrics": rows})


if __name__ == "__main__":
    main()
