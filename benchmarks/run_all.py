"""Run every benchmark script in benchmarks/, each in its own subprocess, and write their figures into the
results block of benchmarks/README.md (between ``<!-- run_all:begin -->`` and ``<!-- run_all:end -->``; the
rest of the README is left as it is, and the block is appended as a new section the first time).

With ``--quick`` each script runs in its quick mode, found in its source: its own ``--quick`` flag if it has
one, else its ``--smoke`` flag, else the reduced arguments listed in ``REDUCED_ARGS`` here (for scripts that
have no quick flag); a script with none of these is skipped, and the block says so. Quick and smoke figures
only show that the scripts run: they are not measurements. Without ``--quick`` every script runs with its own
defaults: the real measurement, which takes hours on a small CPU machine.

A script that declares ``--json`` is given a temporary file and its medians are read from it; for the
others the block shows the end of what it printed.

    python benchmarks/run_all.py --quick                   # every script, quick modes; rewrites the block
    python benchmarks/run_all.py --quick --only vs_open_clip.py memory.py --no-readme
    python benchmarks/run_all.py                           # the full measurements
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"
SECTION_TITLE = "## Every benchmark at once (`run_all.py`)"
TAIL_LINES = 14
# Quick arguments of the scripts that have no --quick/--smoke flag: small sizes, one round, same code paths.
REDUCED_ARGS = {
    "data_throughput.py": [
        "--images", "64", "--measure-images", "64", "--batch-size", "16", "--workers", "0", "--rounds", "1",
        "--size", "96",
    ],
    "eval_speed.py": ["--images", "2000", "--naive-images", "1000"],
    "lit_speed.py": [
        "--cached-steps", "5", "--live-steps", "2", "data.split=val", "train.batch_size=128", "model.image.image_size=64",
    ],
    "memory.py": ["--sizes", "64", "128", "--extend", "128", "--micro", "64", "--chunk", "64", "--budget-mib", "64"],
    "shared_machine.py": ["--images", "16", "--rounds", "1"],
    "search_speed.py": ["--items", "20000", "--queries", "10", "--workers", "1", "--no-faiss", "--embed-images", "64"],
}  # fmt: skip


@dataclass
class Plan:
    """How one script is run: its arguments, and in words where they came from (None: skipped, ``why``)."""

    script: Path
    arguments: list[str] | None
    mode: str
    takes_json: bool = False


@dataclass
class Outcome:
    plan: Plan
    returncode: int | None = None
    figures: list[str] = field(default_factory=list)
    error: str = ""


def declares(source: str, flag: str) -> bool:
    """Whether the script's argparse parser declares ``flag`` (read from its source: no import, no torch)."""
    return re.search(r"add_argument\(\s*[\"']" + re.escape(flag) + r"[\"']", source) is not None


def plan_for(script: Path, quick: bool) -> Plan:
    source = script.read_text(encoding="utf-8")
    takes_json = declares(source, "--json")
    if not quick:
        return Plan(script, [], "its defaults (the full measurement)", takes_json)
    if declares(source, "--quick"):
        return Plan(script, ["--quick"], "its --quick flag", takes_json)
    if declares(source, "--smoke"):
        return Plan(script, ["--smoke"], "its --smoke flag", takes_json)
    if script.name in REDUCED_ARGS:
        return Plan(script, list(REDUCED_ARGS[script.name]), "reduced arguments, as it has no quick flag", takes_json)
    return Plan(script, None, "skipped: it has no --quick or --smoke flag and no reduced arguments in run_all.py")


def benchmark_scripts(folder: Path) -> list[Path]:
    """Every ``*.py`` in ``folder`` but this one and helper modules (a name starting with ``_``)."""
    return sorted(p for p in folder.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_"))


# ----------------------------------------------------------------------------------------------
# Figures: the medians each script reports, read from its --json file
# ----------------------------------------------------------------------------------------------
def _vs_open_clip(data: dict) -> list[str]:
    return list(data["summary"])  # the script's own summary table


def _gpu_throughput(rows: list) -> list[str]:
    lines = [f"{'setting':>16} {'compile':>7} {'samples/s':>10} {'peak GiB':>9} {'MFU':>6}"]
    for row in rows:
        memory = f"{row['peak_memory_gib']:.1f}" if row.get("peak_memory_gib") is not None else "-"
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else "-"
        lines.append(
            f"{row['setting']:>16} {str(row['compile']):>7} {row['samples_per_second']:>10.1f} {memory:>9} {mfu:>6}"
        )
    return lines


def _data_throughput(data: dict) -> list[str]:
    lines = [f"{'workers':>7}  {'loader':<17} {'median images/s':>15}"]
    for row in data["results"]:
        lines.append(f"{row['workers']:>7}  {row['loader']:<17} {statistics.median(row['rounds']):>15.1f}")
    return lines


def _lit_speed(data: dict) -> list[str]:
    return [
        f"cached features: {data['cached_samples_per_second']:.1f} samples/s (median over steps)",
        f"live towers:     {data['live_samples_per_second']:.1f} samples/s (median over steps)",
        f"speed-up:        {data['speedup']:.1f}x",
    ]


def _memory(rows: list) -> list[str]:
    return [f"{'method':>26} {'batch':>6} {'peak MiB':>9}"] + [
        f"{row['method']:>26} {row['batch']:>6} {row['peak_mib']:>9.1f}" for row in rows
    ]


def _search_speed(data: dict) -> list[str]:
    lines = [
        f"{'exact search, single query kernel':<40} {'workers':>7} {'median ms':>9} {'CPU ms':>7} {'batched ms/q':>12} "
        f"{'floor ms':>8} {'vs floor':>8} {'torch mv vs floor':>17}"
    ]
    for row in data.get("exact", []):
        lines.append(
            f"{row['single_query_kernel']:<40} {row['workers']:>7} {row['single_query_median_ms']:>9.1f} "
            f"{row['single_query_median_cpu_ms']:>7.1f} {row['batched_ms_per_query']:>12.1f} "
            f"{row['streaming_read_floor_ms']:>8.1f} {row['vs_floor']:>7.2f}x {row['torch_float16_mv_vs_floor']:>16.2f}x"
        )
    for name in ("faiss_random", "faiss_clustered"):
        if isinstance(data.get(name), dict):
            row = data[name]
            lines.append(f"{name}: {row['factory']}, median {row['single_query_median_ms']:.1f} ms, "
                         f"recall@10 {row['recall_at_10']:.3f}")  # fmt: skip
    if "embedding" in data:
        embedding = data["embedding"]
        line = f"embedding: {embedding['images_per_s']:.1f} images/s ({embedding['model']})"
        if "channels_last_speedup" in embedding:
            line += f", {embedding['channels_last_speedup']:.2f}x the NCHW input's {embedding['nchw_images_per_s']:.1f}"
        lines.append(line)
    return lines


def _last_json_object(stdout: str) -> dict:
    """The indented JSON object a script prints last (from the last line that is a lone ``{``)."""
    lines = stdout.rstrip().splitlines()
    start = max(index for index, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


SUMMARIZERS = {
    "vs_open_clip.py": _vs_open_clip,
    "gpu_throughput.py": _gpu_throughput,
    "data_throughput.py": _data_throughput,
    "lit_speed.py": _lit_speed,
    "memory.py": _memory,
}
# scripts without --json whose last output is an indented JSON object
STDOUT_SUMMARIZERS = {"search_speed.py": _search_speed}


def figures_of(script: str, json_path: Path | None, stdout: str) -> list[str]:
    """The script's medians from its JSON when a summarizer knows its layout, else its last printed lines."""
    tail = stdout.rstrip().splitlines()[-TAIL_LINES:]
    try:
        if json_path is not None and json_path.is_file() and script in SUMMARIZERS:
            return SUMMARIZERS[script](json.loads(json_path.read_text(encoding="utf-8")))
        if script in STDOUT_SUMMARIZERS:
            return STDOUT_SUMMARIZERS[script](_last_json_object(stdout))
    except (KeyError, TypeError, ValueError) as exc:  # a changed layout: fall back to what it printed
        return [f"(its output is not in the layout run_all.py knows: {exc!r}; the end of its output:)", *tail]
    return tail


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
def shown_command(plan: Plan) -> str:
    return " ".join(["python", f"benchmarks/{plan.script.name}", *plan.arguments])


def run_plan(plan: Plan, timeout: float | None, scratch: Path) -> Outcome:
    outcome = Outcome(plan)
    if plan.arguments is None:
        return outcome
    json_path = scratch / f"{plan.script.stem}.json" if plan.takes_json else None
    command = [sys.executable, str(plan.script), *plan.arguments]
    if json_path is not None:
        command += ["--json", str(json_path)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=plan.script.parent.parent)
    except subprocess.TimeoutExpired:
        outcome.error = f"ran past --timeout {timeout:g} s"
        return outcome
    outcome.returncode = done.returncode
    if done.returncode != 0:
        outcome.error = (done.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
        return outcome
    outcome.figures = figures_of(plan.script.name, json_path, done.stdout)
    return outcome


def machine_line() -> str:
    """Device, CPU, torch and the load average, for the head of the block (torch imported only here)."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = " ".join(f"{value:.1f}" for value in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores, {device}; torch {torch.__version__}, Python {platform.python_version()}; load average {load}"


def results_block(outcomes: list[Outcome], quick: bool, machine_before: str, machine_after: str) -> str:
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    mode = "--quick: each script's quick or smoke mode; the figures only show the scripts run" if quick else "full"
    lines = [
        BEGIN,
        f"Written by `python benchmarks/run_all.py{' --quick' if quick else ''}` on {today} ({mode}).",
        "",
        f"- machine at the start: {machine_before}",
        f"- machine at the end: {machine_after}",
        "",
    ]
    for outcome in outcomes:
        plan = outcome.plan
        if plan.arguments is None:
            lines += [f"**{plan.script.name}**: {plan.mode}", ""]
            continue
        status = "ok" if outcome.returncode == 0 else f"FAILED ({outcome.error})"
        lines += [f"**{plan.script.name}** ({plan.mode}): `{shown_command(plan)}`: {status}", ""]
        if outcome.figures:
            lines += ["```", *outcome.figures, "```", ""]
    return "\n".join([*lines, END])


def write_readme(readme: Path, block: str) -> None:
    """Replace the block between the markers, or append it as a new section; atomically."""
    from clipforge.io import atomic_write_text

    text = readme.read_text(encoding="utf-8") if readme.exists() else "# Benchmarks\n"
    begin, end = text.find(BEGIN), text.find(END)
    if begin >= 0 and end > begin:
        text = text[:begin] + block + text[end + len(END) :]
    else:
        text = text.rstrip("\n") + f"\n\n{SECTION_TITLE}\n\n{block}\n"
    atomic_write_text(readme, text, replace=True)  # the README is the script's own to update


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="each script in its quick/smoke mode")
    parser.add_argument("--only", nargs="+", default=None, help="run only these scripts (file names)")
    parser.add_argument("--skip", nargs="+", default=[], help="do not run these scripts (file names)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per script (default: 900 with --quick)")
    parser.add_argument("--folder", type=Path, default=Path(__file__).resolve().parent, help=argparse.SUPPRESS)
    parser.add_argument("--readme", type=Path, default=None, help="the README to update (default: the folder's)")
    parser.add_argument("--no-readme", action="store_true", help="print the figures, leave the README alone")
    args = parser.parse_args(argv)
    scripts = benchmark_scripts(args.folder)
    names = {script.name for script in scripts}
    unknown = sorted((set(args.only or []) | set(args.skip)) - names)
    if unknown:
        parser.error(f"no benchmark script {unknown} in {args.folder}; the scripts are {sorted(names)}")
    scripts = [s for s in scripts if (args.only is None or s.name in args.only) and s.name not in args.skip]
    timeout = args.timeout if args.timeout is not None else (900.0 if args.quick else None)
    machine_before = machine_line()
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="clipforge-run-all-") as scratch:
        for index, script in enumerate(scripts, 1):
            plan = plan_for(script, args.quick)
            shown = shown_command(plan) if plan.arguments is not None else plan.mode
            print(f"[{index}/{len(scripts)}] {script.name}: {shown}", flush=True)
            outcomes.append(run_plan(plan, timeout, Path(scratch)))
            outcome = outcomes[-1]
            print(
                "\n".join(f"    {line}" for line in outcome.figures) or f"    {outcome.error or plan.mode}", flush=True
            )
    block = results_block(outcomes, args.quick, machine_before, machine_line())
    if not args.no_readme:
        readme = args.readme or args.folder / "README.md"
        write_readme(readme, block)
        print(f"wrote the results block of {readme}")
    failed = [o.plan.script.name for o in outcomes if o.plan.arguments is not None and o.returncode != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
