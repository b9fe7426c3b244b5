"""A 2-process CPU data-parallel run (torchrun, gloo) with the schedule: independent masks per rank, the same
switch step on every rank, and a plain-ReLU saved model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_two_process_training_with_schedule(tmp_path):
    here = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), str(here.parent)]), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(here / "dist_schedule_worker.py"), str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0 and "DISTRIBUTED-OK" in out.stdout, out.stdout[-3000:] + out.stderr[-5000:]
