"""Bit-identity check for a restructuring: tiny digits runs of every method, saved, then compared.

    PYTHONPATH=/tmp/base/src python benchmarks/metrics_identity.py record /tmp/ident-before
    python benchmarks/metrics_identity.py record /tmp/ident-after
    python benchmarks/metrics_identity.py compare /tmp/ident-before /tmp/ident-after

Each case is a real run (small_cnn, width 8, a few epochs) in its own process, one thread (thread
count changes float sums). Kept per case: metrics.csv without the wall-clock ``seconds*`` columns,
summary.json without ``seconds_total``, label_issues.csv and pred_probs.npy; plus a SIGKILL + resume
of a --warmup auto DivideMix run, compared with the straight run. ``compare`` prints one line per
case and exits 1 on any difference.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TINY = dict(width=8, progress=False, batch_size=32)
CASES = {
    "standard": dict(method="standard", epochs=3),
    # collapse guard: every dip below the best is a collapse and is rolled back (val split selects)
    "standard-rollback": dict(method="standard", epochs=4, lr=0.1, val_fraction=0.2, collapse_drop=0.01,
                              on_collapse="rollback"),
    "dividemix": dict(method="dividemix", epochs=3, warmup=1),
    "dividemix-auto": dict(method="dividemix", epochs=5, warmup="auto", warmup_min_steps=43, warmup_max_steps=86),
    "josrc": dict(method="josrc", epochs=3, warmup=1),
    "hybrid": dict(method="hybrid", epochs=3, warmup=1),
    # the stabilisers of presets/hybrid-stable.toml, with its selection settings
    "hybrid-stable": dict(method="hybrid", epochs=4, warmup=1, schedule="cosine", lambda_cons=1.0, smooth_eps=0.6,
                          tau_clean_max=0.95, stab_per_class_threshold=True, stab_gmm_running_mean=True,
                          stab_blend_selection=0.5, val_fraction=0.0),
    "hybrid-swa": dict(method="hybrid", epochs=4, warmup=1, stab_swa_start=2),
}
KILL_ARGS = ["--epochs", "5", "--warmup", "auto", "--warmup-min-steps", "43", "--warmup-max-steps", "86",
             "--width", "8", "--batch-size", "32", "--no-progress"]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_case(name: str, out: Path) -> None:
    import torch

    import cdmix
    from cdmix.config import Config

    torch.set_num_threads(1)
    cdmix.train(Config(**TINY, **CASES[name], out=str(out / name)))


def kill_and_resume(out: Path) -> None:
    """Train, SIGKILL after the 3rd epoch's checkpoint, resume; and the same run straight through."""
    killed, straight = out / "killed", out / "straight"
    cmd = [sys.executable, "-m", "cdmix"]
    proc = subprocess.Popen([*cmd, "train", *KILL_ARGS, "--out", str(killed)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        metrics = killed / "metrics.csv"
        if metrics.is_file() and metrics.read_text().count("\n") >= 4 and (killed / "checkpoint.pt").is_file():
            break
        if proc.poll() is not None:
            raise SystemExit("the run to kill ended first")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run([*cmd, "resume", str(killed)], env=_env(), check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*cmd, "train", *KILL_ARGS, "--out", str(straight)], env=_env(), check=True,
                   stdout=subprocess.DEVNULL)


def metrics_without_seconds(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as fh:
        return [{k: v for k, v in row.items() if not k.startswith("seconds")} for row in csv.DictReader(fh)]


def fingerprint(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    summary.pop("seconds_total", None)
    return {"metrics": metrics_without_seconds(run), "summary": summary,
            "label_issues": (run / "label_issues.csv").read_text(),
            "pred_probs": hashlib.sha256((run / "pred_probs.npy").read_bytes()).hexdigest()}


def record(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in CASES:
        t0 = time.time()
        subprocess.run([sys.executable, __file__, "one", name, str(out)], env=_env(), check=True,
                       stdout=subprocess.DEVNULL)
        print(f"{name}: {time.time() - t0:.0f}s", flush=True)
    kill_and_resume(out)
    prints = {name: fingerprint(out / name) for name in [*CASES, "killed", "straight"]}
    (out / "fingerprints.json").write_text(json.dumps(prints, indent=1, sort_keys=True))
    same = prints["killed"] == prints["straight"]
    print(f"kill+resume == straight: {same}")


def compare(a: Path, b: Path) -> int:
    pa = json.loads((a / "fingerprints.json").read_text())
    pb = json.loads((b / "fingerprints.json").read_text())
    bad = 0
    for name in pa:
        for part in pa[name]:
            same = pa[name][part] == pb.get(name, {}).get(part)
            bad += not same
            if not same:
                print(f"DIFFERENT {name} {part}")
        print(f"{name}: {'identical' if all(pa[name][p] == pb.get(name, {}).get(p) for p in pa[name]) else 'DIFFERS'}")
    for run in ("killed", "straight"):
        if pb[run] != pb["straight"]:
            print(f"DIFFERENT kill+resume in {b}")
            bad += 1
    for case in CASES:  # metrics.csv byte for byte (the seconds columns masked above differ by nature)
        head_a = (a / case / "metrics.csv").read_text().splitlines()[0]
        head_b = (b / case / "metrics.csv").read_text().splitlines()[0]
        if head_a != head_b:
            print(f"DIFFERENT column order {case}")
            bad += 1
    print("ALL IDENTICAL" if not bad else f"{bad} difference(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    verb = sys.argv[1]
    if verb == "one":
        run_case(sys.argv[2], Path(sys.argv[3]))
    elif verb == "record":
        record(Path(sys.argv[2]))
    elif verb == "compare":
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        raise SystemExit(__doc__)
