"""Turn pytest-benchmark JSON (from --benchmark-json) into a dated record of one GPU run (docs/DESIGN.md section 5).

Writes bench/results/YYYY-MM-DD_<device>_<suite>.json (the input's benchmarks) and .md (a markdown table: per
layer, direction and batch, each provider's median time per call and TFLOP/s, and triton's time over each baseline's:
torch, torch-tf32, torch-bf16, compile), and puts the same table between `<!-- bench:<suite>:start -->` and
`<!-- bench:<suite>:end -->` in each README that has those markers (one named with --readme must have them, but for
the data suite, whose table goes into no README). Each benchmark must carry extra_info {layer, direction, batch,
provider} and may carry flop (per call), as bench/conftest.py's `measure` records them. Every folder and README it
writes is checked first: a refusal leaves everything as it was.

Several JSON files of one suite (say, the torch.compile cases run as a pytest session of their own, which keeps each
session within a time limit) are merged into one record; they must come from one GPU (its UUID), versions and commit.

usage: python scripts/bench_report.py RESULTS.json [MORE.json ...] --suite {data,kernels,step} [--out-dir DIR]
       [--readme FILE]
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from began_fast.startup import quiet_ctrl_c_while_importing  # noqa: E402

with quiet_ctrl_c_while_importing():
    from began_fast.atomic_files import atomic_write
    from began_fast.cli import OneLineParser, check_writable, output_path
    from began_fast.config import ConfigError

PROVIDER_ORDER = ("torch", "torch-tf32", "torch-bf16", "compile", "triton")
BASELINES = ("torch", "torch-tf32", "torch-bf16", "compile")  # triton's time is reported over each of these present
ROW_KEYS = ("layer", "direction", "batch", "provider")
SUITES = ("data", "kernels", "step")  # bench/bench_<suite>.py
# The suites whose table goes into a README; the data suite's loader table is a dated record only, so a README named
# for it (gpu_checks.sh names its README copy for every suite) is left as it is, with a note.
README_SUITES = ("kernels", "step")


class ReportError(ValueError):
    """The benchmark JSON lacks what the report needs; the message says what."""


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def run_info(data: dict) -> dict[str, str]:
    """Device, versions, commit and date of the run, from the JSON's header (see bench/conftest.py)."""
    machine, commit = data.get("machine_info", {}), data.get("commit_info", {})
    sha = machine.get("git_commit") or commit.get("id") or "unknown"
    return {
        "device": machine.get("cuda_device", "unknown"),
        "gpu": machine.get("cuda_uuid", ""),  # which GPU of that name ("" in files written before it was recorded)
        "torch": machine.get("torch", "unknown"),
        "triton": machine.get("triton", "unknown"),
        "commit": sha + ("+dirty" if commit.get("dirty") else ""),
        "date": data.get("datetime", "unknown")[:10],
    }


def collect_rows(data: dict) -> tuple[list[str], dict[tuple, dict[str, dict]]]:
    """(providers in column order, {(layer, direction, batch): {provider: {median_s, spread, flop}}}) in the run's
    order; spread: half the rounds' interquartile range over their median, None where the file has no IQR."""
    rows: dict[tuple, dict[str, dict]] = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        missing = [key for key in ROW_KEYS if key not in info]
        if missing:
            name = bench.get("name")
            raise ReportError(f"benchmark {name!r} has no extra_info {missing}; record them with measure()")
        key = (info["layer"], info["direction"], info["batch"])
        # pytest-benchmark's statistics are per round; a round of measure() makes calls_per_round calls.
        median = bench["stats"]["median"] / info.get("calls_per_round", 1)
        iqr = bench["stats"].get("iqr")  # of the rounds, as the median; pytest-benchmark always writes it
        spread = None if iqr is None else iqr / 2 / bench["stats"]["median"]
        rows.setdefault(key, {})[info["provider"]] = {"median_s": median, "spread": spread, "flop": info.get("flop")}
    seen = {provider for cells in rows.values() for provider in cells}
    providers = [p for p in PROVIDER_ORDER if p in seen] + sorted(seen - set(PROVIDER_ORDER))
    return providers, rows


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _ms(cell: dict | None) -> str:
    """A provider's median ms, with its spread where the file has one ("4.000 ±2.5%")."""
    if cell is None:
        return "–"
    spread = "" if cell["spread"] is None else f" ±{100 * cell['spread']:.1f}%"
    return f"{1e3 * cell['median_s']:.3f}{spread}"


def render_table(data: dict) -> str:
    """The markdown table: median ms and TFLOP/s per provider, and triton's time over torch's and compile's."""
    providers, rows = collect_rows(data)
    ratios = [p for p in BASELINES if p in providers and "triton" in providers]
    # A FLOP rate only for the providers whose cases count FLOPs (a data loader's do not).
    counted = [p for p in providers if any(cells.get(p, {}).get("flop") is not None for cells in rows.values())]
    header = ["layer", "direction", "batch"]
    header += [f"{p} ms" for p in providers] + [f"{p} TFLOP/s" for p in counted]
    header += [f"triton/{p} time" for p in ratios]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (layer, direction, batch), cells in rows.items():
        median = {p: cells[p]["median_s"] if p in cells else None for p in providers}
        tflops = {
            p: cells[p]["flop"] / median[p] / 1e12 if p in cells and cells[p]["flop"] is not None else None
            for p in providers
        }
        row = [str(layer), str(direction), str(batch)]
        row += [_ms(cells.get(p)) for p in providers]
        row += [_fmt(tflops[p], ".1f") for p in counted]
        for p in ratios:
            ratio = median["triton"] / median[p] if median["triton"] is not None and median[p] is not None else None
            row.append(_fmt(ratio, ".2f"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def render_section(data: dict) -> str:
    """The run's header line, the table and how to read it: the body of the .md file and of a README section."""
    info, providers = run_info(data), collect_rows(data)[0]
    notes = [
        "Median time per call (a data-suite call is the round of batches its layer names), of rounds that each make "
        "one or more calls back to back and end in torch.cuda.synchronize(); ± is half the rounds' interquartile "
        "range, relative to the median: a difference within the spreads is noise."
    ]
    if "triton" in providers:
        notes.append("triton/X time < 1 means triton is faster.")
        if "compile" not in providers:
            notes.append(
                "**No torch.compile baseline**: these files hold none of the suite's compile cases; run them on the "
                "same GPU and commit (gpu_checks.sh's bench_step_compile, bench_kernels_compile) and report them "
                "together."
            )
    return (
        f"Device: {info['device']} · torch {info['torch']} · triton {info['triton']} · commit {info['commit']} · "
        f"{info['date']}\n\n" + " ".join(notes) + "\n\n" + render_table(data) + "\n"
    )


def replace_section(text: str, suite: str, body: str) -> str | None:
    """text with the part between the suite's markers replaced by body, or None when text has no such markers."""
    start, end = f"<!-- bench:{suite}:start -->", f"<!-- bench:{suite}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), flags=re.DOTALL)
    if not pattern.search(text):
        return None
    return pattern.sub(lambda _: f"{start}\n{body}{end}", text, count=1)


def read_run(path: Path, may_be_empty: bool = False) -> dict:
    """One pytest-benchmark JSON file; ReportError when it cannot be read, or lacks the benchmarks (unless
    may_be_empty) or what a quoted result must name (device, versions, commit: bench/conftest.py records them)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"cannot read {path} as pytest-benchmark JSON ({e})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path} holds no benchmarks; expected the --benchmark-json of a bench/ suite")
    if not data.get("benchmarks"):
        if may_be_empty:
            return data
        raise ReportError(f"{path} holds no benchmarks; expected the --benchmark-json of a bench/ suite")
    check_layout(path, data)
    unknown = [name for name, value in run_info(data).items() if value.startswith("unknown")]
    if unknown:
        hint = "; on a machine without git, set BEGAN_FAST_COMMIT" if "commit" in unknown else ""
        raise ReportError(f"{path} does not name its {', '.join(unknown)} (bench/conftest.py records them){hint}")
    return data


def check_layout(path: Path, data: dict) -> None:
    """ReportError unless `data` is laid out as pytest-benchmark writes it and bench/conftest.py annotates it (what
    run_info and collect_rows read): a hand-edited or foreign file would otherwise fail with a traceback."""
    machine, commit = data.get("machine_info", {}), data.get("commit_info", {})
    if not (isinstance(machine, dict) and isinstance(commit, dict) and isinstance(data["benchmarks"], list)):
        raise ReportError(f"{path}: machine_info, commit_info or benchmarks is not as pytest-benchmark writes them")
    header = [data.get("datetime"), *(machine.get(key) for key in ("cuda_device", "cuda_uuid", "torch", "triton"))]
    header += [machine.get("git_commit"), commit.get("id")]
    if not all(value is None or isinstance(value, str) for value in header):
        raise ReportError(f"{path}: its datetime, device, versions or commit are not text")
    for bench in data["benchmarks"]:
        name = bench.get("name") if isinstance(bench, dict) else bench
        stats, info = (bench.get("stats"), bench.get("extra_info", {})) if isinstance(bench, dict) else (None, None)
        if not (isinstance(stats, dict) and _positive(stats.get("median")) and isinstance(info, dict)):
            raise ReportError(f"{path}: benchmark {name!r} has no stats.median > 0 or no extra_info object")
        iqr = stats.get("iqr", 0)
        if not (iqr == 0 and not isinstance(iqr, bool) or _positive(iqr)):
            raise ReportError(f"{path}: benchmark {name!r} has a stats.iqr that is not a number >= 0")
        if not _positive(info.get("calls_per_round", 1)) or not (info.get("flop") is None or _positive(info["flop"])):
            raise ReportError(f"{path}: benchmark {name!r} has a calls_per_round or flop that is not a number > 0")
        if not all(isinstance(info.get(key, ""), (str, int)) for key in ROW_KEYS):
            raise ReportError(f"{path}: benchmark {name!r} has an extra_info {', '.join(ROW_KEYS)} not text or number")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


def merge_runs(json_paths: list[Path]) -> dict:
    """One run's JSON from one or more files: the first file's header with every file's benchmarks. Among several
    files, one without benchmarks (a session stopped by its time limit in its first case) is left out with a note.
    ReportError when the files disagree on the device (name or GPU), versions or commit (they are not one run), or
    when two hold the same case (which one to report would be a silent choice)."""
    read = [(path, read_run(path, may_be_empty=len(json_paths) > 1)) for path in json_paths]
    for path, data in read:
        if not data.get("benchmarks"):
            print(f"note: {path} holds no benchmarks (a session stopped in its first case?): left out", file=sys.stderr)
    read = [(path, data) for path, data in read if data.get("benchmarks")]
    if not read:
        raise ReportError(f"{', '.join(map(str, json_paths))} hold no benchmarks")
    (first_path, first_run), runs = read[0], [data for _, data in read]
    first = {key: value for key, value in run_info(first_run).items() if key != "date"}
    for path, data in read[1:]:
        info = {key: value for key, value in run_info(data).items() if key != "date"}
        if info != first:
            raise ReportError(f"{path} is from another run than {first_path}: {info} vs {first}")
    seen: dict[tuple, Path] = {}
    for path, data in read:
        for bench in data["benchmarks"]:
            info = bench.get("extra_info", {})
            case = tuple(info.get(key) for key in ROW_KEYS)
            if None in case:  # collect_rows says what is missing
                continue
            if case in seen:
                raise ReportError(f"{path} and {seen[case]} both hold the case {case}; give each case's file once")
            seen[case] = path
    return first_run | {"benchmarks": [bench for data in runs for bench in data["benchmarks"]]}


def write_report(json_paths: Path | list[Path], suite: str, out_dir: Path, readmes: list[Path]) -> list[Path]:
    """Write the dated .json (the merged input) and .md table and update the READMEs; returns the paths written."""
    json_paths = [json_paths] if isinstance(json_paths, Path) else list(json_paths)
    data = merge_runs(json_paths)
    info = run_info(data)
    body = render_section(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{info['date']}_{slug(info['device'])}_{slug(suite)}"
    # Each file whole or as it was (atomic_write): an interrupted report never leaves a README cut short.
    record = json_paths[0].read_bytes() if len(json_paths) == 1 else (json.dumps(data, indent=2) + "\n").encode()
    atomic_write(stem.with_suffix(".json"), lambda f: f.write(record))
    atomic_write(stem.with_suffix(".md"), lambda f: f.write(f"# Benchmarks: {suite}\n\n{body}".encode()))
    written = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    for readme in readmes:
        updated = replace_section(readme.read_text(), suite, body)
        if updated is not None:
            atomic_write(readme, lambda f, text=updated: f.write(text.encode()))
            written.append(readme)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+", help="pytest-benchmark JSON written by --benchmark-json")
    parser.add_argument(
        "--suite", required=True, choices=SUITES, help="the bench/ suite: file names and README markers"
    )
    parser.add_argument("--out-dir", type=output_path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--readme",
        type=output_path,
        action="append",
        help="README to update between the suite's markers (repeatable; default: bench/README.md and README.md)",
    )
    args = parser.parse_args(argv)
    readmes = args.readme or [ROOT / "bench" / "README.md", ROOT / "README.md"]
    try:
        if args.out_dir.exists() and not args.out_dir.is_dir():
            raise ReportError(f"--out-dir {args.out_dir} is a file; expected a folder for the reports")
        missing = [str(readme) for readme in readmes if not readme.exists()]
        if missing:
            raise ReportError(f"--readme {', '.join(missing)}: no such file")
        for readme in readmes:  # read before anything is written: a PNG named by mistake is refused, not a traceback
            if readme.is_dir():
                raise ReportError(f"--readme {readme} is a folder; expected a markdown README")
            try:
                marked = replace_section(readme.read_text(), args.suite, "") is not None
            except UnicodeDecodeError:
                raise ReportError(f"--readme {readme}: not a UTF-8 text file; expected a markdown README") from None
            if marked:  # replaced once the records are written: a folder that takes no files fails before them
                check_writable(readme, "--readme", create=False)
            elif args.readme and args.suite in README_SUITES:  # a README named for the table would not get it
                raise ReportError(
                    f"--readme {readme} has no <!-- bench:{args.suite}:start --> and <!-- bench:{args.suite}:end --> "
                    f"markers; expected a README with a section for the {args.suite} table"
                )
            elif args.readme:
                print(
                    f"note: the {args.suite} suite's table goes into no README: {readme} left as it is", file=sys.stderr
                )
        check_writable(args.out_dir, "--out-dir", folder=True, create=False)  # create=False: bad input makes no folder
        written = write_report(args.json, args.suite, args.out_dir, readmes)
    except (ReportError, ConfigError, OSError) as e:  # nothing is written before the input is checked
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
