"""On-policy sampling from an FSDP student (actors/fsdp_sampling.py), without Ray: two processes in
a torch.distributed gloo group, a tiny Llama (tied embeddings, two decoder layers: three FSDP
units) sharded over them. Each rank's seeded samples from the gathered weights equal those of the
same model unsharded, before and after an optimiser step through FSDP; a rank with no prompt still
enters the gather (a collective: without it the other rank would wait forever). The end-to-end
run against DDP on Ray is tests/test_on_policy_run.py."""
from __future__ import annotations

import torch
import torch.multiprocessing as mp
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers import LlamaConfig, LlamaForCausalLM

from actors.fsdp_sampling import skeleton, whole_student
from orchestrator.generation import sample

PROMPTS = {0: [[1, 2, 3], [4, 5]], 1: [[7, 8, 9, 10]]}
OPTIONS = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6, "eos_ids": [0], "k": 1, "pad_id": 0}


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True))


def _worker(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)  # two processes on a shared machine
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        model = _llama()
        skel = skeleton(model)
        layers = {type(m) for m in model.modules() if type(m).__name__ in model._no_split_modules}
        fsdp = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True, auto_wrap_policy=ModuleWrapPolicy(layers))
        assert sum(p.numel() for p in fsdp.parameters()) < sum(p.numel() for p in skel.parameters())  # a shard
        opt = torch.optim.AdamW(fsdp.parameters(), lr=0.1)
        got = []
        for step in range(2):
            seeds = [[100 * step + i] for i in range(len(PROMPTS[rank]))]
            with whole_student(fsdp, skel) as student:
                got.append([s[0]["tokens"].tolist() for s in sample(student, PROMPTS[rank], seeds, **OPTIONS)])
            with whole_student(fsdp, skel) as again:  # rank 1 has nothing to sample: it enters the gather all the same
                if rank == 0:
                    sample(again, PROMPTS[0], [[1], [2]], **OPTIONS)
            x = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(rank))
            fsdp(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
            with FSDP.summon_full_params(fsdp):  # the weights the next samples must come from
                torch.save({n: p.detach().clone() for n, p in fsdp.named_parameters()}, f"{out}.{rank}.weights{step}")
        torch.save(got, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_samples_from_the_gathered_weights_equal_the_unsharded_models(tmp_path):
    out = str(tmp_path / "samples")
    # spawn, not fork: the suite's process has Ray's and torch's threads running by now, and a forked
    # child hung in its first attention kernel (a lock or thread pool copied mid-use); spawn costs
    # the re-imports of torch and transformers (seconds) and cannot inherit that state.
    mp.start_processes(_worker, args=(f"file://{tmp_path / 'rendezvous'}", out), nprocs=2, start_method="spawn")
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        model = _llama().eval()
        for step in range(2):
            if step:  # after the first optimiser step: sampled from the updated weights, not the first ones
                model.load_state_dict(torch.load(f"{out}.{rank}.weights{step - 1}"), strict=False)
            seeds = [[100 * step + i] for i in range(len(PROMPTS[rank]))]
            want = [s[0]["tokens"].tolist() for s in sample(model, PROMPTS[rank], seeds, **OPTIONS)]
            assert got[step] == want, (rank, step)
            assert all(want), want  # every prompt got tokens
