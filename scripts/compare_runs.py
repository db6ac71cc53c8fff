"""Compare two training runs at equal steps: their configs, M curves, SWD evaluations and a verdict.

    python scripts/compare_runs.py runs/baseline runs/skip
    python scripts/compare_runs.py runs/baseline runs/skip --plot compare.png --json

A run folder is what scripts/train.py writes: config.json, stats.jsonl (a row per logging window with M; rows with
"swd" are evaluations) and latest.pt, if it has one. Only the steps both runs logged are compared. The verdict goes
by the mean SWD over the last (up to 3) steps both runs were evaluated at; without evaluations, by the mean M over
the last common steps (M tracks convergence, not sample quality, so that verdict is weaker and says so). Differences
within the noise between two runs of one setting are called even: under 30% for SWD, 10% for M (above the largest
differences measured between two runs of one setting, README Results). No verdict is given between runs whose
numbers do not measure the same thing: SWD of another image size, evaluation size or data set, and M of another
gamma (M = L_real + |gamma L_real - L_fake|). Bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from began_fast.startup import quiet_ctrl_c_while_importing  # noqa: E402

with quiet_ctrl_c_while_importing():
    from began_fast.checkpoint import CheckpointError, another_runs, load_checkpoint
    from began_fast.cli import (
        OneLineParser,
        check_stop,
        check_writable,
        input_path,
        interruption,
        one_line,
        output_path,
        print_result,
        stop_signals,
        warnings_as_lines,
    )
    from began_fast.config import ConfigError, DataConfig
    from began_fast.data import fitted_crop
    from began_fast.reports import plot_runs, read_stats, swd_points, training_rows
    from began_fast.run_folder import check_not_a_runs_file


# The relative difference below which the runs are called even, per measure: above the largest difference measured
# between two runs of one setting (README, Results), with a margin. SWD: the largest is 26%, two runs of the demo
# preset with the same seed and settings (commits 20f795b and d336f00, other thread counts), 167.85 and 226.59 at step
# 4000 (217.23 and 238.38 at 2000: 9%; 132.10 and 150.61 at 6000: 12%; 16% in their mean over the three); seeds 0
# and 1 differed by 7%, 8% and 6% at steps 2000, 4000 and 6000. A verdict may rest on one common evaluation, so the
# single-snapshot gap sets it. Two pairs of runs are all that was measured: a larger gap may yet turn up. M: the mean
# over the last 10 logged steps of those two seeds differed by 3.9%.
EVEN = {"SWD": 0.30, "M": 0.10}
SWD_TAIL = 3  # common evaluations averaged for the SWD verdict
M_TAIL = 10  # common logged steps averaged for the M verdict
# The settings that must match for a verdict by each measure (config.json keys, flattened).
SAME_DATA = ("model.image_size", "data.path", "data.source", "data.crop", "data.crop_size", "data.builtin_seed")
MUST_MATCH = {"SWD": (*SAME_DATA, "train.eval_images"), "M": (*SAME_DATA, "train.gamma")}
# config.json keys that name or describe the last invocation, not how the run trains: left out of the config diff,
# where two runs' names and folders always differed.
NOT_SETTINGS = ("run.run_id", "run.out", "run.resume", "run.quiet")


class RunFolderError(ValueError):
    """A run folder is missing or incomplete; the message is one line meant for the user."""


@dataclass
class RunRecord:
    name: str
    config: dict
    stats: list[dict]
    checkpoint_step: int | None

    @property
    def m_by_step(self) -> dict[int, float]:
        return {r["step"]: r["m"] for r in training_rows(self.stats)}

    @property
    def swd_by_step(self) -> dict[int, float]:
        return dict(swd_points(self.stats))


def load_run(folder: Path) -> RunRecord:
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise RunFolderError(f"run folder {folder} {what} (expected the --out folder of scripts/train.py)")
    config_path, stats_path = folder / "config.json", folder / "stats.jsonl"
    for path in (config_path, stats_path):
        if not path.is_file():
            raise RunFolderError(f"{folder} is not a run folder: {path.name} is missing")
    try:
        config = json.loads(config_path.read_bytes())
    except ValueError:  # not JSON, or not UTF-8 (UnicodeDecodeError)
        raise RunFolderError(f"{config_path} is not valid JSON") from None
    if not isinstance(config, dict):
        raise RunFolderError(f"{config_path} does not hold a JSON object")
    stats = read_stats(stats_path, warn=True)
    if not training_rows(stats):
        raise RunFolderError(f"{stats_path} has no logged step yet (no row with a finite M)")
    latest = folder / "latest.pt"
    step = None
    if latest.is_file():
        state = load_checkpoint(latest)
        why = another_runs(latest, state, config)  # as train.py refuses to resume it there
        if why:
            raise RunFolderError(f"{why}: its step is not theirs")
        step = state["step"]
    return RunRecord(folder.name or str(folder), config, stats, step)


def with_its_crop(config: dict) -> dict:
    """config.json with the crop its run took written out where it saved none (runs before the crop was saved: an
    image folder's default, told by the folder's name), so that such a run compares with a later one on the same
    data. As it is where the data cannot be resolved (moved, or not a run's data settings)."""
    try:
        data = DataConfig(**config["data"])
    except (KeyError, TypeError, ValueError):
        return config
    return config | {"data": config["data"] | {"crop": fitted_crop(data).crop}}


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _relative_verdict(name_a: str, name_b: str, a: float, b: float, what: str, even: float) -> str:
    # Lower is better for SWD and for M.
    if abs(a - b) <= even * max(abs(a), abs(b)):
        return f"even: {what}: {a:.4g} vs {b:.4g}, apart by less than {even:.0%} of the larger, within two runs' noise"
    better, worse = (name_a, name_b) if a < b else (name_b, name_a)
    return f"{better} is better than {worse}: {what}: {a:.4g} ({name_a}) vs {b:.4g} ({name_b})"


def compare(a: RunRecord, b: RunRecord) -> dict:
    """The comparison as a JSON-ready dict (the table and the --json output are both made from it)."""
    m_a, m_b = a.m_by_step, b.m_by_step
    common = sorted(set(m_a) & set(m_b))
    if not common:
        raise RunFolderError(
            f"the runs share no logged step ({a.name}: {min(m_a)}..{max(m_a)}, {b.name}: {min(m_b)}..{max(m_b)})"
        )
    swd_a, swd_b = a.swd_by_step, b.swd_by_step
    # Each row's SWD pair in the order of "runs" (not keyed by run name: a run may be named "step").
    swd_common = [{"step": s, "swd": [swd_a[s], swd_b[s]]} for s in sorted(set(swd_a) & set(swd_b))]
    tail = common[-M_TAIL:]
    tail_m = (sum(m_a[s] for s in tail) / len(tail), sum(m_b[s] for s in tail) / len(tail))
    config_a, config_b = flatten(with_its_crop(a.config)), flatten(with_its_crop(b.config))
    config_diff = {
        key: [config_a.get(key), config_b.get(key)]
        for key in sorted(set(config_a) | set(config_b))
        if config_a.get(key) != config_b.get(key) and key not in NOT_SETTINGS
    }
    measure = "SWD" if swd_common else "M"
    differing = [key for key in MUST_MATCH[measure] if key in config_diff]
    m_comparable = not any(key in config_diff for key in MUST_MATCH["M"])
    m_what = f"mean M over the last {len(tail)} common steps"
    m_verdict = _relative_verdict(a.name, b.name, *tail_m, m_what, EVEN["M"]) if m_comparable else None
    if differing:
        settings = ", ".join(f"{key} {config_diff[key][0]} vs {config_diff[key][1]}" for key in differing)
        verdict = f"none: {measure} does not compare runs with different {settings}"
    elif swd_common:
        last = swd_common[-SWD_TAIL:]
        means = [sum(row["swd"][run] for row in last) / len(last) for run in (0, 1)]
        steps = ", ".join(str(row["step"]) for row in last)
        what = f"SWD at step {steps}" if len(last) == 1 else f"mean SWD at steps {steps}"
        verdict = _relative_verdict(a.name, b.name, *means, what, EVEN["SWD"])
    else:
        what = f"{m_what} (no common SWD evaluation; M is a weaker guide)"
        verdict = _relative_verdict(a.name, b.name, *tail_m, what, EVEN["M"])
    return {
        "runs": [a.name, b.name],
        "checkpoint_steps": [a.checkpoint_step, b.checkpoint_step],
        "config_diff": config_diff,
        "common_steps": {"count": len(common), "first": common[0], "last": common[-1]},
        "m_mean_abs_diff": sum(abs(m_a[s] - m_b[s]) for s in common) / len(common),
        "m_at_last_common_step": [m_a[common[-1]], m_b[common[-1]]],
        "m_tail_mean": list(tail_m),
        "swd_at_common_steps": swd_common,
        "verdict": verdict,
        # M's own verdict beside SWD's: early in a run SWD can rank a G collapsed to one face below an untrained one
        # (whose output scores about as uniform noise does), where M tells them apart.
        "m_verdict": m_verdict if measure == "SWD" else None,
    }


def format_table(c: dict) -> str:
    a, b = c["runs"]
    steps = c["common_steps"]
    step_a, step_b = c["checkpoint_steps"]
    lines = [f"runs              {a} vs {b}", f"checkpoint step   {step_a} vs {step_b}"]
    lines += [f"config {key}: {va} vs {vb}" for key, (va, vb) in c["config_diff"].items()]
    lines += [
        f"common steps      {steps['count']} logged, {steps['first']}..{steps['last']}",
        f"M mean |diff|     {c['m_mean_abs_diff']:.4f}",
        f"M at step {steps['last']:<7} {c['m_at_last_common_step'][0]:.4f} vs {c['m_at_last_common_step'][1]:.4f}",
    ]
    lines += [
        f"SWD at step {row['step']:<5} {row['swd'][0]:.2f} vs {row['swd'][1]:.2f}" for row in c["swd_at_common_steps"]
    ]
    lines.append(f"verdict: {c['verdict']}")
    if c["m_verdict"] is not None:
        lines.append(f"by M alone: {c['m_verdict']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a", type=input_path)
    p.add_argument("run_b", type=input_path)
    p.add_argument("--json", action="store_true", help="print the comparison as JSON instead of a table")
    p.add_argument("--plot", type=output_path, help="write a PNG with both runs' M (and SWD) curves overlaid")
    args = p.parse_args(argv)
    try:
        with stop_signals(), warnings_as_lines():
            return _compare(args)
    except KeyboardInterrupt as e:
        stop = interruption(e)
        print(f"error: {stop.what}; nothing was written", file=sys.stderr)
        return stop.status


def _compare(args: argparse.Namespace) -> int:
    try:
        if args.plot is not None:
            if args.plot.suffix.lower() != ".png":
                raise ConfigError(f"--plot {args.plot} must name a .png file (the plot is a PNG image)")
            check_not_a_runs_file(args.plot, "--plot")  # --plot RUN/convergence.png replaced the run's own
        a, b = load_run(args.run_a), load_run(args.run_b)
        if args.plot is not None:  # after the runs are read: a refused call creates no folder
            check_writable(args.plot, "--plot")
        if a.name == b.name:
            a.name, b.name = str(args.run_a), str(args.run_b)
        comparison = compare(a, b)
        print_result(json.dumps(comparison, indent=2) if args.json else format_table(comparison))
        if args.plot is not None:
            check_stop()
            plot_runs({a.name: a.stats, b.name: b.stats}, args.plot)
            print(f"plot written to {args.plot}", file=sys.stderr)  # stderr: stdout may be the --json
    except (RunFolderError, CheckpointError, ConfigError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
