"""Two real gloo processes on CPU: the reduction under DDP equals the single-process one (ranks and weights)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


JOB = Path(__file__).parent / "jobs" / "ddp_reduction.py"


def _run(command, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_two_process_ddp_reduction_equals_single_process(tmp_path):
    single = _run([sys.executable, str(JOB), str(tmp_path)], tmp_path)
    assert "world_size=1" in single
    # `torchrun --standalone` picks a free rendezvous port; accelerate's `--cpu` would silently start one process.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    double = _run([*torchrun, str(JOB), str(tmp_path)], tmp_path)
    assert "world_size=2 rank=0" in double and "world_size=2 rank=1" in double

    # The model card and the spectrum plots are written by the main process only.
    assert (tmp_path / "run_rank0" / "README.md").exists()
    assert list((tmp_path / "run_rank0" / "spectra").glob("*/*.png"))
    assert not (tmp_path / "run_rank1" / "README.md").exists()
    assert not (tmp_path / "run_rank1" / "spectra").exists()

    reference = json.loads((tmp_path / "ranks_world1_rank0.json").read_text())
    weights = torch.load(tmp_path / "weights_world1_rank0.pt")
    for rank in (0, 1):
        ranks = json.loads((tmp_path / f"ranks_world2_rank{rank}.json").read_text())
        assert ranks["world_size"] == 2
        assert ranks["ranks"] == reference["ranks"] and len(ranks["ranks"]) == 10
        distributed = torch.load(tmp_path / f"weights_world2_rank{rank}.pt")
        assert distributed.keys() == weights.keys()
        for key in weights:
            assert torch.allclose(distributed[key], weights[key], atol=1e-5), key
