"""`python -m torch_dag.cli` (how torchrun starts `torch-dag finetune` on each process)."""

from . import main

main()
