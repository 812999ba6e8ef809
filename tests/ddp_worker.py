"""Run train.py's main under torchrun and save each process's final state (weights and buffers such
as routing thresholds) to <out_dir>/rank<N>.pt, so a test can check that the processes agree."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

model = train.main(sys.argv[1:])
out_dir = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--out_dir="))
torch.save(model.state_dict(), os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))
