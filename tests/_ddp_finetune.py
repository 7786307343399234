"""Run by tests/test_finetune.py under `torchrun --nproc_per_node 2`: each rank finetunes the same
pruned model on its share of the same batches and writes its final weights to OUT/rank{r}.safetensors."""

import os
import sys
import warnings
from pathlib import Path

from safetensors.torch import save_file
from test_finetune import small_teacher_and_student, synthetic_batches

import torch_dag as td

warnings.simplefilter("ignore")
out = Path(sys.argv[1])
flexible = len(sys.argv) > 2 and sys.argv[2] == "flex"
teacher, student = small_teacher_and_student(flexible=flexible)
report = td.finetune(student, teacher, synthetic_batches(8), epochs=2, lr=3e-3, progress=False)
rank = int(os.environ["RANK"])  # finetune joined (and left) the process group torchrun set up
save_file(
    {k: v.clone() for k, v in student.state_dict().items()},
    out / f"rank{rank}.safetensors",
    metadata={"world_size": str(report.world_size), "steps": str(report.steps)},
)
