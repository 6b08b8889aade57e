"""train.grad_clip covers the extra terms' hint projections (actors/student.py _optimiser_step):
one gradient norm over student + projections, taken after the projections' gradients are averaged
over the workers (their own all-reduce: they live outside DDP's wrapper). SGD with lr 1 makes the
applied (clipped) gradient readable from the parameters. No Ray: the two-worker case is two
processes in a torch.distributed gloo group."""
from __future__ import annotations

import torch
import torch.multiprocessing as mp

from actors.student import _optimiser_step
from orchestrator.extra_terms import ExtraTerms, resolve_terms
from tests.test_extra_terms import MLP, _hint, _mlp


def _setup(student_bias_grad, proj_weight_grad):
    """The tiny MLP student + one hint projection 2->2, every gradient zero but the two given."""
    model = _mlp()
    resolved = resolve_terms([_hint()], [{"name": "t", "features": ["net.0"], "pool": "mean"}],
                             {"feat__t__net.0": [2]}, MLP, 2)
    terms = ExtraTerms(resolved, model)
    params = [*model.parameters(), *terms.parameters()]
    for p in params:
        p.grad = torch.zeros_like(p)
    model.net[0].bias.grad = torch.tensor(student_bias_grad)
    proj = terms.losses[0][0].loss.proj
    proj.weight.grad = torch.tensor(proj_weight_grad)
    opt = torch.optim.SGD(params, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    before = {"bias": model.net[0].bias.detach().clone(), "proj": proj.weight.detach().clone()}
    return model, terms, opt, sched, before, proj


def test_one_norm_over_the_student_and_the_projections():
    """Gradients: student bias [0, 30], projection [[40, 0], [0, 0]]: global norm 50, clip 5 -> x0.1,
    applied [0, 3] and [[4, 0], [0, 0]]. (The student alone, norm 30, would be clipped to [0, 5] and
    the projection left at 40: the old behaviour.)"""
    model, terms, opt, sched, before, proj = _setup([0.0, 30.0], [[40.0, 0.0], [0.0, 0.0]])
    _optimiser_step(model, opt, sched, 5.0, terms)
    torch.testing.assert_close(before["bias"] - model.net[0].bias.detach(), torch.tensor([0.0, 3.0]))
    torch.testing.assert_close(before["proj"] - proj.weight.detach(), torch.tensor([[4.0, 0.0], [0.0, 0.0]]))


def test_no_clip_leaves_the_projection_gradient_whole():
    model, terms, opt, sched, before, proj = _setup([0.0, 30.0], [[40.0, 0.0], [0.0, 0.0]])
    _optimiser_step(model, opt, sched, None, terms)
    torch.testing.assert_close(before["proj"] - proj.weight.detach(), torch.tensor([[40.0, 0.0], [0.0, 0.0]]))


def _worker(rank: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        # rank 0's projection gradient [[60, 80], ..], rank 1's zero: averaged [[30, 40], ..], norm 50,
        # clipped to 5 -> [[3, 4], ..] on both ranks. Clipped per rank before the average it would be
        # [[3, 4]] / 2 = [[1.5, 2]]; never averaged, the ranks would differ.
        g = [[60.0, 80.0], [0.0, 0.0]] if rank == 0 else [[0.0, 0.0], [0.0, 0.0]]
        model, terms, opt, sched, before, proj = _setup([0.0, 0.0], g)
        _optimiser_step(model, opt, sched, 5.0, terms)
        torch.save(before["proj"] - proj.weight.detach(), f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_two_workers_clip_the_averaged_projection_gradient(tmp_path):
    out = str(tmp_path / "applied")
    # spawn, not fork: in the full suite the pytest process has Ray's and torch's threads running, and
    # a forked child can inherit a lock or thread pool mid-use and hang (tests/test_fsdp_sampling.py
    # did, in its first attention kernel). Spawn pays the re-imports; _worker is importable at module level.
    mp.start_processes(_worker, args=(f"file://{tmp_path / 'rendezvous'}", out), nprocs=2, start_method="spawn")
    for rank in range(2):
        torch.testing.assert_close(torch.load(f"{out}.{rank}"), torch.tensor([[3.0, 4.0], [0.0, 0.0]]))


def _fsdp_worker(rank: int, init: str, out: str) -> None:
    """The student wrapped in FSDP (its 12 weights sharded 6 + 6 over the two ranks), the projection
    outside it. Rank 0's loss: logits . [1, 0] at x = [3, 4] (identity layers: h = x); rank 1's: 0.
    FSDP's averaged student gradients: W1 = W2 = [[1.5, 2], [0, 0]], b1 = b2 = [0.5, 0] (norm^2 13);
    the projection's averaged [[6, 0], [0, 0]] (36): one norm 7, clip 0.7 -> x0.1 everywhere.
    FSDP's own clip of the student alone would scale it by 0.7 / sqrt(13) and leave the projection at 6."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        model, terms, _, _, _, proj = _setup([0.0, 0.0], [[12.0, 0.0], [0.0, 0.0]] if rank == 0 else [[0.0, 0.0], [0.0, 0.0]])
        for p in model.parameters():
            p.grad = None
        fsdp = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True)
        assert sum(p.numel() for p in fsdp.parameters()) < 12  # sharded: this rank holds part of the weights
        with FSDP.summon_full_params(fsdp):
            before = {n: p.detach().clone() for n, p in fsdp.named_parameters()}
        x = torch.tensor([[3.0, 4.0]])
        (fsdp(x) * torch.tensor([1.0, 0.0])).sum().mul(1.0 if rank == 0 else 0.0).backward()
        opt = torch.optim.SGD([*fsdp.parameters(), *terms.parameters()], lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        proj_before = proj.weight.detach().clone()
        _optimiser_step(fsdp, opt, sched, 0.7, terms)
        with FSDP.summon_full_params(fsdp):
            applied = {n: before[n] - p.detach() for n, p in fsdp.named_parameters()}
        applied["proj"] = proj_before - proj.weight.detach()
        torch.save(applied, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp_two_workers_clip_one_norm_over_every_shard_and_the_projections(tmp_path):
    out = str(tmp_path / "applied")
    # spawn, as above: FSDP's collectives are where an inherited lock would bite
    mp.start_processes(_fsdp_worker, args=(f"file://{tmp_path / 'rendezvous'}", out), nprocs=2, start_method="spawn")
    w = torch.tensor([[0.15, 0.2], [0.0, 0.0]])
    b = torch.tensor([0.05, 0.0])
    want = {"net.0.weight": w, "net.0.bias": b, "net.2.weight": w, "net.2.bias": b,
            "proj": torch.tensor([[0.6, 0.0], [0.0, 0.0]])}
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        assert got.keys() == want.keys()
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}")
