"""Run train.py's main under torchrun and save each process's final state (weights and buffers such
as routing thresholds) to <out_dir>/rank<N>.pt, so a test can check that the processes agree. Under
FSDP a process holds only its shard of each weight: that shard is saved (buffers are whole)."""
import os
import sys

import torch
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

model = train.main(sys.argv[1:])
out_dir = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--out_dir="))
state = {k: v.to_local() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
torch.save(state, os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))
