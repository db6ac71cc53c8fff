"""Data-parallel BEGAN (distributed.py) on the CPU with gloo: two ranks of batch B/2 train exactly like one process
of batch B (both steps), the ranks agree bit for bit, a 2-rank checkpoint resumes on one rank, a dead rank ends
the others with one line, and scripts/train.py runs under torchrun, on one machine and on two (two agents). Marked
`cuda`: the step's collectives on NCCL inside a CUDA graph (one GPU), and with two GPUs a two-rank NCCL job.

The two-rank runs are spawned once for the whole module (spawn start method, a free port on 127.0.0.1, bounded
joins) and leave their results in a folder the tests read.
"""

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import began_fast.distributed as distributed
import began_fast.train as train_module
from began_fast.checkpoint import load_checkpoint
from began_fast.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from began_fast.data import (
    BatchOrder,
    BuiltinFaces,
    GpuResidentSet,
    GpuResidentStream,
    TorchLoader,
    make_batches,
    open_source,
)
from began_fast.data.builtin import draw_faces
from began_fast.data.folder import ImageFolder
from began_fast.distributed import MAX_TIMEOUT_S, CollectiveError, Collectives, World, start, stop
from began_fast.fast_step import CudaGraphStep, FastStep
from began_fast.model import Discriminator, Generator
from began_fast.reference import began_objective
from began_fast.step import ReferenceStep
from began_fast.train import RunOptions, data_fingerprint, setup_run, train, training_images_digest
from tests.test_train import interrupt_after
from tests.tolerances import assert_parity

ROOT = Path(__file__).resolve().parent.parent
MODEL = ModelConfig(image_size=16, n=4, h=4)
GLOBAL_BATCH, STEPS, K0 = 4, 3, 0.3
# lambda_k large enough that k_t moves visibly in three steps, from K0 so that it is away from its clamps.
PARITY_CFG = TrainConfig(batch_size=GLOBAL_BATCH, lr=1e-3, lambda_k=0.05)
LOOP_DATA = DataConfig(builtin_count=64, num_workers=0)
LOOP_LOADERS = ("torch", "gpu")  # the epoch-ordered loader and the device-resident sampler (here on the CPU)
JOB_TIMEOUT_S = 240  # the whole two-rank job; a hang fails the tests instead of stalling CI
TORCHRUN = (sys.executable, "-m", "torch.distributed.run")
TWO_RANKS = (*TORCHRUN, "--standalone", "--nproc-per-node", "2")  # on this machine
COLLECTIVE_TIMEOUT_S = 60.0
WORLD_SIZE = 2


def loop_cfg(steps):
    return TrainConfig(batch_size=2, steps=steps, log_every=2, sample_every=100, checkpoint_every=4, snapshot_every=8)


def loop_data(loader):
    return dataclasses.replace(LOOP_DATA, loader=loader)


def real_batches():
    gen = torch.Generator().manual_seed(0)
    return [torch.rand(GLOBAL_BATCH, 3, 16, 16, generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(STEPS)]


def make_step(kind, batch_size, collectives=None):
    torch.manual_seed(0)
    G, D = Generator(MODEL, impl="torch").double(), Discriminator(MODEL, impl="torch").double()
    cfg = TrainConfig(**{**PARITY_CFG.__dict__, "batch_size": batch_size})
    step_class = FastStep if kind == "fast" else ReferenceStep
    step = step_class(G, D, cfg, "cpu", collectives=collectives)
    step.k.fill_(K0)
    return step


def run_parity(kind, rank, collectives):
    """STEPS steps on this rank's rows of the global batches; returns the parameters, k_t and statistics."""
    per_rank = GLOBAL_BATCH // WORLD_SIZE
    step = make_step(kind, per_rank, collectives)
    for x in real_batches():
        step(x[rank * per_rank : (rank + 1) * per_rank])
    params = [p.detach().clone() for p in list(step.G.parameters()) + list(step.D.parameters())]
    return {"params": params, "k": step.k.clone(), "stats": step.stats.sums.clone()}


def run_fp16_overflow(rank, collectives):
    """A clean fp16 step, then one where only rank 1's batch overflows: every rank must skip it."""
    torch.manual_seed(0)
    G, D = Generator(MODEL, impl="torch"), Discriminator(MODEL, impl="torch")
    step = FastStep(G, D, TrainConfig(batch_size=2), "cpu", amp="fp16", collectives=collectives)
    step.loss_scale.scale.fill_(256.0)
    x = real_batches()[0][rank * 2 : (rank + 1) * 2].float()
    step(x)
    before = [p.detach().clone() for p in step.parameters()]
    step(x * 1e30 if rank == 1 else x)  # inf in fp16
    unchanged = all(torch.equal(a, p) for a, p in zip(before, step.parameters(), strict=True))
    return {"found_inf": step.loss_scale.found_inf.item(), "unchanged": unchanged, "k": step.k.clone()}


def rank_main(rank, port, folder):
    """One rank of the spawned job: both steps' parity runs, a 2-rank training run, then rank 1 leaves early."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    collectives = start(World(rank, WORLD_SIZE, rank), "cpu", COLLECTIVE_TIMEOUT_S)
    folder = Path(folder)
    results = {kind: run_parity(kind, rank, collectives) for kind in ("fast", "reference")}
    results["fp16"] = run_fp16_overflow(rank, collectives)
    # Each rank is given its own --out, so that anything rank 1 wrote would show.
    for loader in LOOP_LOADERS:
        out = folder / (f"run_{loader}" if rank == 0 else f"run_{loader}_rank1")
        run = setup_run(MODEL, loop_cfg(4), loop_data(loader), RunOptions(out=out, quiet=True), collectives)
        train(run)
        results[f"loop_k_{loader}"] = run.step.k.clone()
    # SIGTERM on rank 1 alone after step 3: both ranks stop after step 4, where they read their statistics.
    run = setup_run(MODEL, loop_cfg(8), LOOP_DATA, RunOptions(out=folder / f"stopped{rank}", quiet=True), collectives)
    train(interrupt_after(run, 3, signal.SIGTERM) if rank == 1 else run)
    results["stopped"] = (run.step.steps_done, run.stopped_by)
    # --resume with --steps at the checkpoint's step makes a finished run's missing last pictures, where rank 0's
    # folder lacks them: it decides for every rank (rank 1's, here a copy of the run, may differ), so that where
    # rank 1's alone lacks them both refuse, and none waits for the other; rank 0 alone makes them, where both lack
    # them. (run_torch is whole: the run since was a barrier.)
    for lacking in (0, 1, "both"):
        out = folder / f"finish_{lacking}_{rank}"
        shutil.copytree(folder / "run_torch", out)
        if lacking in (rank, "both"):
            (out / "samples" / "step_0000004.png").unlink()
        options = RunOptions(out=out, resume=True, quiet=True)
        try:
            train(setup_run(MODEL, loop_cfg(4), loop_data("torch"), options, collectives))
            results[f"finish_{lacking}"] = "finished"
        except ConfigError as e:
            results[f"finish_{lacking}"] = str(e)
    # A job whose ranks were given different settings (here rank 1 another seed, so other weights too).
    mismatched = dataclasses.replace(loop_cfg(4), seed=rank)
    run = setup_run(MODEL, mismatched, LOOP_DATA, RunOptions(out=folder / f"mismatch{rank}", quiet=True), collectives)
    try:
        train(run)
    except ConfigError as e:
        results["mismatch_error"] = (str(e), run.step.steps_done)
    # An evaluation asking for more real images than the data set holds: every rank refuses it, before its first step.
    too_many = dataclasses.replace(loop_cfg(4), eval_every=2, eval_images=1000)
    run = setup_run(MODEL, too_many, LOOP_DATA, RunOptions(out=folder / f"eval{rank}", quiet=True), collectives)
    try:
        train(run)
    except ConfigError as e:
        results["eval_images_error"] = (str(e), run.step.steps_done, run.out.exists())
    # Jobs whose ranks read different copies of one image folder (the data path is not compared: it may differ
    # between machines): rank 1's copy lacks a file, as a copy cut short would; then one of its faces differs.
    for case, count, changed in (("missing", 8 - rank, False), ("changed", 8, rank == 1)):
        images = folder / f"images_{case}{rank}"
        images.mkdir()
        for i, face in enumerate(draw_faces(count, 16, seed=0)):
            Image.fromarray(255 - face if changed and i == 0 else face).save(images / f"{i}.png")
        data = DataConfig(path=str(images), num_workers=0, loader="torch")
        run = setup_run(
            MODEL, loop_cfg(4), data, RunOptions(out=folder / f"data_{case}{rank}", quiet=True), collectives
        )
        try:
            train(run)
        except ConfigError as e:
            results[f"data_{case}_error"] = (str(e), run.step.steps_done, run.out.exists())
    # The stop signals the loop's statistics reads agree on: rank 0 got SIGINT and rank 1 SIGTERM, both SIGTERM, none.
    received = ((signal.SIGINT, signal.SIGTERM)[rank], signal.SIGTERM, 0)
    results["largest"] = [collectives.max_(int(signum), torch.device("cpu")) for signum in received]
    # Fingerprints are 64-bit digests: ones that differ in their lowest bit alone differ.
    try:
        collectives.check_same({"the weights": 2**62 + rank, "the starting step": 7}, "cpu")
    except ConfigError as e:
        results["low_bit_error"] = str(e)
    if rank == 1:
        torch.save(results, folder / f"rank{rank}.pt")
        # Leaves the job, its process group left first as train.py leaves it (gloo's threads, left to the
        # interpreter's exit, can abort the process): rank 0's next collective must fail with one clear line.
        stop()
        return
    try:
        collectives.max_(0, torch.device("cpu"))
    except CollectiveError as e:
        results["dead_rank_error"] = str(e)
    torch.save(results, folder / f"rank{rank}.pt")
    stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(rank_main_fn, folder: Path) -> None:
    """Spawn rank_main_fn(rank, port, folder) on two processes and wait for both, at most JOB_TIMEOUT_S."""
    context = mp.start_processes(
        rank_main_fn, args=(free_port(), str(folder)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"the two-rank job did not finish in {JOB_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The folder of the spawned two-rank job and its per-rank results."""
    folder = tmp_path_factory.mktemp("two_ranks")
    run_two_ranks(rank_main, folder)
    return folder, [torch.load(folder / f"rank{r}.pt") for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("kind", ["fast", "reference"])
def test_two_ranks_match_one_process_with_the_global_batch(two_ranks, kind):
    _, ranks = two_ranks
    one = make_step(kind, GLOBAL_BATCH)
    for x in real_batches():
        one(x)
    want = [p.detach() for p in list(one.G.parameters()) + list(one.D.parameters())]
    for i, (got, expected) in enumerate(zip(ranks[0][kind]["params"], want, strict=True)):
        assert_parity(got, expected, name=f"parameter {i}")
    assert one.k.item() != K0  # k_t moved, so the comparison below says something
    torch.testing.assert_close(ranks[0][kind]["k"], one.k)
    torch.testing.assert_close(ranks[0][kind]["stats"], one.stats.sums)


@pytest.mark.parametrize("kind", ["fast", "reference"])
def test_ranks_agree_bit_for_bit(two_ranks, kind):
    _, (rank0, rank1) = two_ranks
    assert torch.equal(rank0[kind]["k"], rank1[kind]["k"])
    assert torch.equal(rank0[kind]["stats"], rank1[kind]["stats"])
    assert all(torch.equal(a, b) for a, b in zip(rank0[kind]["params"], rank1[kind]["params"], strict=True))
    assert all(torch.equal(rank0[f"loop_k_{loader}"], rank1[f"loop_k_{loader}"]) for loader in LOOP_LOADERS)


def test_an_fp16_overflow_on_one_rank_is_skipped_on_all(two_ranks):
    _, (rank0, rank1) = two_ranks
    for rank in (rank0, rank1):
        assert rank["fp16"]["found_inf"] == 1 and rank["fp16"]["unchanged"]
    assert torch.equal(rank0["fp16"]["k"], rank1["fp16"]["k"])


def test_only_rank_0_writes_and_the_config_states_the_batches(two_ranks):
    folder, _ = two_ranks
    config = json.loads((folder / "run_torch" / "config.json").read_text())
    assert {key: config["run"][key] for key in ("world_size", "per_rank_batch", "global_batch", "effective_lr")} == {
        "world_size": 2,
        "per_rank_batch": 2,
        "global_batch": 4,
        "effective_lr": pytest.approx(1e-4),
    }
    rows = [json.loads(line) for line in (folder / "run_torch" / "stats.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4]
    # Rank 1 wrote nothing: no checkpoint, stats, pictures or events.
    assert not any((folder / f"run_{loader}_rank1").exists() for loader in LOOP_LOADERS)


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(two_ranks):
    """SIGTERM (or Ctrl-C) that reached one rank stops them all where they next read their statistics, and rank 0
    writes the checkpoint there: a rank stopping alone would leave the others waiting in their next all-reduce."""
    folder, ranks = two_ranks
    assert [rank["stopped"] for rank in ranks] == [(4, signal.SIGTERM)] * 2
    assert load_checkpoint(folder / "stopped0" / "latest.pt")["step"] == 4 and not (folder / "stopped1").exists()


@pytest.mark.parametrize("loader", LOOP_LOADERS)
def test_the_loop_feeds_each_rank_its_shard_of_the_global_batch(two_ranks, tmp_path, loader):
    """The 2-rank training loop (batch 2 per rank) against one process of batch 4: the loop's own data loader,
    noise and all-reduces, not batches sliced by hand; a rank reading another's shard would differ here."""
    folder, _ = two_ranks
    one = setup_run(
        MODEL, dataclasses.replace(loop_cfg(4), batch_size=4), loop_data(loader), RunOptions(out=tmp_path, quiet=True)
    )
    train(one)
    two_ranks_state = load_checkpoint(folder / f"run_{loader}" / "latest.pt")
    for network, model in (("G", one.G), ("D", one.D)):
        for name, value in model.state_dict().items():
            assert_parity(two_ranks_state[network][name], value, name=f"{network} {name}")
    torch.testing.assert_close(two_ranks_state["trainer"]["k"], one.step.k)


def test_rank_0s_folder_decides_whether_a_finished_run_resumes_to_make_its_missing_last_pictures(two_ranks):
    """Only rank 0 writes the run folder, the pictures it makes up for too: a rank 1 that made them as well would
    write them into the folder rank 0 writes at the same moment (on another machine, into one no one reads), and
    fail on an evaluation (it holds no stats file)."""
    folder, ranks = two_ranks
    assert [rank["finish_0"] for rank in ranks] == [rank["finish_both"] for rank in ranks] == ["finished"] * 2
    made = [folder / name / "samples" / "step_0000004.png" for name in ("run_torch", "finish_0_0", "finish_both_0")]
    assert made[0].read_bytes() == made[1].read_bytes() == made[2].read_bytes()
    for rank_1s in ("finish_1_1", "finish_both_1"):  # rank 1 wrote nothing
        assert not (folder / rank_1s / "samples" / "step_0000004.png").exists()
    for rank in ranks:
        assert re.fullmatch(r"the run in .*finish_1_\d has done its 4 steps: give --steps above 4 .*", rank["finish_1"])


def test_ranks_given_different_settings_are_refused_before_the_first_step(two_ranks):
    _, ranks = two_ranks
    for rank in ranks:
        message, steps_done = rank["mismatch_error"]
        assert steps_done == 0 and message == (
            "the 2 ranks do not start from the same run: the settings and the weights differ between ranks; "
            "give every rank the same flags and, to resume, the same latest.pt"
        )


def test_every_rank_refuses_an_evaluation_the_data_set_cannot_feed(two_ranks):
    """Rank 0 alone checked --eval-images against the data set: it gave the reason, and every other rank said only
    that a collective had failed, another rank having probably died (found by a torchrun data-audit helper)."""
    _, ranks = two_ranks
    for rank in ranks:
        message, steps_done, wrote_out = rank["eval_images_error"]
        assert steps_done == 0 and not wrote_out
        assert message.startswith("--eval-images 1000 needs that many real images, the data set holds ")


@pytest.mark.parametrize(
    "case, differing",
    [("missing", "the number of training images and the training images"), ("changed", "the training images")],
)
def test_ranks_reading_different_data_are_refused_before_the_first_step(two_ranks, case, differing):
    _, ranks = two_ranks
    for rank in ranks:
        message, steps_done, wrote_out = rank[f"data_{case}_error"]
        assert steps_done == 0 and not wrote_out
        assert message == (
            f"the 2 ranks do not start from the same run: {differing} differ between ranks; give every rank the same "
            "data (a whole copy on every machine) and the same --loader"
        )


def fingerprint(source, batches) -> dict[str, int]:
    """The data fingerprint _train checks across ranks, of `source` read by `batches`."""
    return data_fingerprint(len(source), training_images_digest(source), batches)


def test_the_data_fingerprint_is_the_same_however_the_folder_is_named(tmp_path):
    for i, face in enumerate(draw_faces(4, 16, seed=0)):
        Image.fromarray(face).save(tmp_path / f"{i}.png")
    copy = tmp_path.parent / (tmp_path.name + "_copy")
    shutil.copytree(tmp_path, copy)
    prints = []
    for path in (str(tmp_path), str(tmp_path) + "/", str(copy)):
        source = open_source(DataConfig(path=path), 16)
        prints.append(fingerprint(source, TorchLoader(source, BatchOrder(len(source), 2, seed=0), num_workers=0)))
    assert prints[0] == prints[1] == prints[2]


def test_the_data_fingerprint_reads_image_files_as_stored_not_as_decoded(tmp_path, monkeypatch):
    """Machines whose Pillow or libjpeg decode the same files to other pixels hold the same data: the fingerprint
    (and a resume's check of its data) read the files' bytes, where it decoded them (found by a diff review); a file
    whose bytes differ still tells the folders apart."""
    for i, face in enumerate(draw_faces(3, 16, seed=0)):
        Image.fromarray(face).save(tmp_path / f"{i}.png")
    source = open_source(DataConfig(path=str(tmp_path)), 16)
    digest = training_images_digest(source)
    decode = ImageFolder.__getitem__
    monkeypatch.setattr(ImageFolder, "__getitem__", lambda self, i: 255 - decode(self, i))  # another decoder
    assert training_images_digest(source) == digest
    Image.fromarray(255 - draw_faces(3, 16, seed=0)[2]).save(tmp_path / "2.png")
    assert training_images_digest(source) != digest


def test_the_data_fingerprint_tells_folders_apart_by_their_file_names(tmp_path):
    """Two copies of a folder of as many images, alike in the first, middle and last (the images the fingerprint
    reads), one with a file the other lacks and the other with one the first lacks: the names tell them apart,
    else the ranks would cut their shards from different orders."""
    faces = draw_faces(6, 16, seed=int(torch.randint(0, 2**31, ())))
    one, other = tmp_path / "one", tmp_path / "other"
    for folder, names in ((one, ("a", "b", "d", "e", "f")), (other, ("a", "c", "d", "e", "f"))):
        folder.mkdir()
        for name, face in zip(names, (faces[0], faces[1 if folder == one else 5], *faces[2:5]), strict=True):
            Image.fromarray(face).save(folder / f"{name}.png")
    prints = []
    for folder in (one, other):
        source = open_source(DataConfig(path=str(folder)), 16)
        prints.append(fingerprint(source, TorchLoader(source, BatchOrder(len(source), 2, seed=0), num_workers=0)))
    assert [key for key in prints[0] if prints[0][key] != prints[1][key]] == ["the training images"]


def test_the_data_fingerprint_names_the_loader():
    source = BuiltinFaces(8, 16, seed=0)
    torch_loader = TorchLoader(source, BatchOrder(len(source), 2, seed=0), num_workers=0)
    gpu_resident = GpuResidentStream(GpuResidentSet(source, "cpu"), BatchOrder(len(source), 2, seed=0))
    one, other = fingerprint(source, torch_loader), fingerprint(source, gpu_resident)
    assert [key for key in one if one[key] != other[key]] == ["the loaders"]


def test_two_rank_checkpoint_resumes_on_one_rank(two_ranks, tmp_path, monkeypatch):
    folder, ranks = two_ranks
    saved = load_checkpoint(folder / "run_torch" / "latest.pt")
    assert saved["step"] == 4 and saved["trainer"]["world_size"] == 2
    assert saved["data_position"] == [0, 16]  # epoch 0, its first 4 global batches of 2 x 2 images taken
    assert torch.equal(saved["trainer"]["k"], ranks[0]["loop_k_torch"])
    out = tmp_path / "run"
    out.mkdir()
    (out / "latest.pt").write_bytes((folder / "run_torch" / "latest.pt").read_bytes())
    run = setup_run(MODEL, loop_cfg(6), LOOP_DATA, RunOptions(out=out, resume=True, quiet=True))
    assert run.step.world_size == 1 and torch.equal(run.step.k, ranks[0]["loop_k_torch"])
    loaders = []
    monkeypatch.setattr(train_module, "make_batches", lambda *a, **kw: loaders.append(kw) or make_batches(*a, **kw))
    train(run)
    assert loaders[0]["start_step"] == 4 and loaders[0]["start_position"] == (0, 16)
    resumed = load_checkpoint(out / "latest.pt")
    # The one rank went on where the two had stopped in the epoch, with batches of 2: not at step 6's place in
    # an epoch of 2-image batches (image 12).
    assert resumed["step"] == 6 and resumed["data_position"] == [0, 20]
    rows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [6]
    assert all(torch.isfinite(p).all() for p in run.G.parameters())


def test_the_ranks_agree_on_the_largest_stop_signal_any_of_them_received(two_ranks):
    """Collectives.max_ is the largest over the ranks (SIGTERM over SIGINT), on every rank: not their sum, which for
    a SIGINT on one rank and a SIGTERM on the other would be SIGCHLD's number."""
    _, ranks = two_ranks
    assert [rank["largest"] for rank in ranks] == [[signal.SIGTERM, signal.SIGTERM, 0]] * 2


def test_ranks_whose_fingerprints_differ_in_the_lowest_bit_alone_are_refused(two_ranks):
    _, ranks = two_ranks
    assert [rank.get("low_bit_error", "") for rank in ranks] == [
        "the 2 ranks do not start from the same run: the weights differ between ranks; give every rank the same flags "
        "and, to resume, the same latest.pt"
    ] * 2


def test_a_dead_rank_ends_the_others_with_one_line(two_ranks):
    _, (rank0, _) = two_ranks
    message = rank0["dead_rank_error"]
    assert "\n" not in message
    assert message.startswith("rank 0 of 2: a collective failed or timed out")
    assert f"--dist-timeout {COLLECTIVE_TIMEOUT_S:g} s" in message


def test_each_rank_keeps_its_rows_of_the_global_noise():
    steps = [make_step("reference", 2, Collectives(World(rank, 2, rank), 1.0)) for rank in range(2)]
    one = make_step("reference", 4)
    whole = one.draw_z(4)
    assert torch.equal(torch.cat([step.draw_z(2) for step in steps]), whole)
    assert all(torch.equal(step.z_gen.get_state(), one.z_gen.get_state()) for step in steps)


@pytest.mark.parametrize("k", [0.0, 1.0])
def test_global_balance_is_the_objective_of_the_global_batch_at_ks_clamps(k, monkeypatch):
    """Rank 0's k_next, M and losses from the ranks' mean L_real and L_fake are began_objective's for the whole
    batch, also where the balance pushes k_t past a clamp (lambda_k = 1): k_next stays in [0, 1], and M takes
    |gamma L_real - L_fake| of a negative balance. (The two-rank runs keep k_t inside (0, 1) and the balance positive,
    where a missing clamp or abs would not show.) The all-reduce is stood in for: it adds rank 1's share."""
    gen = torch.Generator().manual_seed(11)
    x, rx, fake, rfake = (torch.rand(4, 3, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(4))
    if k == 1.0:
        rfake = fake + 0.01 * (rfake - fake)  # D reconstructs fakes well: the balance is positive
    gamma, lambda_k = 0.7, 1.0
    whole = began_objective(x, rx, fake, rfake, k, gamma, lambda_k)
    assert (gamma * whole.l_real - whole.l_fake < 0) == (k == 0.0)  # the update pushes k_t past its clamp
    rank0, rank1 = (
        began_objective(*(t[r * 2 : r * 2 + 2] for t in (x, rx, fake, rfake)), k, gamma, lambda_k) for r in range(2)
    )
    share1 = torch.stack([rank1.l_real, rank1.l_fake]).float() / WORLD_SIZE
    monkeypatch.setattr(Collectives, "_all_reduce", lambda self, tensor, op=dist.ReduceOp.SUM: tensor.add_(share1))
    got = Collectives(World(0, WORLD_SIZE, 0), 1.0).global_balance(rank0, torch.tensor(k), gamma, lambda_k)
    for name in got._fields:
        assert_parity(getattr(got, name), getattr(whole, name), name=name)
    assert got.k_next.item() == k


@pytest.mark.parametrize("rule, factor", [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_lr_scaling_rule_and_resume_on_another_world_size(rule, factor):
    cfg = TrainConfig(batch_size=2, lr=1e-4, lr_floor=2e-5, lr_scaling=rule)
    torch.manual_seed(0)
    networks = Generator(MODEL, impl="torch"), Discriminator(MODEL, impl="torch")
    four = ReferenceStep(*networks, cfg, "cpu", collectives=Collectives(World(0, 4, 0), 1.0))
    assert four.lr.item() == pytest.approx(1e-4 * factor)
    assert four.decay.floor == pytest.approx(2e-5 * factor)
    four.lr.mul_(0.5)  # as a decay would have done
    one = ReferenceStep(*networks, cfg, "cpu")
    one.load_state_dict(four.state_dict())
    assert one.lr.item() == pytest.approx(0.5e-4)  # the decayed lr, rescaled to one rank by the same rule


def test_world_from_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world = World.from_env()
    assert (world.rank, world.world_size, world.local_rank) == (3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match=r"RANK must be in \[0, WORLD_SIZE\).*RANK=4 of 4"):
        World.from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK must be a non-negative integer, got 'x'"):
        World.from_env()


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, MAX_TIMEOUT_S * 2, float("nan")])
def test_a_dist_timeout_outside_its_range_is_refused_even_for_one_process(timeout_s):
    """--dist-timeout must be in (0, a week] (0 s leaves no time for any collective): a single process, which joins no
    process group, is refused all the same, before the world size is looked at; a week itself is taken."""
    with pytest.raises(ConfigError, match=r"--dist-timeout must be in \(0, 604800\] seconds \(a week\), got"):
        start(World(), "cpu", timeout_s)
    assert start(World(), "cpu", MAX_TIMEOUT_S) is None


def test_each_rank_takes_its_machines_gpu_local_rank(monkeypatch):
    """On two machines of two GPUs: rank 2 (its machine's LOCAL_RANK 0) takes GPU 0 of its machine, rank 3 GPU 1. A
    third rank on a machine of two GPUs is refused."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    machine_0, machine_1 = [World(0, 4, 0), World(1, 4, 1)], [World(2, 4, 0), World(3, 4, 1)]
    assert [world.device("cuda") for world in machine_0 + machine_1] == ["cuda:0", "cuda:1"] * 2
    with pytest.raises(ConfigError, match=r"^LOCAL_RANK 2 needs GPU 2, but this machine has 2; start at most"):
        World(2, 3, 2).device("cuda")


def test_a_collectives_failure_is_one_line_naming_the_rank_and_the_timeout():
    """gloo's errors can run over several lines (a message, then where in gloo): the first is quoted; an error with no
    message is named by its type."""
    collectives = Collectives(World(1, 2, 1), 5.0)
    gloo = RuntimeError("Connection closed by peer [127.0.0.1]:29500\n[../third_party/gloo/gloo/transport/pair.cc:598]")
    assert str(collectives.failure(gloo)) == (
        "rank 1 of 2: a collective failed or timed out (--dist-timeout 5 s); another rank probably died or hung; "
        "check the other ranks' logs (Connection closed by peer [127.0.0.1]:29500)"
    )
    assert str(collectives.failure(TimeoutError())).endswith("check the other ranks' logs (TimeoutError)")
    # torch 2.13's gloo, when a peer is killed: its source location first, then advice the line already gives
    killed = RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
        "[127.0.0.1]:37779. This is typically caused by a remote worker crashing. Check the logs of the remote worker "
        "before reporting an error. GLHF! \N{BEACH WITH UMBRELLA}"
    )
    assert str(collectives.failure(killed)).endswith("logs (Connection closed by peer [127.0.0.1]:37779)")


def test_a_rank_that_cannot_join_the_process_group_says_so_in_one_line(monkeypatch):
    """A failed rendezvous (here no MASTER_ADDR, as a job script that forgot it) is one CollectiveError naming the
    rank and what to check, not torch's ValueError or DistStoreError."""
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with pytest.raises(CollectiveError) as refused:
        start(World(1, 2, 1), "cpu", 5.0)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(
        "rank 1 of 2: could not join the job's process group (--dist-timeout 5 s); another rank probably did not "
        "start, or MASTER_ADDR:MASTER_PORT is wrong; check the other ranks' logs ("
    )
    assert "MASTER_ADDR" in message.split("logs (")[1] and not dist.is_initialized()


def test_the_process_groups_own_timeout_leaves_the_hang_guard_time_to_speak_first(monkeypatch):
    """A hung collective is the HangGuard's to report, with one line, about a second after --dist-timeout: the
    process group's own timeout (gloo's error, NCCL's watchdog log) must come well after that."""
    joined = []
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: joined.append((args, kwargs)))
    collectives = start(World(3, 4, 1), "cpu", 5.0)  # rank 3 of 4, the second of its machine
    assert (collectives.rank, collectives.world_size, collectives.timeout_s) == (3, 4, 5.0)
    [(args, kwargs)] = joined
    assert args == ("gloo",) and (kwargs["rank"], kwargs["world_size"], kwargs["init_method"]) == (3, 4, "env://")
    assert kwargs["timeout"].total_seconds() >= 5.0 + 10


def test_stop_leaves_the_process_group_and_does_nothing_without_one(tmp_path):
    stop()  # none started: a single process
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        stop()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_an_explicit_gpu_index_is_refused_under_torchrun():
    assert World(0, 1, 0).device("cuda:1") == "cuda:1" and World(1, 2, 1).device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="--device cuda:0 would put every rank on one GPU; .* give --device cuda"):
        World(1, 2, 1).device("cuda:0")


def test_train_script_under_torchrun(tmp_path):
    out = tmp_path / "run"
    args = ["--device", "cpu", "--out", str(out), "--quiet", "--image-size", "16", "--batch-size", "2"]
    args += ["--steps", "3", "--checkpoint-every", "3", "--workers", "0", "--lr", "3e-4", "--lr-scaling", "linear"]
    result = subprocess.run(
        [*TWO_RANKS, str(ROOT / "scripts" / "train.py"), *args], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("began-fast: new run") == 1  # rank 0 alone prints
    assert "ranks: 2, batch 2 per rank, global batch 4, lr 0.0006 (lr 0.0003, scaling linear)" in result.stderr
    assert load_checkpoint(out / "latest.pt")["step"] == 3


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists the threads in Linux's /proc")
def test_a_rank_that_finished_leaves_no_gloo_thread_to_the_interpreters_exit(tmp_path):
    """train.py's main() leaves the process group freed: torch modules imported after init_process_group (through
    the first optimizer) held it in default arguments, so destroy_process_group() left its gloo threads running, and
    at the interpreter's exit they aborted a rank now and then (SIGABRT, "terminate called without an active
    exception"): torchrun then failed the job that had finished."""
    rank_script = tmp_path / "rank.py"
    rank_script.write_text(
        "import os, runpy, sys\n"
        f"status = runpy.run_path({str(ROOT / 'scripts' / 'train.py')!r})['main'](sys.argv[1:])\n"
        "tasks = os.listdir('/proc/self/task')\n"
        "threads = sorted(open(f'/proc/self/task/{task}/comm').read().strip() for task in tasks)\n"
        "print(f\"rank {os.environ['RANK']}: status {status}, threads {threads}\", file=sys.stderr)\n"
    )
    args = ["--device", "cpu", "--out", str(tmp_path / "run"), "--quiet", "--image-size", "16", "--batch-size", "2"]
    args += ["--steps", "2", "--workers", "0"]
    result = subprocess.run([*TWO_RANKS, str(rank_script), *args], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    ends = sorted(line for line in result.stderr.splitlines() if line.startswith("rank ") and "threads" in line)
    assert [end.split(":")[0] for end in ends] == ["rank 0", "rank 1"], result.stderr
    for end in ends:
        assert ": status 0, threads [" in end and "gloo" not in end, end


@pytest.mark.parametrize("signum, said", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "stopped by SIGTERM")])
def test_train_script_under_torchrun_stops_with_a_checkpoint_on_a_signal_to_the_job(tmp_path, signum, said):
    """Ctrl-C in a terminal, or a scheduler's SIGTERM, reaches the launcher (its workers are in sessions of their
    own); it repeats it to them at once (then kills them after its grace period): the ranks stop together where they
    next read their statistics, and rank 0 writes the checkpoint there. The launcher itself exits with 1."""
    out = tmp_path / "run"
    args = ["--device", "cpu", "--out", str(out), "--quiet", "--image-size", "16", "--batch-size", "2"]
    args += ["--steps", "100000", "--log-every", "5", "--checkpoint-every", "100000", "--workers", "0"]
    job = subprocess.Popen(
        [*TWO_RANKS, str(ROOT / "scripts" / "train.py"), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's job is
    )
    try:
        deadline = time.monotonic() + 180
        while not (out / "stats.jsonl").exists() or not (out / "stats.jsonl").read_text():  # training
            assert job.poll() is None and time.monotonic() < deadline, "the job did not start training"
            time.sleep(0.2)
        os.killpg(job.pid, signum)
        _, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    stopped = re.findall(f"^{said} at step (\\d+); checkpoint written to (.*)$", stderr, flags=re.MULTILINE)
    assert len(stopped) == 1 and stopped[0][1] == str(out / "latest.pt"), stderr
    step = int(stopped[0][0])
    assert step % 5 == 0 and load_checkpoint(out / "latest.pt")["step"] == step
    assert "resume with: the same torchrun launch of" in stderr and "Traceback" not in stderr.split(" at step ")[0]
    assert stderr.count("resume with:") == 1  # rank 0's line alone
    assert job.returncode == 1


def test_train_script_under_torchrun_stops_with_a_checkpoint_when_its_launcher_is_killed(tmp_path):
    """torchrun starts each rank in a session of its own, so `kill -9 -PGID` of the job (timeout -s KILL, an OOM
    kill of the launcher) ends the launcher alone: its ranks, told by Linux (PR_SET_PDEATHSIG), stop as on a SIGTERM,
    with a checkpoint, rather than train on as orphans holding the run folder's lock (a --resume was refused)."""
    out = tmp_path / "run"
    args = ["--device", "cpu", "--out", str(out), "--quiet", "--image-size", "16", "--batch-size", "2"]
    args += ["--steps", "100000", "--log-every", "5", "--checkpoint-every", "100000", "--workers", "0"]
    with open(tmp_path / "stderr.txt", "w") as err:
        job = subprocess.Popen(
            [*TWO_RANKS, str(ROOT / "scripts" / "train.py"), *args],
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while not (out / "stats.jsonl").exists() or not (out / "stats.jsonl").read_text():  # training
            assert job.poll() is None and time.monotonic() < deadline, "the job did not start training"
            time.sleep(0.2)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
        deadline = time.monotonic() + 60
        while "resume with:" not in (tmp_path / "stderr.txt").read_text():
            assert time.monotonic() < deadline, "the ranks did not stop: " + (tmp_path / "stderr.txt").read_text()
            time.sleep(0.2)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):  # ranks left training (this test failing)
            with contextlib.suppress(OSError):
                if str(out).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
    stderr = (tmp_path / "stderr.txt").read_text()
    stopped = re.findall("^stopped by SIGTERM at step (\\d+); checkpoint written to (.*)$", stderr, flags=re.MULTILINE)
    assert len(stopped) == 1 and stopped[0][1] == str(out / "latest.pt"), stderr
    assert load_checkpoint(out / "latest.pt")["step"] == int(stopped[0][0])


@pytest.mark.parametrize("launcher_gone", [False, True])
def test_a_rank_whose_launcher_ended_before_it_asked_for_the_signal_stops_at_once(monkeypatch, launcher_gone):
    """PR_SET_PDEATHSIG fires when the parent ends after the call, not before it: a launcher killed while the rank
    imported torch left it an orphan that no signal would reach; end_with_launcher sends it its own SIGTERM then.
    (The parent of a live launcher is the one read at import.)"""
    asked, raised = [], []

    class Libc:
        def prctl(self, option, signum):
            asked.append((option, signum))

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setattr(distributed.ctypes, "CDLL", lambda *args, **kwargs: Libc())
    monkeypatch.setattr(distributed.signal, "raise_signal", raised.append)
    if launcher_gone:  # reparented: to PID 1, or to a subreaper such as a container's launcher
        monkeypatch.setattr(distributed, "_PARENT_AT_IMPORT", os.getppid() + 1)
    distributed.end_with_launcher()
    assert asked == [(distributed._PR_SET_PDEATHSIG, signal.SIGTERM)]
    assert raised == ([signal.SIGTERM] if launcher_gone else [])


def test_a_rank_not_started_by_torchrun_is_not_tied_to_its_parent(monkeypatch):
    """Ranks started by other means, with RANK and WORLD_SIZE in their environment (a scheduler's own launcher, a
    shell script, as test_a_hung_rank_ends_the_others_with_one_line starts them), may outlive the process that
    started them (a login shell, nohup): no PR_SET_PDEATHSIG, which would stop them when it ends, and no stop for
    a parent that is not the one at import."""
    asked, raised = [], []

    class Libc:
        def prctl(self, option, signum):
            asked.append((option, signum))

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(distributed.ctypes, "CDLL", lambda *args, **kwargs: Libc())
    monkeypatch.setattr(distributed.signal, "raise_signal", raised.append)
    monkeypatch.setattr(distributed, "_PARENT_AT_IMPORT", os.getppid() + 1)  # its shell ended: reparented
    distributed.end_with_launcher()
    assert asked == [] and raised == []


def test_train_script_under_torchrun_fails_on_bad_input_with_one_line_per_rank(tmp_path):
    """Each rank says what it met, prefixed with its rank, in one write (the ranks share the launcher's stderr), and
    leaves with the status 2 of bad input: Gloo's threads could abort a failing rank at interpreter exit (SIGABRT,
    "terminate called without an active exception"; 3 of 8 launches before the fix)."""
    args = ["--device", "cpu", "--out", str(tmp_path / "run"), "--quiet", "--data", str(tmp_path / "missing")]
    result = subprocess.run(
        [*TWO_RANKS, str(ROOT / "scripts" / "train.py"), *args], capture_output=True, text=True, timeout=180
    )
    assert result.returncode != 0
    errors = sorted(line for line in result.stderr.splitlines() if line.startswith("error: "))
    missing = f"data path {tmp_path / 'missing'} does not exist; expected an image folder or an HDF5 file"
    # The launcher ends the other rank when the first fails: under load it may go before it has written its line.
    assert errors and set(errors) <= {f"error: rank {rank} of 2: {missing}" for rank in (0, 1)}, result.stderr
    assert "terminate called" not in result.stderr and "exitcode  : 2" in result.stderr, result.stderr


def test_train_script_on_two_machines_meets_through_the_c10d_rendezvous(tmp_path):
    """README's several-machines launch: two torchrun agents, one per "machine", meeting through the c10d
    rendezvous on a TCP endpoint (here on 127.0.0.1), one rank each, running the fast step on gloo. On PyTorch's
    layers: through Triton's interpreter this launch took 100 s, most of it the final pictures, and the gradients it
    averages are plain tensors whichever layers made them (the Triton layers' cross-rank step runs on a GPU in
    test_nccl_collectives_are_captured_in_the_cuda_graph)."""
    out = tmp_path / "run"
    args = ["--device", "cpu", "--out", str(out), "--quiet", "--image-size", "16", "--batch-size", "2", "--steps", "2"]
    args += ["--checkpoint-every", "2", "--workers", "0", "--impl", "torch"]
    launcher = [*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1"]
    launcher += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "two-machines"]
    launcher += ["--local-addr", "127.0.0.1"]
    agents = [
        subprocess.Popen(
            [*launcher, str(ROOT / "scripts" / "train.py"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        logs = [agent.communicate(timeout=JOB_TIMEOUT_S)[1] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    assert [agent.returncode for agent in agents] == [0, 0], logs
    log = "".join(logs)
    assert log.count("began-fast: new run") == 1  # rank 0, on whichever agent the rendezvous made node 0
    assert "step: fast, amp off, cuda graphs off, impl torch, device cpu" in log
    assert "ranks: 2, batch 2 per rank, global batch 4" in log
    assert load_checkpoint(out / "latest.pt")["step"] == 2


@pytest.mark.cuda
def test_nccl_collectives_are_captured_in_the_cuda_graph(tmp_path, monkeypatch):
    """The fast step's all-reduces on NCCL are captured in the CUDA graph and replayed with it. One GPU allows a
    one-rank NCCL group only (NCCL refuses two ranks on one device), where an all-reduce changes nothing, so the
    values alone cannot tell a captured collective from a dropped one: a spy records that each of the step's
    all-reduces was issued while the graph was capturing, and that a replay issues none from Python. The values
    show that capture and replay work with NCCL (graph equals eager bit for bit) and that the distributed step stays
    on the single-process trajectory; that N ranks average correctly is what the gloo tests above prove."""
    issued = []  # per all-reduce from Python: whether the current stream was capturing
    all_reduce = dist.all_reduce

    def spy(tensor, *args, **kwargs):
        issued.append(torch.cuda.is_current_stream_capturing())
        return all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", spy)
    dist.init_process_group(
        "nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1, device_id=torch.device("cuda", 0)
    )
    try:
        model = ModelConfig(image_size=32, n=16, h=16, skip=True)

        def fast_step(collectives):
            torch.manual_seed(0)
            G, D = Generator(model).cuda(), Discriminator(model).cuda()
            return FastStep(G, D, TrainConfig(batch_size=8), "cuda", amp="bf16", collectives=collectives)

        collectives = Collectives(World(0, 1, 0), COLLECTIVE_TIMEOUT_S)
        eager, graphed, single = fast_step(collectives), fast_step(collectives), fast_step(None)
        gen = torch.Generator(device="cuda").manual_seed(0)
        data = [torch.rand(8, 3, 32, 32, device="cuda", generator=gen) * 2 - 1 for _ in range(6)]
        for step in (eager, graphed, single):
            step(data[0])  # Adam's state and the communicator exist before capture
        per_step = len(issued) // 2  # the two distributed steps' eager steps
        assert per_step == 3 and not any(issued)  # D's gradients, G's gradients, the two L1 means
        issued.clear()
        graph = CudaGraphStep(graphed, data[0].shape, warmup_steps=3)
        assert issued == [False] * 3 * per_step + [True] * per_step  # the warm-up steps, then the capture
        issued.clear()
        for x in data[1:]:
            eager(x)
            graph(x)
            single(x)
        torch.cuda.synchronize()
        assert issued == [False] * per_step * len(data[1:])  # the eager step's alone: the graph replays its own
        state = [list(step.parameters()) + [step.k, step.stats.sums] for step in (eager, graphed, single)]
        for a, b in zip(state[0], state[1], strict=True):
            assert torch.equal(a, b)
        # k_t of the distributed step is recomputed from the all-reduced means (torch ops) rather than taken from
        # the balance kernel: equal up to float32 rounding.
        torch.testing.assert_close(graphed.k, single.k, rtol=0, atol=1e-6)
        torch.testing.assert_close(graphed.stats.sums, single.stats.sums, rtol=1e-5, atol=1e-6)
    finally:
        stop()


TWO_GPUS = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs (NCCL: one rank per GPU)"
)
NCCL_MODEL = ModelConfig(image_size=32, n=16, h=16, skip=True)
NCCL_PER_RANK, NCCL_STEPS = 4, 6


def nccl_rank_main(rank, port, folder):
    """One rank of a two-GPU NCCL job (through distributed.start, as torchrun's ranks join): the fast step in bf16,
    eager and CUDA-graphed, on this rank's half of each global batch, and a step without collectives on that half."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank)
    collectives = start(World(rank, 2, rank), device, COLLECTIVE_TIMEOUT_S)
    try:

        def fast_step(with_collectives):
            torch.manual_seed(0)
            G, D = Generator(NCCL_MODEL).to(device), Discriminator(NCCL_MODEL).to(device)
            cfg = TrainConfig(batch_size=NCCL_PER_RANK)
            return FastStep(G, D, cfg, device, amp="bf16", collectives=collectives if with_collectives else None)

        eager, graphed, alone = fast_step(True), fast_step(True), fast_step(False)
        gen = torch.Generator(device=device).manual_seed(0)  # the same global batches on both ranks
        shard = slice(rank * NCCL_PER_RANK, (rank + 1) * NCCL_PER_RANK)
        batches = [(torch.rand(2 * NCCL_PER_RANK, 3, 32, 32, device=device, generator=gen) * 2 - 1)[shard]]
        batches += [batches[0].roll(i, 0) * 0.9 for i in range(1, NCCL_STEPS)]
        for step in (eager, graphed, alone):
            step(batches[0])  # Adam's state and the communicator exist before capture
        graph = CudaGraphStep(graphed, batches[0].shape)
        for x in batches[1:]:
            eager(x)
            graph(x)
            alone(x)
        torch.cuda.synchronize()
        results = {
            name: {
                "weights": [p.detach().cpu() for p in step.parameters()],
                "k": step.k.cpu(),
                "stats": step.stats.sums.cpu(),
            }
            for name, step in (("eager", eager), ("graphed", graphed), ("alone", alone))
        }
        torch.save(results, Path(folder) / f"nccl_rank{rank}.pt")
    finally:
        stop()


@pytest.mark.cuda
@TWO_GPUS
def test_two_nccl_ranks_capture_their_collectives_and_agree_bit_for_bit(tmp_path):
    """On two GPUs: the graphed step equals the eager one bit for bit on each rank (a sum of two addends does not
    depend on their order, whichever algorithm NCCL takes), both ranks hold the same weights, k_t and statistics bit
    for bit, and those are not what a rank trained on its half alone would hold (the collectives did average)."""
    run_two_ranks(nccl_rank_main, tmp_path)
    ranks = [torch.load(tmp_path / f"nccl_rank{r}.pt") for r in range(2)]

    def flat(state):
        return [*state["weights"], state["k"], state["stats"]]

    for results in ranks:
        for a, b in zip(flat(results["eager"]), flat(results["graphed"]), strict=True):
            assert torch.equal(a, b)
    for a, b in zip(flat(ranks[0]["graphed"]), flat(ranks[1]["graphed"]), strict=True):
        assert torch.equal(a, b)
    for results in ranks:
        pairs = zip(results["graphed"]["weights"], results["alone"]["weights"], strict=True)
        assert not all(torch.equal(a, b) for a, b in pairs)


@pytest.mark.cuda
@TWO_GPUS
def test_train_script_under_torchrun_on_two_gpus(tmp_path):
    """torchrun with two GPUs runs the fast path (--amp --cuda-graphs) through distributed.start's NCCL branch."""
    out = tmp_path / "run"
    args = ["--out", str(out), "--quiet", "--image-size", "32", "--batch-size", "4", "--steps", "20"]
    args += ["--checkpoint-every", "20", "--log-every", "10", "--amp", "--cuda-graphs"]
    result = subprocess.run(
        [*TWO_RANKS, str(ROOT / "scripts" / "train.py"), *args], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr
    assert "ranks: 2, batch 4 per rank, global batch 8" in result.stderr
    assert "graphs=True" in result.stderr
    assert load_checkpoint(out / "latest.pt")["step"] == 20


def test_a_hung_rank_ends_the_others_with_one_line(tmp_path):
    """Rank 1 of a two-rank training run stops (SIGSTOP: alive, its connections open, so no collective sees it
    go); rank 0 must end with one line and exit status 1 within about --dist-timeout, its checkpoint intact."""
    # Rank 0's checkpoint write counts against rank 1's timeout (it waits for rank 0 in the next collective): 6 s
    # leaves a slow disk's fsync time before rank 1's guard would speak first.
    timeout_s, out = 6, tmp_path / "run"
    args = ["--device", "cpu", "--out", str(out), "--quiet", "--image-size", "16", "--batch-size", "2"]
    args += ["--steps", "100000", "--log-every", "2", "--checkpoint-every", "4", "--sample-every", "100000"]
    args += ["--workers", "0", "--impl", "torch", "--dist-timeout", str(timeout_s)]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "train.py"), *args],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not (out / "latest.pt").exists():  # both ranks are in the loop and past the first checkpoint
            assert time.monotonic() < deadline and ranks[0].poll() is None, "the run did not start"
            time.sleep(0.1)
        ranks[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        stderr = ranks[0].communicate(timeout=JOB_TIMEOUT_S)[1]
        waited = time.monotonic() - stopped
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    assert ranks[0].returncode == 1, stderr
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert errors == [stderr.splitlines()[-1]], stderr
    assert errors[0].startswith(
        f"error: rank 0 of 2: no training step finished within the timeout (--dist-timeout {timeout_s} s)"
    )
    assert waited < timeout_s + 20  # the guard, not the process group, whose own timeout is 30 s longer
    assert load_checkpoint(out / "latest.pt")["step"] % 4 == 0
