"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo): Trainer + StochActSchedule with DDP."""

import faulthandler
import os
import sys

import torch
import torch.distributed as dist
import transformers as tf
from helpers import tiny_llama, token_dataset, training_args
from transformers import TrainerCallback

import hf_stochact
from hf_stochact import StochActSchedule, StochasticActivation, ffn_activations


class Probe(TrainerCallback):
    """Per step: the layer-0 activation class; at step 0: a mask drawn on a fixed input (to compare across ranks)."""

    def __init__(self):
        self.kinds = []
        self.mask = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        act = ffn_activations(model)[0][3]
        self.kinds.append((state.global_step, type(act).__name__))
        if state.global_step == 0 and isinstance(act, StochasticActivation):
            torch.manual_seed(123)  # same seed on every rank: masks must still differ
            x = -torch.ones(4096)
            with torch.no_grad():
                self.mask = (act.train()(x) == 0).float()


def main(out):
    faulthandler.dump_traceback_later(180, exit=True)  # a hung rank prints where it is and fails the run
    model = tiny_llama("silu")
    probe = Probe()
    trainer = tf.Trainer(model=model, args=training_args(out, max_steps=6, per_device_train_batch_size=2),
                         train_dataset=token_dataset(), callbacks=[StochActSchedule(relu_fraction=1 / 3), probe])
    trainer.train()
    rank, world = dist.get_rank(), dist.get_world_size()
    masks = [torch.zeros(4096) for _ in range(world)]
    dist.all_gather(masks, probe.mask)
    kinds = [None] * world
    dist.all_gather_object(kinds, probe.kinds)
    if rank == 0:
        assert world == 2, world
        assert not torch.equal(masks[0], masks[1]), "ranks drew identical masks"
        agree = (masks[0] == masks[1]).float().mean().item()
        assert 0.4 < agree < 0.6, f"masks not independent: agreement {agree}"  # independent p=.5 draws agree ~50%
        assert kinds[0] == kinds[1], kinds
        switch = [s for s, k in kinds[0] if k == "ReLU"][0]
        assert switch == 4, kinds[0]
        trainer.save_model(out + "/final")
        assert all(type(m).__name__ == "ReLU" for *_, m in ffn_activations(model))
        saved = tf.AutoConfig.from_pretrained(out + "/final")
        assert saved.hidden_act == "relu" and not hasattr(saved, hf_stochact.CONFIG_KEY)
        print("DISTRIBUTED-OK", agree)
    # Teardown. Every rank syncs, then the Trainer's own cleanup destroys the process group. The process must then
    # not run ProcessGroupGloo's destructor during interpreter finalization: DDP's reducer still holds the group,
    # and its destructor joins gloo's worker threads while this thread holds the GIL, while a worker that is
    # releasing a finished collective (a barrier keeps the all_gather before it alive, with this script's Python
    # tensors) waits for the GIL. Measured: a deadlock in ~1 of 10 runs (native stacks: MainThread in
    # ~ProcessGroupGloo -> std::thread::join, worker in ~AsyncBarrierWork -> ~AsyncAllgatherWork ->
    # decref_pyobject -> gil_scoped_acquire) and, without the barrier, the abort "terminate called without an
    # active exception" when a joinable worker thread is destroyed at exit. So: flush, and leave with os._exit
    # once everything has been checked; any failure above still raises and exits non-zero.
    dist.barrier()
    trainer.end()
    assert not dist.is_initialized()
    faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

if __name__ == "__main__":
    main(sys.argv[1])
