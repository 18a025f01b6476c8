"""Look at a study in the real MLflow UI: headless Chromium screenshots of the experiment's run table and of a
trial's run page, so the README's walkthrough is checked against what a user sees.

    python benchmarks/mlflow_ui.py outputs/search/ppocrv4_det-prune [--out shots/]

Starts `mlflow ui` on a free local port over the study's `mlflow.db`, waits for it, writes `runs.png` (the
experiment's runs, the study's parent run expanded) and `trial.png` (the chosen trial's run page), then stops the
server. Needs `chromium` (Debian: `apt-get install chromium`).
"""
from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
from mlflow.tracking import MlflowClient


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _screenshot(browser: str, url: str, path: Path) -> None:
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1600,1000", "--virtual-time-budget=15000", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="a study's out_dir (with mlflow.db)")
    parser.add_argument("--out", type=Path, default=Path("mlflow-ui-shots"))
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        sys.exit("error: no chromium on PATH (Debian: apt-get install chromium)")
    store = f"sqlite:///{(args.out_dir / 'mlflow.db').resolve()}"
    client = MlflowClient(store)
    [experiment] = [e for e in client.search_experiments() if e.name != "Default"][:1]
    parent = next(r for r in client.search_runs([experiment.experiment_id]) if "chosen_run_id" in r.data.tags)
    args.out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host",
                               "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if requests.get(f"{base}/health", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        _screenshot(browser, f"{base}/#/experiments/{experiment.experiment_id}/runs", args.out / "runs.png")
        chosen = parent.data.tags["chosen_run_id"]
        _screenshot(browser, f"{base}/#/experiments/{experiment.experiment_id}/runs/{chosen}", args.out / "trial.png")
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"runs={args.out / 'runs.png'} trial={args.out / 'trial.png'}")


if __name__ == "__main__":
    main()
