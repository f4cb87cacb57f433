"""One rank of tests/test_parallel.py, started by torchrun: for each checkpoint folder given, load this
rank's shard with parallel.py, run the checks the test asks for, and (rank 0) save the results.

    torchrun --nproc-per-node N tests/parallel_worker.py OUT.pt CHECKS FOLDER [FOLDER ...]

CHECKS is a comma-separated list of: logits (one batch, no cache), padded (a left-padded batch
with the KV cache, prefill then decode steps), greedy (greedy generations, eager), compiled (the
same, compiled), int8 (quantized after sharding: the logits of `logits`).
The results of every rank go to OUT.pt as {folder: {check: value}} with per-rank bytes read.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import generate  # noqa: E402
import parallel  # noqa: E402

PROMPTS = [[5, 17, 99, 3, 42, 8, 60], [11, 23], [7, 7, 1, 90, 31]]


def main(out_path, checks, folders):
    torch.set_num_threads(1)
    parallel.init("cpu")
    rank, results = dist.get_rank(), {}
    for folder in folders:
        model = parallel.from_pretrained(folder, dtype=torch.float32)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(1))
        res = {"bytes_read": torch.tensor(model.bytes_read)}
        with torch.no_grad():
            if "logits" in checks:
                res["logits"] = model(ids)
            if "padded" in checks:
                res["padded"] = padded_steps(model, vocab)
        if "greedy" in checks:
            res["greedy"] = generate.generate_batch(model, [[p % vocab for p in q] for q in PROMPTS], 8)
        if "compiled" in checks:
            res["compiled"] = generate.generate_batch(model, [[p % vocab for p in q] for q in PROMPTS], 8,
                                                      compile=True)
        if "int8" in checks:
            import quantize
            quantize.quantize(model, "int8")
            with torch.no_grad():
                res["int8"] = model(ids)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, res["bytes_read"].item())
        res["bytes_read"] = gathered
        results[folder] = res
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()  # leave together: a rank that tears down while another still sends aborts
    dist.destroy_process_group()
    # Then leave without the interpreter's teardown. One CI run (of the compiled check) had a rank abort
    # with "terminate called without an active exception", what a C++ thread still joinable at exit
    # gives; 16 runs of the same test passed after it, so where it happened is not known. Nothing is
    # left to do here: the results are saved and the group is gone.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def padded_steps(model, vocab):
    """Logits of a left-padded batch of two rows through the KV cache: prefill, then 3 decode steps."""
    tokens = torch.tensor([[0, 0, 0, 4, 9, 33], [12, 5, 70, 2, 6, 1]]) % vocab
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    model.setup_cache(2, 9)
    logits = [model(tokens, attention_mask=mask[:, :6], input_pos=0)]
    for i, t in enumerate(([3, 8], [50, 2], [1, 1])):
        step = torch.tensor(t)[:, None] % vocab
        logits.append(model(step, attention_mask=mask[:, :7 + i], input_pos=6 + i))
    model.clear_cache()
    return torch.cat(logits, dim=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","), sys.argv[3:])
