"""scripts/bench_report.py on a small synthetic pytest-benchmark JSON (made-up numbers; tests the writer only)."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from began_fast import provenance
from tests.scripts import ROOT, load_script

bench_report = load_script("bench_report")


def synthetic_bench(layer, direction, batch, provider, median_s, flop):
    return {
        "name": f"test_synthetic[{layer}-{batch}-{direction}-{provider}]",
        "stats": {"median": median_s},
        "extra_info": {"layer": layer, "direction": direction, "batch": batch, "provider": provider, "flop": flop},
    }


SYNTHETIC = {
    "machine_info": {
        "cuda_device": "Synthetic GPU 80GB",
        "cuda_uuid": "GPU-0123",
        "torch": "9.9.0",
        "triton": "8.8.0",
        "git_commit": "abc123",
    },
    "commit_info": {"id": "abc123def", "dirty": True},
    "datetime": "2031-02-03T04:05:06+00:00",
    "benchmarks": [
        synthetic_bench("conv A", "forward", 16, "torch", 0.004, 8e12),
        synthetic_bench("conv A", "forward", 16, "compile", 0.003, 8e12),
        synthetic_bench("conv A", "forward", 16, "triton", 0.002, 8e12),
        synthetic_bench("balance 64px", "both", 64, "torch", 0.0005, None),
        synthetic_bench("balance 64px", "both", 64, "triton", 0.0001, None),
    ],
}


def table_rows(markdown):
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_report_files_and_table(tmp_path):
    source = tmp_path / "run.json"
    source.write_text(json.dumps(SYNTHETIC))
    out_dir = tmp_path / "results"
    written = bench_report.write_report(source, "kernels", out_dir, readmes=[])
    stem = out_dir / "2031-02-03_synthetic-gpu-80gb_kernels"
    assert bench_report.slug(" NVIDIA H200 (SXM) ") == "nvidia-h200-sxm" and bench_report.slug("--") == "unknown"
    assert written == [stem.with_suffix(".json"), stem.with_suffix(".md")]
    assert json.loads(stem.with_suffix(".json").read_text()) == SYNTHETIC
    markdown = stem.with_suffix(".md").read_text()
    assert "Synthetic GPU 80GB" in markdown and "torch 9.9.0" in markdown and "triton 8.8.0" in markdown
    assert "commit abc123+dirty" in markdown
    header, _, conv, balance = table_rows(markdown)
    assert header == [
        "layer", "direction", "batch", "torch ms", "compile ms", "triton ms",
        "torch TFLOP/s", "compile TFLOP/s", "triton TFLOP/s", "triton/torch time", "triton/compile time",
    ]  # fmt: skip
    # 8e12 FLOP in 4 / 3 / 2 ms: 2000, 2666.7, 4000 TFLOP/s; triton takes 0.5x torch's time and 0.67x compile's.
    assert conv == ["conv A", "forward", "16", "4.000", "3.000", "2.000", "2000.0", "2666.7", "4000.0", "0.50", "0.67"]
    # No compile run and no FLOP count for the balance op: dashes, and only the triton/torch ratio.
    assert balance == ["balance 64px", "both", "64", "0.500", "–", "0.100", "–", "–", "–", "0.20", "–"]


def test_times_are_per_call_of_rounds_of_several_calls():
    """The step suite times rounds of several steps back to back; the table gives the time of one."""
    benches = [
        synthetic_bench("paper64", "step", 16, p, median_s, 3e12) for p, median_s in (("torch", 0.5), ("triton", 0.1))
    ]
    benches[0]["extra_info"]["calls_per_round"] = benches[1]["extra_info"]["calls_per_round"] = 5
    _, _, row = table_rows(bench_report.render_table(dict(SYNTHETIC, benchmarks=benches)))
    # 0.5 s and 0.1 s per round of 5 steps: 100 and 20 ms a step, 30 and 150 TFLOP/s.
    assert row == ["paper64", "step", "16", "100.000", "20.000", "30.0", "150.0", "0.20"]


def test_triton_is_timed_over_every_baseline_of_the_run():
    """One ratio column per baseline the run measured, fp32, tf32 and bf16 eager and compile, each over its own time."""
    times = (("torch", 0.004), ("torch-tf32", 0.0025), ("torch-bf16", 0.001), ("compile", 0.003), ("triton", 0.002))
    benches = [synthetic_bench("conv A", "forward", 16, p, median_s, 8e12) for p, median_s in times]
    header, _, row = table_rows(bench_report.render_table(dict(SYNTHETIC, benchmarks=benches)))
    ratios = ["triton/torch time", "triton/torch-tf32 time", "triton/torch-bf16 time", "triton/compile time"]
    assert header[-4:] == ratios and row[-4:] == ["0.50", "0.80", "2.00", "0.67"]


def test_readme_section_is_replaced_between_markers_only(tmp_path):
    source = tmp_path / "run.json"
    source.write_text(json.dumps(SYNTHETIC))
    before, after = "# Bench\n\nintro text\n\n", "\n\nmore text <!-- bench:step:start -->keep<!-- bench:step:end -->\n"
    readme = tmp_path / "README.md"
    readme.write_text(before + "<!-- bench:kernels:start -->\nold table\n<!-- bench:kernels:end -->" + after)
    assert (
        bench_report.main([str(source), "--suite", "kernels", "--out-dir", str(tmp_path / "r"), f"--readme={readme}"])
        == 0
    )
    text = readme.read_text()
    assert text.startswith(before) and text.endswith(after)
    assert "old table" not in text
    section = text[len(before) : -len(after)]
    assert section.startswith("<!-- bench:kernels:start -->\nDevice: Synthetic GPU 80GB")
    assert section.endswith("<!-- bench:kernels:end -->")
    assert "| conv A | forward | 16 | 4.000 |" in section


def test_a_readme_named_without_the_suite_s_markers_is_refused_and_the_data_suite_s_is_left_with_a_note(
    tmp_path, capsys
):
    """A README named with --readme that has no markers for the suite got nothing, without a word (--suite kernel,
    a typo, wrote kernel records and updated no README): it is refused before anything is written. The data suite's
    table goes into no README by design (gpu_checks.sh names its README copy for every suite): a note says so."""
    source = tmp_path / "run.json"
    source.write_text(json.dumps(SYNTHETIC))
    readme = tmp_path / "README.md"
    marked = "<!-- bench:kernels:start -->\nold table\n<!-- bench:kernels:end -->\n"
    readme.write_text(marked)
    argv = [str(source), "--out-dir", str(tmp_path / "r"), f"--readme={readme}", "--suite"]
    assert bench_report.main([*argv, "step"]) == 2
    assert capsys.readouterr().err == (
        f"error: --readme {readme} has no <!-- bench:step:start --> and <!-- bench:step:end --> markers; expected a "
        "README with a section for the step table\n"
    )
    assert readme.read_text() == marked and not (tmp_path / "r").exists()
    assert bench_report.main([*argv, "data"]) == 0
    assert capsys.readouterr().err == f"note: the data suite's table goes into no README: {readme} left as it is\n"
    assert readme.read_text() == marked
    assert sorted(path.name for path in (tmp_path / "r").iterdir()) == [
        "2031-02-03_synthetic-gpu-80gb_data.json",
        "2031-02-03_synthetic-gpu-80gb_data.md",
    ]


def test_the_suites_are_bench_s_and_the_readmes_mark_those_that_go_into_them():
    """--suite is one of bench/bench_<suite>.py, and README_SUITES, whose README named without markers is refused,
    are the suites the READMEs have sections for."""
    assert bench_report.SUITES == tuple(
        sorted(p.stem.removeprefix("bench_") for p in (ROOT / "bench").glob("bench_*.py"))
    )
    readmes = (ROOT / "README.md", ROOT / "bench" / "README.md")
    marked = {suite for readme in readmes for suite in re.findall(r"<!-- bench:(\w+):start -->", readme.read_text())}
    assert marked == set(bench_report.README_SUITES)


def refuse_new_files_in(folder: Path, monkeypatch) -> None:
    """`folder` refuses new files and folders, as a read-only folder does (EACCES): as root, which CI's containers
    run as, permission bits are ignored, so a chmod would test nothing."""
    real_open, real_mkdir = os.open, os.mkdir
    tmpfile = getattr(os, "O_TMPFILE", 0)  # an unnamed file in the folder named (TemporaryFile on Linux)

    def refused(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def open_(path, flags, *args, **kwargs):
        if tmpfile and flags & tmpfile == tmpfile and Path(path) == folder:
            refused(path)
        if flags & os.O_CREAT and Path(path).parent == folder:
            refused(path)
        return real_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if Path(path).parent == folder:
            refused(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.mark.parametrize("locked", ["--readme", "--out-dir"])
def test_a_folder_that_takes_no_files_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys, locked):
    """A README in a read-only folder failed after the dated .json and .md were written, with "[Errno 13] Permission
    denied: '.../.README.md.x.began-fast.tmp'"; an --out-dir in one with "[Errno 13] Permission denied: '...'". Each
    is refused in one line that names its flag, before anything is written."""
    source = tmp_path / "run.json"
    source.write_text(json.dumps(SYNTHETIC))
    folder = tmp_path / "locked"
    folder.mkdir()
    readme = (folder if locked == "--readme" else tmp_path) / "README.md"
    marked = "<!-- bench:kernels:start -->\nold table\n<!-- bench:kernels:end -->\n"
    readme.write_text(marked)
    out_dir = (tmp_path if locked == "--readme" else folder) / "r"
    refuse_new_files_in(folder, monkeypatch)
    argv = [str(source), "--suite", "kernels", "--out-dir", str(out_dir), f"--readme={readme}"]
    assert bench_report.main(argv) == 2
    named = readme if locked == "--readme" else out_dir
    assert capsys.readouterr().err == f"error: {locked} {named}: cannot write into {folder} (Permission denied)\n"
    assert readme.read_text() == marked and not out_dir.exists()
    assert sorted(path.name for path in folder.iterdir()) == (["README.md"] if locked == "--readme" else [])


def test_a_write_that_fails_leaves_the_readme_whole(tmp_path, monkeypatch, capsys):
    """A disk that fills up while the report is written (here: every fsync fails) ends with one line and status 2,
    and the README is as it was, with no temporary file beside it: each file is replaced whole or not at all."""
    source = tmp_path / "run.json"
    source.write_text(json.dumps(SYNTHETIC))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:kernels:start -->\nold table\n<!-- bench:kernels:end -->\n")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    rc = bench_report.main([str(source), "--suite", "kernels", "--out-dir", str(tmp_path / "r"), f"--readme={readme}"])
    first = f"{re.escape(str(tmp_path / 'r'))}/[^/]+\\.json"  # the first file it writes, named
    said = f"error: \\[Errno 28\\] cannot write {first}: No space left on device\n"
    assert rc == 2 and re.fullmatch(said, capsys.readouterr().err)
    assert readme.read_text() == "intro\n<!-- bench:kernels:start -->\nold table\n<!-- bench:kernels:end -->\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["README.md", "r", "run.json"]
    assert list((tmp_path / "r").iterdir()) == []


def test_missing_extra_info_is_a_clear_error(tmp_path):
    """Two cases lacking the same keys are named for what they lack, not taken for one case given twice."""
    lacking = [{"name": f"test_{x}", "stats": {"median": 1.0}, "extra_info": {"layer": "a"}} for x in "xy"]
    data = dict(SYNTHETIC, benchmarks=lacking)
    source = tmp_path / "run.json"
    source.write_text(json.dumps(data))
    with pytest.raises(bench_report.ReportError, match="direction"):
        bench_report.write_report(source, "kernels", tmp_path, readmes=[])


def test_several_files_of_one_run_make_one_table_and_others_are_refused(tmp_path):
    """The compile cases, run as a session of their own, join the same table; a file from another commit may not."""
    eager = dict(SYNTHETIC, benchmarks=[b for b in SYNTHETIC["benchmarks"] if b["extra_info"]["provider"] != "compile"])
    compiled = dict(
        SYNTHETIC, benchmarks=[b for b in SYNTHETIC["benchmarks"] if b["extra_info"]["provider"] == "compile"]
    )
    bf16 = dict(SYNTHETIC, benchmarks=[synthetic_bench("conv A", "forward", 16, "torch-bf16", 0.001, 8e12)])
    paths = []
    for name, data in (("eager", eager), ("compile", compiled), ("bf16", bf16)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(data))
    written = bench_report.write_report(paths, "kernels", tmp_path / "r", readmes=[])
    assert len(json.loads(written[0].read_text())["benchmarks"]) == 6
    header, _, conv, _ = table_rows(written[1].read_text())
    assert header[-3:] == ["triton/torch time", "triton/torch-bf16 time", "triton/compile time"]
    assert conv[3:7] == ["4.000", "1.000", "3.000", "2.000"] and conv[-3:] == ["0.50", "2.00", "0.67"]
    for differing in ({"git_commit": "fff"}, {"cuda_uuid": "GPU-another-one"}):
        other = tmp_path / "other.json"
        other.write_text(json.dumps(dict(compiled, machine_info=SYNTHETIC["machine_info"] | differing)))
        with pytest.raises(bench_report.ReportError, match="from another run"):
            bench_report.write_report([paths[0], other], "kernels", tmp_path / "r", readmes=[])


def test_a_file_stopped_in_its_first_case_is_left_out_and_a_repeated_case_refused(tmp_path, capsys):
    """A session stopped by its time limit in its first case writes a JSON with no benchmarks: among several files
    it is left out with a note, not fatal to the others; a case in two files is refused, not reported from one."""
    whole, stopped, again = tmp_path / "step.json", tmp_path / "step_compile.json", tmp_path / "step_again.json"
    whole.write_text(json.dumps(SYNTHETIC))
    stopped.write_text(json.dumps(dict(SYNTHETIC, benchmarks=[])))
    written = bench_report.write_report([whole, stopped], "step", tmp_path / "r", readmes=[])
    assert len(json.loads(written[0].read_text())["benchmarks"]) == len(SYNTHETIC["benchmarks"])
    assert f"note: {stopped} holds no benchmarks" in capsys.readouterr().err
    again.write_text(json.dumps(dict(SYNTHETIC, benchmarks=SYNTHETIC["benchmarks"][2:3])))
    with pytest.raises(bench_report.ReportError, match=r"both hold the case \('conv A', 'forward', 16, 'triton'\)"):
        bench_report.write_report([whole, again], "step", tmp_path / "r", readmes=[])
    with pytest.raises(bench_report.ReportError, match="hold no benchmarks"):
        bench_report.write_report([stopped, stopped], "step", tmp_path / "r", readmes=[])


NO_COMMIT = dict(SYNTHETIC, machine_info=SYNTHETIC["machine_info"] | {"git_commit": "unknown"}, commit_info={})


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read"),
        ("not json", "cannot read"),
        ("{}", "holds no benchmarks"),
        (json.dumps(dict(SYNTHETIC, machine_info={})), "does not name its device, torch, triton (bench/conftest.py"),
        (json.dumps(NO_COMMIT), "does not name its commit (bench/conftest.py records them); on a machine without git"),
    ],
    ids=["missing", "not-json", "empty", "no-machine-info", "no-commit"],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, content, message):
    """Before, `{}` put a record of an unknown device and commit with an empty table into both READMEs."""
    err = refused(tmp_path, capsys, content)
    assert err.startswith("error: ") and message in err, err


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: json, --suite"),
        (["run.json", "--suite", "kernels", "--colour"], "unrecognized arguments: --colour"),
        # --suite kernel wrote kernel records and updated no README; an empty --out-dir wrote into the working folder.
        (["run.json", "--suite", "kernel"], "argument --suite: invalid choice: 'kernel' (choose from "),
        (
            ["run.json", "--suite", "kernels", "--out-dir", ""],
            "argument --out-dir: is empty (an unset shell variable?)",
        ),
        (["run.json", "--suite", "kernels", "--readme", ""], "argument --readme: is empty (an unset shell variable?)"),
    ],
    ids=["no-arguments", "unknown-flag", "unknown-suite", "empty-out-dir", "empty-readme"],
)
def test_a_mistyped_command_line_is_one_line(capsys, argv, message):
    """argparse's own errors, as every script's: one line naming the error and --help, status 2, not the usage text."""
    with pytest.raises(SystemExit) as ended:
        bench_report.main(argv)
    err = capsys.readouterr().err
    assert ended.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert err.endswith(" --help)\n"), err


def refused(tmp_path, capsys, content: str | None) -> str:
    """bench_report.main on a run.json holding `content` (None: no file) must end with status 2 and one line on
    stderr, leave the README as it was and create no output folder; returns that line."""
    source = tmp_path / "run.json"
    if content is not None:
        source.write_text(content)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:kernels:start -->\nNo GPU run has been recorded yet.\n<!-- bench:kernels:end -->\n")
    before = readme.read_text()
    rc = bench_report.main([str(source), "--suite", "kernels", "--out-dir", str(tmp_path / "r"), f"--readme={readme}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert readme.read_text() == before and not (tmp_path / "r").exists()
    return err


def edited(edit):
    """SYNTHETIC as JSON with `edit` applied to a copy of it."""
    data = json.loads(json.dumps(SYNTHETIC))
    edit(data)
    return json.dumps(data)


@pytest.mark.parametrize(
    "content, message",
    [
        (edited(lambda d: d["benchmarks"][0].pop("stats")), "has no stats.median > 0 or no extra_info object"),
        (edited(lambda d: d["benchmarks"][0]["stats"].update(median="fast")), "has no stats.median > 0"),
        (edited(lambda d: d["benchmarks"][0]["stats"].update(median=0)), "has no stats.median > 0"),
        (edited(lambda d: d["benchmarks"][0]["stats"].update(median=True)), "has no stats.median > 0"),
        (edited(lambda d: d["benchmarks"][0].update(extra_info=None)), "or no extra_info object"),
        (edited(lambda d: d.update(benchmarks=["x"])), "benchmark 'x' has no stats.median > 0"),
        (edited(lambda d: d.update(benchmarks={"a": 1})), "machine_info, commit_info or benchmarks is not as"),
        (edited(lambda d: d.update(machine_info=[1])), "machine_info, commit_info or benchmarks is not as"),
        (edited(lambda d: d.update(datetime=20310203)), "its datetime, device, versions or commit are not text"),
        (edited(lambda d: d["machine_info"].update(cuda_device=5)), "its datetime, device, versions or commit are"),
        (edited(lambda d: d["benchmarks"][0]["extra_info"].update(calls_per_round=0)), "a calls_per_round or flop"),
        (edited(lambda d: d["benchmarks"][0]["extra_info"].update(flop="many")), "a calls_per_round or flop"),
        (edited(lambda d: d["benchmarks"][0]["extra_info"].update(layer=["a"])), "provider not text or number"),
        (edited(lambda d: d["benchmarks"][0]["stats"].update(iqr="wide")), "has a stats.iqr that is not a number >="),
        (edited(lambda d: d["benchmarks"][0]["stats"].update(iqr=-1)), "has a stats.iqr that is not a number >= 0"),
    ],
    ids=[
        "no-stats",
        "median-text",
        "median-0",
        "median-true",
        "extra-info-null",
        "benchmark-not-object",
        "benchmarks-not-list",
        "machine-info-list",
        "datetime-number",
        "device-number",
        "calls-per-round-0",
        "flop-text",
        "layer-list",
        "iqr-text",
        "iqr-negative",
    ],
)
def test_a_file_not_laid_out_as_pytest_benchmark_writes_it_is_one_line(tmp_path, capsys, content, message):
    """Each of these ended in a traceback (KeyError, TypeError, ZeroDivisionError, AttributeError) before."""
    err = refused(tmp_path, capsys, content)
    assert err.startswith(f"error: {tmp_path / 'run.json'}: ") and message in err, err


def test_a_readme_named_but_missing_is_refused(tmp_path, capsys):
    source = tmp_path / "run.json"
    source.write_text(json.dumps(SYNTHETIC))
    argv = [str(source), "--suite", "kernels", "--out-dir", str(tmp_path / "r"), f"--readme={tmp_path / 'READ.md'}"]
    assert bench_report.main(argv) == 2
    assert capsys.readouterr().err == f"error: --readme {tmp_path / 'READ.md'}: no such file\n"
    assert not (tmp_path / "r").exists()


def test_a_readme_that_is_not_text_is_refused_before_anything_is_written(tmp_path, capsys):
    """A --readme naming a PNG (or any non-UTF-8 file) ended in a UnicodeDecodeError traceback, after the dated
    .json and .md records had been written."""
    source = tmp_path / "run.json"
    source.write_text(json.dumps(SYNTHETIC))
    picture = tmp_path / "plot.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    argv = [str(source), "--suite", "kernels", "--out-dir", str(tmp_path / "r"), f"--readme={picture}"]
    assert bench_report.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: --readme {picture}: not a UTF-8 text file; expected a markdown README\n", err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("named", ["--out-dir", "--readme"])
def test_a_file_for_the_out_dir_or_a_folder_for_a_readme_is_refused_in_one_line(tmp_path, capsys, named):
    """--out-dir naming a file ended in '[Errno 17] File exists', and --readme naming a folder in 'no such file':
    each says what it names and what is expected, and nothing is written."""
    source = tmp_path / "run.json"
    source.write_text(json.dumps(SYNTHETIC))
    readme = tmp_path / "README.md"
    readme.write_text("# a readme\n")
    out_dir = tmp_path / "r"
    if named == "--out-dir":
        out_dir.write_text("a file")
        said = f"error: --out-dir {out_dir} is a file; expected a folder for the reports\n"
    else:
        readme = tmp_path / "docs"
        readme.mkdir()
        said = f"error: --readme {readme} is a folder; expected a markdown README\n"
    argv = [str(source), "--suite", "kernels", "--out-dir", str(out_dir), f"--readme={readme}"]
    assert bench_report.main(argv) == 2
    assert capsys.readouterr().err == said
    assert out_dir.is_file() if named == "--out-dir" else not out_dir.exists()


def test_a_suite_without_triton_or_flop_counts_gets_neither_their_columns_nor_their_note():
    """The data suite times loaders: a table of times only, without empty TFLOP/s columns or the triton note."""
    loaders = SYNTHETIC | {
        "benchmarks": [
            synthetic_bench("64px, 32 batches", "load", 64, provider, median_s, None)
            for provider, median_s in (("torch", 0.4), ("dali-mixed", 0.05))
        ]
    }
    section = bench_report.render_section(loaders)
    assert table_rows(section) == [
        ["layer", "direction", "batch", "torch ms", "dali-mixed ms"],
        ["---", "---", "---", "---", "---"],
        ["64px, 32 batches", "load", "64", "400.000", "50.000"],
    ]
    assert "triton/X" not in section


INTERRUPTED_SUITE = """
import os, signal
import pytest

@pytest.mark.parametrize("case", ["finished", "interrupted", "never-run"])
def test_case(benchmark, case):
    calls = [0]

    def work():
        calls[0] += 1
        if case == "interrupted" and calls[0] == int(os.environ["INTERRUPT_AT_CALL"]):
            os.kill(os.getpid(), signal.SIGINT)  # what gpu_checks.sh's time limit sends

    benchmark.extra_info.update(layer="x", direction="d", batch=1, provider=case)
    benchmark.pedantic(work, rounds=5, iterations=1, warmup_rounds=2)
"""


# Loaded with -p: a SIGINT while pytest-benchmark gathers the machine's description for the JSON it is writing.
INTERRUPT_AT_SESSION_FINISH = """
import os, signal
import pytest_benchmark.plugin

describe_cpu = pytest_benchmark.plugin.get_cpu_info

def interrupted_get_cpu_info():
    os.kill(os.getpid(), signal.SIGINT)
    return describe_cpu()

pytest_benchmark.plugin.get_cpu_info = interrupted_get_cpu_info
"""


@pytest.mark.parametrize(
    "interrupt_at_call", [1, 4, 0], ids=["in-warm-up", "in-timed-rounds", "as-the-json-is-written"]
)
def test_a_suite_interrupted_keeps_the_cases_that_finished(tmp_path, interrupt_at_call):
    """bench/conftest.py marks the interrupted case failed: the JSON holds the finished case alone, not a part of
    the interrupted one, and is written even when that case had timed no round (pytest-benchmark alone leaves it
    empty then), or when the SIGINT comes as the session ends."""
    shutil.copy(Path(__file__).parent.parent / "bench" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "bench_case.py").write_text(INTERRUPTED_SUITE)
    (tmp_path / "late_interrupt.py").write_text(INTERRUPT_AT_SESSION_FINISH)
    out = tmp_path / "out.json"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench_case.py"]
    command += [f"--benchmark-json={out}"] + (["-p", "late_interrupt"] if interrupt_at_call == 0 else [])
    subprocess.run(
        command,
        cwd=tmp_path,
        # The repository too: the suite's conftest imports began_fast (as it does where the README's install is not).
        env={**os.environ, "INTERRUPT_AT_CALL": str(interrupt_at_call), "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
        capture_output=True,
        timeout=120,
    )
    expected = ["finished", "interrupted", "never-run"] if interrupt_at_call == 0 else ["finished"]
    assert [bench["extra_info"]["provider"] for bench in json.loads(out.read_text())["benchmarks"]] == expected


def test_the_bench_commit_is_began_fast_commit_when_it_is_set(tmp_path, monkeypatch):
    """A copy of the tree inside another repository recorded that repository's HEAD, with no "+dirty": the benchmarks'
    commit is BEGAN_FAST_COMMIT when it is set (gpu_checks.sh's bench phases refuse to start without it), else git's
    HEAD, else "unknown"."""
    monkeypatch.setenv("BEGAN_FAST_COMMIT", "0123456789ab+dirty")
    assert provenance.commit() == provenance.commit(tmp_path) == "0123456789ab+dirty"
    monkeypatch.delenv("BEGAN_FAST_COMMIT")
    git = ["git", "rev-parse", "--short=12", "HEAD"]
    head = subprocess.run(git, cwd=Path(__file__).parent, capture_output=True, text=True, check=True)
    assert provenance.commit() == head.stdout.strip()
    assert provenance.commit(tmp_path) == "unknown"


def test_each_time_shows_its_spread_and_a_missing_compile_baseline_is_said():
    """The table gave medians alone, so a ratio could not be told from noise (the bench audit: METHOD's "a difference
    smaller than the spread is noise"); each time now shows half its rounds' IQR relative to the median. A step or
    kernel run without its torch.compile cases (gpu_checks.sh runs them as phases of their own) dropped that
    baseline's column without a word; it is said in bold."""
    benches = [
        synthetic_bench("paper64", "step", 16, p, median_s, 3e12) for p, median_s in (("torch", 0.5), ("triton", 0.1))
    ]
    for bench, iqr in zip(benches, (0.05, 0.0), strict=True):
        bench["stats"]["iqr"] = iqr
        bench["extra_info"]["calls_per_round"] = 5
    section = bench_report.render_section(dict(SYNTHETIC, benchmarks=benches))
    _, _, row = table_rows(section)
    # Rounds of 5 steps with medians 0.5 and 0.1 s: 100 and 20 ms a step; IQRs 0.05 and 0 s: ±5% and ±0%.
    assert row == ["paper64", "step", "16", "100.000 ±5.0%", "20.000 ±0.0%", "30.0", "150.0", "0.20"]
    assert "± is half the rounds' interquartile range" in section
    assert "**No torch.compile baseline**" in section
    assert "No torch.compile baseline" not in bench_report.render_section(SYNTHETIC)  # it has compile cases
    loaders = [synthetic_bench("64px, 32 batches", "load", 64, p, 0.1, None) for p in ("torch", "dali-mixed")]
    assert "No torch.compile baseline" not in bench_report.render_section(dict(SYNTHETIC, benchmarks=loaders))
