"""Benchmark: prepare alpaca-sized rows from parquet (read + format + template + tokenize + mask).

    python bench/prepare_data.py            # 10k and 100k rows, the preview of 100k rows
    python bench/prepare_data.py --rows 20000 --repeat 3

Rows are synthetic but alpaca-shaped (instruction ~12 words, input on 40% of rows, output ~45
words) and written to a parquet file first. Reports rows/s per size, the ratio of the 10k and
100k rates (linear scaling: within 15%; wall time and CPU time, since CPU time is what other
load on a shared machine disturbs least), and how long the `%%lora_dataset` preview of the
largest set takes (target < 3 s). The tokenizer is the embedded tiny model's (byte-level BPE).
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

WORDS = ("model data train learn token prompt answer network layer weight gradient loss batch epoch "
         "vector matrix image text write explain describe summarize list give three reasons example "
         "simple short clear the a of to and in for with on by about why how what when").split()


def alpaca_frame(rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)

    def sentences(count: int, low: int, high: int) -> list[str]:
        lengths = rng.integers(low, high, count)
        picks = rng.integers(0, len(WORDS), lengths.sum())
        out, start = [], 0
        for n in lengths:
            out.append(" ".join(WORDS[i] for i in picks[start:start + n]).capitalize() + ".")
            start += n
        return out

    inputs = sentences(rows, 4, 20)
    keep = rng.random(rows) < 0.4
    return pd.DataFrame({
        "instruction": sentences(rows, 6, 20),
        "input": [text if k else "" for text, k in zip(inputs, keep)],
        "output": sentences(rows, 20, 70),
    })


def prepare(path: Path, tokenizer, rows: int | None = None) -> tuple[float, float, int, int]:
    """Wall seconds, CPU seconds (all threads), rows and tokens for read + LoraDataset + tokenize."""
    from ipylora.engine import DataArgs
    from ipylora.engine.data import LoraDataset
    from ipylora.engine.sources import read_path

    start, cpu = time.perf_counter(), time.process_time()
    frame = read_path(str(path))
    dataset = LoraDataset("bench", frame, DataArgs(template="alpaca", limit=rows))
    tokens = dataset.tokenize(tokenizer, max_length=1024)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return seconds, cpu, len(dataset), sum(map(len, tokens["input_ids"]))


def preview_seconds(path: Path) -> float:
    """%lora_dataset NAME --from FILE --template alpaca, as a user runs it (tokenizer already loaded)."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.history_manager.enabled = False
    shell.run_line_magic("load_ext", "ipylora")
    from ipylora.engine import get_session

    get_session().preview_tokenizer()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the terminal rendering of the preview
        shell.run_line_magic("lora_dataset", f"big --from {path} --template alpaca")
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeat", type=int, default=3, help="runs per size; the best is reported")
    parser.add_argument("--no-preview", action="store_true")
    opts = parser.parse_args(argv)

    from ipylora.engine.models import load_tokenizer
    from ipylora.engine.tiny import tiny_model_path

    tokenizer = load_tokenizer(str(tiny_model_path()))
    with tempfile.TemporaryDirectory() as tmp:
        paths = {rows: Path(tmp) / f"alpaca-{rows}.parquet" for rows in opts.rows}
        for rows, path in paths.items():
            alpaca_frame(rows).to_parquet(path)
        # Sizes interleaved, best of --repeat: the shared machine's load changes from minute to minute.
        results: dict[int, list] = {rows: [] for rows in opts.rows}
        for _ in range(opts.repeat):
            for rows, path in paths.items():
                results[rows].append(prepare(path, tokenizer))
        rates, cpu_rates = {}, {}
        for rows, runs in results.items():
            seconds, cpu, count, tokens = min(runs, key=lambda r: r[0])
            rates[rows], cpu_rates[rows] = count / seconds, count / min(r[1] for r in runs)
            print(f"{rows:>7,} rows: {seconds:6.2f} s  {rates[rows]:8,.0f} rows/s  "
                  f"{tokens / seconds:10,.0f} tokens/s  ({tokens / count:.0f} tokens/row)  "
                  f"{cpu_rates[rows]:8,.0f} rows per CPU-second")
        if len(rates) > 1:
            for label, measured in (("rows/s", rates), ("rows per CPU-second", cpu_rates)):
                ratio = measured[max(measured)] / measured[min(measured)]
                print(f"{label} at {max(measured):,} vs {min(measured):,} rows: {ratio:.2f}x "
                      f"({'linear, within 15%' if abs(ratio - 1) <= 0.15 else 'NOT within 15%'})")
        if not opts.no_preview:
            path = Path(tmp) / f"alpaca-{max(opts.rows)}.parquet"
            print(f"preview of {max(opts.rows):,} rows: {preview_seconds(path):.2f} s (target < 3 s)")


if __name__ == "__main__":
    main()
