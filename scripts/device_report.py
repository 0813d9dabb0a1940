"""Assemble scripts/device_check.sh's step logs and outputs (in WORK) into OUT/report.json and OUT/summary.txt.

    python3 scripts/device_report.py WORK OUT [WALL_SECONDS]

Standard library only: it runs whatever the install step did. The summary is one line: every step's status, then
the headline figures next to their targets (MFU >= 45% of the bf16 peak, skiparse k=4 >= 0.7 x 4 = 2.8x dense,
planner within 15% of the CUDA allocated peak, FusedEmaAdamW >= 70% of copy bandwidth) and the seconds per video.
Exit status 1 when a step failed.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

TARGETS = {"mfu": 0.45, "skiparse_k4": 0.7 * 4, "planner": 0.15, "optimizer": 0.70}


def _steps(work: Path) -> list[dict]:
    rows = []
    for line in (work / "steps.tsv").read_text().splitlines():
        name, rc, seconds, budget = line.split("\t")
        log = work / f"{name}.log"
        tail = log.read_text(errors="replace").splitlines()[-40:] if log.exists() else []
        rows.append({"step": name, "rc": int(rc), "seconds": int(seconds), "budget_s": int(budget), "ok": rc == "0",
                     "timed_out": rc in ("124", "137"), "log_tail": tail})
    return rows


def _tests(work: Path) -> dict:
    xml = work / "gpu_tests.xml"
    if not xml.exists():
        return {}
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = [{"name": c.get("name"), "seconds": float(c.get("time", 0)),
              "outcome": next((child.tag for child in c if child.tag in ("failure", "error", "skipped")), "passed")}
             for c in suite.iter("testcase")]
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"cases": cases}


def _log(work: Path, name: str) -> str:
    path = work / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def skiparse_figures(log: str) -> dict:
    """{"dense_ms": .., "single-skip k=4": speed-up, ...} from bench_skiparse.py's table."""
    out = {}
    for mode, k, ms, speedup in re.findall(r"^(dense|single-skip|group-skip)\s+(\d+)\s+([\d.]+)\s+([\d.]+)", log, re.M):
        out["dense_ms" if mode == "dense" else f"{mode} k={k}"] = float(ms) if mode == "dense" else float(speedup)
    return out


def optimizer_figures(log: str) -> dict:
    """Fraction of the in-run copy bandwidth per variant, from bench_ema_optimizer.py's JSON line."""
    for line in reversed(log.splitlines()):
        if line.startswith("{"):
            data = json.loads(line)
            copy = data["copy_bytes_per_s"]
            return {"copy_gb_s": copy / 1e9} | {name: r["bytes_per_s"] / copy for name, r in data["results"].items()}
    return {}


def build_report(work: Path) -> dict:
    figures = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}
    figures["skiparse"] = skiparse_figures(_log(work, "skiparse"))
    figures["optimizer"] = optimizer_figures(_log(work, "optimizer"))
    return {"environment": _log(work, "env").splitlines(), "packages": _log(work, "install").splitlines(),
            "steps": _steps(work), "gpu_tests": _tests(work), "targets": TARGETS, "figures": figures}


def _headlines(report: dict) -> list[str]:
    f, out = report["figures"], []
    for name in ("mfu_57x288x512", "mfu_121x576x1024", "mfu_tiny"):
        if name in f:
            out.append(f"{name} {f[name]['tflops']:.4g} TFLOP/s MFU {f[name]['mfu']:.1%} (target {TARGETS['mfu']:.0%})")
    if "single-skip k=4" in f["skiparse"]:
        out.append(f"skiparse k=4 {f['skiparse']['single-skip k=4']:.2f}x dense (target {TARGETS['skiparse_k4']:.1f}x)")
    if "planner" in f:
        out.append(f"planner worst {f['planner']['worst_abs_error']:.1%} (target {TARGETS['planner']:.0%})")
    if "FusedEmaAdamW(fused)" in f["optimizer"]:
        out.append(f"FusedEmaAdamW {f['optimizer']['FusedEmaAdamW(fused)']:.0%} of copy "
                   f"(target {TARGETS['optimizer']:.0%})")
    if "mfu_profile" in f:
        out.append("profile " + ", ".join(f"{k} {v:.0%}" for k, v in f["mfu_profile"]["share_by_kind"].items()))
    for row in f.get("sampling_latency", {}).get("per_video", []):
        out.append(f"{row['sampler']}: {row['with_decode_s']:.3g} s/video with decode")
    return out


def summary_line(report: dict, wall: str) -> str:
    steps = report["steps"]
    status = " ".join(f"{s['step']}={'ok' if s['ok'] else ('TIMEOUT' if s['timed_out'] else 'rc' + str(s['rc']))}"
                      for s in steps)
    tests = report["gpu_tests"]
    failed = tests["failures"] + tests["errors"] if tests else 0
    tests_text = (f"gpu tests {tests['tests'] - failed - tests['skipped']} passed {failed} failed "
                  f"{tests['skipped']} skipped" if tests else "gpu tests: none")
    ok = sum(s["ok"] for s in steps)
    return "; ".join([f"device_check: {ok}/{len(steps)} steps ok in {wall} s ({status})", tests_text,
                      *_headlines(report)])


def main() -> None:
    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    wall = sys.argv[3] if len(sys.argv) > 3 else "?"
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(work)
    report["wall_seconds"] = wall
    line = summary_line(report, wall)
    report["summary"] = line
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "summary.txt").write_text(line + "\n")
    if (work / "mfu_profile.txt").exists():
        shutil.copy(work / "mfu_profile.txt", out / "mfu_profile.txt")
    print(line)
    sys.exit(0 if all(s["ok"] for s in report["steps"]) else 1)


if __name__ == "__main__":
    main()
