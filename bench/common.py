"""Shared plumbing of the side-by-side benchmarks: peer environments, one side per subprocess,
A B A B alternation, the table and the final JSON line.

Every measured run is its own process (ours in the main venv, TRL's in its peer venv), so imports,
allocator state and peak RSS never leak from one run into the next. A side writes one JSON file:
{"times": [seconds per iteration/step, warm-up ones included], "peak_rss_mb": ..., ...}; the
first `warmup` entries are dropped before taking medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / ".work"  # models and runs made by the benchmarks (ignored by git)
OURS_PY = sys.executable
REUSE = False  # --reuse-results: a run whose result file exists (same spec) is read, not run again
PEERS = {"trl-ppo": BENCH / ".venv-trl-ppo" / "bin" / "python", "trl": BENCH / ".venv-trl" / "bin" / "python",
         # bench/ddpo.py's peer (trl 0.23, transformers 4.x): made by setup_ddpo_peer.sh, not setup_peers.sh
         "trl-ddpo": BENCH / ".venv-trl-ddpo" / "bin" / "python"}


def steps_parser(doc: str) -> argparse.ArgumentParser:
    """The options of the benchmarks timed by optimizer steps (sft, reward, dpo); `parse_steps` reads them."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="further steps dropped per run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reuse-results", action="store_true",
                        help="read the result of a run already in bench/.work (same label and spec) instead of "
                             "running it again: finishes an interrupted benchmark")
    return parser


def parse_steps(parser: argparse.ArgumentParser) -> argparse.Namespace:
    global REUSE
    args = parser.parse_args()
    REUSE = args.reuse_results
    return args


def peer_python(name: str) -> str:
    """The interpreter of a peer venv, created by setup_peers.sh on first use."""
    python = PEERS[name]
    if not python.exists():
        print(f"creating the peer environments (bench/setup_peers.sh {OURS_PY})", flush=True)
        subprocess.run(["bash", str(BENCH / "setup_peers.sh"), OURS_PY], check=True)
    return str(python)


def side_env(threads: int, src: str | None = None) -> dict:
    """The same environment for both sides: same thread count, quiet libraries. `src`: a folder
    holding another copy of the `rlhf_cli` package to import instead of the working tree's (to
    measure an optimisation against the code before it, in the same run)."""
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "BENCH_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore", "WANDB_DISABLED": "true",
        "PYTHONPATH": os.pathsep.join(p for p in (src, str(BENCH), env.get("PYTHONPATH", "")) if p),
    })
    return env


def run_side(python: str, script: str, spec: dict, label: str, threads: int, src: str | None = None) -> dict:
    """Run bench/sides/<script> under `python` with a JSON spec; return the JSON it wrote."""
    WORK.mkdir(parents=True, exist_ok=True)
    spec_path = WORK / f"{label}.spec.json"
    result_path = WORK / f"{label}.result.json"
    if REUSE and result_path.exists() and spec_path.exists() and json.loads(spec_path.read_text()) == spec:
        print(f"  (reusing {result_path.name})", flush=True)
        return json.loads(result_path.read_text())
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec, indent=1))
    log_path = WORK / f"{label}.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run([python, str(BENCH / "sides" / script), str(spec_path), str(result_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=side_env(threads, src), cwd=ROOT)
    if proc.returncode != 0 or not result_path.exists():
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"{label} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def alternate(sides: dict, rounds: int) -> dict[str, list[dict]]:
    """Run every side once per round, in A B A B order; `sides` maps name -> callable(round) -> result."""
    results: dict[str, list[dict]] = {name: [] for name in sides}
    for r in range(rounds):
        for name, fn in sides.items():
            load = os.getloadavg()[0]
            print(f"round {r + 1}/{rounds}: {name} (load {load:.1f}) ...", flush=True)
            res = fn(r)
            res["load_before"] = load
            results[name].append(res)
            print(f"  {name}: {summary_line(res)}", flush=True)
    return results


def summary_line(res: dict) -> str:
    keys = [k for k in res if isinstance(res[k], (int, float)) and k not in ("load_before",)]
    return ", ".join(f"{k}={res[k]:.4g}" for k in keys)


def median_after_warmup(times: list[float], warmup: int) -> float:
    kept = times[warmup:] or times
    return statistics.median(kept)


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return "-"
    return f"{min(values):.3g}..{max(values):.3g}"


def print_table(title: str, rows: list[tuple], header: tuple) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)))


def machine_note(threads: int) -> dict:
    import platform

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"device": device, "cpu_count": os.cpu_count(), "threads_per_side": threads,
            "load_avg_1m_end": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            "torch": torch.__version__}


def final_json(payload: dict) -> None:
    print(json.dumps(payload, sort_keys=False))
