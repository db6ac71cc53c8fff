"""The run folder's pictures: the samples-over-time strip and GIF, D's reconstruction grid, the convergence plot
with the lr and SWD, and the runs-compared plot; each file is written whole, has the size its layout implies and
shows its data in order, on the axes named for it."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from began_fast import reports

SIZE = 16


def _write_samples(run_dir, steps):
    """Fake fixed-z sample grids (4 x 4 images of 16 px, as the loop writes them) at `steps`."""
    rng = torch.Generator().manual_seed(0)
    for step in steps:
        images = torch.rand(16, 3, SIZE, SIZE, generator=rng) * 2 - 1
        reports.save_image_grid(images, run_dir / "samples" / f"step_{step:07d}.png", nrow=4)


def test_sample_frames_are_ordered_by_step_and_ignore_other_files(tmp_path):
    _write_samples(tmp_path, [1000, 250, 10_000])
    (tmp_path / "samples" / "notes.png").write_bytes(b"")
    assert [step for step, _ in reports.sample_frames(tmp_path)] == [250, 1000, 10_000]


def test_progress_strip_and_gif_have_the_layout_size(tmp_path):
    _write_samples(tmp_path, range(0, 1500, 100))  # 15 frames
    grid_side = 4 * (SIZE + 2) + 2  # image_grid's padding of 2
    assert reports.update_progress(tmp_path) == [tmp_path / "progress.png", tmp_path / "progress.gif"]
    with Image.open(tmp_path / "progress.png") as strip:
        # 10 frames scaled to 256 px high, with a 14 px label band each and 4 px gaps.
        assert strip.size == (10 * 256 + 9 * 4, 256 + reports.LABEL_HEIGHT)
    with Image.open(tmp_path / "progress.gif") as gif:
        assert gif.n_frames == 15 and gif.size == (256, 256 + reports.LABEL_HEIGHT)
        gif.seek(14)
        last = gif.convert("RGB")
    # The last frame shows the last grid (up to the GIF's 256-colour palette), not an earlier one.
    got = np.asarray(last.crop((0, reports.LABEL_HEIGHT, 256, 256 + reports.LABEL_HEIGHT)), dtype=np.float32)
    errors = {}
    for step in (0, 1400):
        with Image.open(tmp_path / "samples" / f"step_{step:07d}.png") as grid:
            assert grid.size == (grid_side, grid_side)
            scaled = np.asarray(grid.convert("RGB").resize((256, 256), Image.Resampling.LANCZOS), dtype=np.float32)
        errors[step] = np.abs(got - scaled).mean()
    assert errors[1400] < 16 and errors[1400] < 0.3 * errors[0], errors


def test_progress_strip_shows_the_grids_in_step_order(tmp_path):
    steps = range(0, 1500, 100)  # 15 grids, each one flat grey, lighter with the step; the strip shows 10
    for i, step in enumerate(steps):
        grey = torch.full((16, 3, SIZE, SIZE), -1 + 2 * i / (len(steps) - 1))
        reports.save_image_grid(grey, tmp_path / "samples" / f"step_{step:07d}.png", nrow=4)
    strip = np.asarray(reports.progress_strip(reports.sample_frames(tmp_path)).convert("L"), dtype=np.float32)
    tiles = [strip[reports.LABEL_HEIGHT :, x : x + 256] for x in range(0, 10 * 260, 260)]  # 256 px + a 4 px gap
    greys = [float(np.median(tile)) for tile in tiles]  # the images fill most of a tile; the rest is padding
    assert greys[0] == 0 and greys[-1] == 255 and all(a < b for a, b in zip(greys, greys[1:], strict=False)), greys
    # Each tile's white band above the grid carries its "step N" label in black.
    bands = [strip[: reports.LABEL_HEIGHT, x : x + 256] for x in range(0, 10 * 260, 260)]
    assert all(band.max() == 255 and band.min() < 64 for band in bands)


@pytest.mark.parametrize(("frames", "count"), [(15, 10), (61, 60), (100, 7)])
def test_the_frames_kept_are_those_nearest_even_spacing(frames, count):
    kept = reports._evenly_spaced(list(range(frames)), count)
    ideal = np.linspace(0, frames - 1, count)
    assert len(kept) == count and kept[0] == 0 and kept[-1] == frames - 1
    assert np.abs(np.array(kept) - ideal).max() <= 0.5


def test_progress_gif_loops_holds_its_last_frame_and_keeps_at_most_max_frames(tmp_path):
    _write_samples(tmp_path, range(0, 1200, 100))  # 12 grids; the GIF keeps 5 of them, the first and the last
    reports.save_progress_gif(reports.sample_frames(tmp_path), tmp_path / "p.gif", max_frames=5, height=32, frame_ms=70)
    with Image.open(tmp_path / "p.gif") as gif:
        assert gif.n_frames == 5 and gif.info.get("loop") == 0
        durations = []
        for frame in range(gif.n_frames):
            gif.seek(frame)
            durations.append(gif.info["duration"])
    assert durations == [70, 70, 70, 70, 280]


def test_update_progress_before_any_sample_writes_nothing(tmp_path):
    assert reports.update_progress(tmp_path) == []
    assert not list(tmp_path.iterdir())


def test_to_uint8_clamps_values_outside_minus_1_to_1():
    """G has no squashing activation: its samples overshoot [-1, 1] and must saturate at black and white, not wrap
    around the uint8 range."""
    x = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 4 - 2
    expected = np.round((np.clip(x.numpy(), -1, 1) + 1) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(reports.to_uint8(x).numpy(), expected)
    assert reports.to_uint8(x)[x > 1].min() == 255 and reports.to_uint8(x)[x < -1].max() == 0


def test_image_grid_with_a_partly_filled_last_row():
    images = torch.rand(10, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) * 2 - 1
    pixels = np.asarray(reports.image_grid(images, nrow=4))
    assert pixels.shape == (3 * (SIZE + 2) + 2, 4 * (SIZE + 2) + 2, 3)
    # By default about square: ceil(sqrt(10)) = 4 per row, so again 3 rows of 4.
    np.testing.assert_array_equal(np.asarray(reports.image_grid(images)), pixels)
    third_row = 2 + 2 * (SIZE + 2)
    np.testing.assert_array_equal(pixels[third_row : third_row + SIZE, 20 : 20 + SIZE], reports.to_uint8_hwc(images)[9])
    assert (pixels[third_row:, 2 * (SIZE + 2) :] == 255).all()  # the two empty places are white


def test_reconstruction_grid_puts_each_real_image_next_to_its_reconstruction(tmp_path):
    rng = torch.Generator().manual_seed(1)
    real, recon = torch.rand(6, 3, SIZE, SIZE, generator=rng) * 2 - 1, torch.rand(6, 3, SIZE, SIZE, generator=rng)
    reports.save_reconstruction_grid(real, recon, tmp_path / "recon.png", pairs_per_row=3)
    with Image.open(tmp_path / "recon.png") as grid:
        assert grid.size == (6 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2)
        pixels = np.asarray(grid.convert("RGB"))
    second_row = 2 + SIZE + 2
    tile = pixels[second_row : second_row + SIZE]
    # Row 2 holds pairs 3, 4, 5: columns 0 and 1 are real[3] and recon[3].
    np.testing.assert_array_equal(tile[:, 2 : 2 + SIZE], reports.to_uint8_hwc(real[3:4])[0])
    np.testing.assert_array_equal(tile[:, 20 : 20 + SIZE], reports.to_uint8_hwc(recon[3:4])[0])
    # By default about square: ceil(sqrt(6)) = 3 pairs per row, as above.
    reports.save_reconstruction_grid(real, recon, tmp_path / "default.png")
    with Image.open(tmp_path / "default.png") as grid:
        np.testing.assert_array_equal(np.asarray(grid.convert("RGB")), pixels)
    with pytest.raises(ValueError, match="differ"):
        reports.save_reconstruction_grid(real, recon[:5], tmp_path / "bad.png")


def _stats_rows(with_swd):
    rows = [
        {"step": s, "m": 0.2 - s * 1e-5, "k": s * 1e-5, "lr": 1e-4 if s < 500 else 5e-5} for s in range(50, 1001, 50)
    ]
    if with_swd:
        rows += [{"step": 500, "swd": 80.5}, {"step": 1000, "swd": 60.25}]
    return rows


def test_swd_points_read_the_evaluations_swd():
    assert reports.swd_points(_stats_rows(True)) == [(500, 80.5), (1000, 60.25)]
    assert reports.swd_points(_stats_rows(False)) == []
    # A damaged or hand-edited row's value that is no finite number is left out (a NaN would make compare_runs'
    # mean SWD NaN); so is a row whose M is one.
    damaged = [{"step": 1, "swd": float("nan")}, {"step": 2, "swd": "61.5"}, {"step": 3, "swd": {"avg": None}}]
    damaged += [{"step": 4, "swd": True}, {"step": 5, "swd": {"avg": 60.25}}, {"step": 6, "swd": 42}]
    assert reports.swd_points(damaged) == [(6, 42.0)]
    rows = [{"step": 1, "m": float("nan")}, {"step": 2, "m": True}, {"step": 3, "m": "0.1"}, {"step": 4, "m": 0.25}]
    assert reports.training_rows(rows) == [{"step": 4, "m": 0.25}]


@pytest.mark.parametrize("with_swd", [False, True])
def test_convergence_plot_adds_an_swd_panel_when_evaluated(tmp_path, with_swd):
    stats = tmp_path / "stats.jsonl"
    stats.write_text("".join(json.dumps(r) + "\n" for r in _stats_rows(with_swd)) + '{"step": 10')  # a torn line
    reports.plot_convergence(reports.read_stats(stats), tmp_path / "convergence.png")
    with Image.open(tmp_path / "convergence.png") as plot:
        # 7 in wide at 100 dpi; 2.75 in per panel.
        assert plot.size == (700, 275 * (3 if with_swd else 2))


def test_read_stats_of_a_run_without_a_stats_file_is_no_rows(tmp_path):
    """A resume into a folder whose stats.jsonl is gone (copied without it, or removed) reads no rows, not an error."""
    assert reports.read_stats(tmp_path / "stats.jsonl") == []


def test_read_stats_counts_the_damaged_lines_it_skips_when_asked(tmp_path):
    """Lines damaged in the middle of stats.jsonl were skipped without a word, by compare_runs and by a resume, which
    rewrites the file without them (found by an evaluation-audit helper). Asked, read_stats counts them in one
    warning; a torn last line (no newline: a crash's, or a row being written) is no damage, and blank lines none."""
    stats = tmp_path / "stats.jsonl"
    good = [{"step": step, "m": 0.1} for step in (1, 2, 3)]
    rows = [json.dumps(good[0]), '{"step": 2, "m"', "", json.dumps(good[1]), "[1, 2]", json.dumps(good[2])]
    stats.write_text("\n".join(rows) + '\n{"step": 4')
    with pytest.warns(UserWarning) as warned:
        assert reports.read_stats(stats, warn=True) == good
    assert [str(w.message) for w in warned] == [f"{stats}: skipped 2 lines that are not stats rows (first: line 2)"]
    stats.write_text("\n".join([json.dumps(good[0]), "\x00\x00", json.dumps(good[1])]) + "\n")
    with pytest.warns(UserWarning, match=r"stats.jsonl: skipped line 2, not a stats row$"):
        reports.read_stats(stats, warn=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reports.read_stats(stats) == good[:2]  # not asked: quiet (the loop reads it at every picture)
        stats.write_text(json.dumps(good[0]) + '\n{"step": 2, "m"')
        assert reports.read_stats(stats, warn=True) == good[:1]


def _lines_by_axis(fig) -> dict[str, list]:
    """Each axes' y label -> its lines as (label, colour, x, y)."""
    return {
        ax.get_ylabel(): [
            (line.get_label(), line.get_color(), list(line.get_xdata()), list(line.get_ydata()))
            for line in ax.get_lines()
        ]
        for ax in fig.axes
    }


@pytest.mark.parametrize("with_swd", [False, True])
def test_convergence_figure_plots_m_lr_k_and_swd_on_their_axes(with_swd):
    rows = _stats_rows(with_swd)
    train_rows = [r for r in rows if "m" in r]
    steps = [r["step"] for r in train_rows]
    fig = reports.convergence_figure(rows)
    lines = _lines_by_axis(fig)
    reports._pyplot().close(fig)
    assert [(x, y) for _, _, x, y in lines["M (convergence)"]] == [(steps, [r["m"] for r in train_rows])]
    assert [(x, y) for _, _, x, y in lines["learning rate (dashed)"]] == [(steps, [r["lr"] for r in train_rows])]
    assert [(x, y) for _, _, x, y in lines["k_t"]] == [(steps, [r["k"] for r in train_rows])]
    swd = [(x, y) for _, _, x, y in lines.get("SWD x1e3 (lower is better)", [])]
    assert swd == ([([500, 1000], [80.5, 60.25])] if with_swd else [])


@pytest.mark.parametrize("rows", [1, 5])
def test_convergence_figure_shows_a_lone_point_and_says_which_line_is_which(rows):
    """A run whose first picture comes before its second log row: its M, lr and k_t lines held one point each, which
    a line without markers does not draw (empty panels). The M panel's legend tells M from the dashed lr."""
    stats = [r for r in _stats_rows(False) if "m" in r][:rows]
    fig = reports.convergence_figure(stats)
    markers = {ax.get_ylabel(): [line.get_marker() for line in ax.get_lines()] for ax in fig.axes}
    legend = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    reports._pyplot().close(fig)
    drawn = "o" if rows == 1 else "None"
    assert markers == {"M (convergence)": [drawn], "k_t": [drawn], "learning rate (dashed)": [drawn]}
    assert legend == ["M", "learning rate"]


def test_runs_figure_gives_each_run_one_colour_in_both_panels():
    unevaluated, evaluated = _stats_rows(False), _stats_rows(True)
    fig = reports.runs_figure({"plain": unevaluated, "evaluated": evaluated})
    lines = _lines_by_axis(fig)
    legends = [ax.get_legend() for ax in fig.axes]
    reports._pyplot().close(fig)
    m_colour = {label: colour for label, colour, _, _ in lines["M (convergence)"]}
    (swd,) = lines["SWD x1e3 (lower is better)"]
    assert m_colour["plain"] != m_colour["evaluated"]
    assert swd[:2] == ("evaluated", m_colour["evaluated"]) and swd[2:] == ([500, 1000], [80.5, 60.25])
    assert all(legend is not None for legend in legends)


def test_background_writer_runs_jobs_in_order_and_raises_a_jobs_error_at_the_next_submit():
    writer, done = reports.BackgroundWriter(), []

    def fail(message):
        raise OSError(message)

    try:
        for k in range(3):
            writer.submit(done.append, k)
        writer.submit(fail, "disk full")
        with pytest.raises(OSError, match="disk full"):
            writer.submit(done.append, "after")  # the failed job's error, not lost under the next job
        writer.submit(done.append, 3)  # raised once: the writer goes on
        writer.wait()
    finally:
        writer.close()
    assert done == [0, 1, 2, 3]
