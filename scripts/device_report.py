"""Assemble scripts/device_check.sh's outputs in DIR into DIR/report.json and print the headline figures.

    python3 scripts/device_report.py DIR

Standard library only (it runs even when the CUDA install step failed).
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _steps(out: Path) -> list[dict]:
    rows = []
    for line in (out / "steps.tsv").read_text().splitlines():
        name, rc, seconds = line.split("\t")
        log = out / f"{name}.log"
        tail = log.read_text(errors="replace").splitlines()[-40:] if log.exists() else []
        rows.append({"step": name, "rc": int(rc), "seconds": int(seconds), "ok": rc == "0", "log_tail": tail})
    return rows


def _tests(out: Path) -> dict:
    xml = out / "gpu_tests.xml"
    if not xml.exists():
        return {}
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = [{"name": c.get("name"), "seconds": float(c.get("time", 0)),
              "outcome": next((child.tag for child in c if child.tag in ("failure", "error", "skipped")), "passed")}
             for c in suite.iter("testcase")]
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"cases": cases}


def _json_lines(log: Path) -> list:
    """JSON objects a benchmark printed on their own lines."""
    if not log.exists():
        return []
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def build_report(out: Path) -> dict:
    figures = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "report.json"}
    figures["optimizer"] = _json_lines(out / "optimizer.log")
    env_log = out / "env.log"
    return {"environment": env_log.read_text(errors="replace").splitlines() if env_log.exists() else [],
            "steps": _steps(out), "gpu_tests": _tests(out), "figures": figures}


def main() -> None:
    out = Path(sys.argv[1])
    report = build_report(out)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"report: {out / 'report.json'}")
    for step in report["steps"]:
        print(f"  {step['step']:10s} {'ok' if step['ok'] else 'FAILED rc=' + str(step['rc']):12s} {step['seconds']:4d} s")
    tests = report["gpu_tests"]
    if tests:
        print(f"  gpu tests: {tests['tests']} run, {tests['failures']} failed, {tests['errors']} errors, "
              f"{tests['skipped']} skipped")
    for name, fig in report["figures"].items():
        if name.startswith("mfu_") and isinstance(fig, dict):
            print(f"  {name}: {fig.get('tflops', 0):.1f} TFLOP/s, MFU {100 * fig.get('mfu', 0):.1f}% "
                  f"(target >= 40%)")
    planner = report["figures"].get("planner")
    if isinstance(planner, dict):
        print(f"  planner: worst |error| {100 * planner['worst_abs_error']:.1f}% over {len(planner['rows'])} rows")
    sys.exit(0 if all(s["ok"] for s in report["steps"]) else 1)


if __name__ == "__main__":
    main()
