"""Starting jobs: the `ondol` command (`cli`), the whole pipeline in one process (`pipeline`), and multi-process
launches through DeepSpeed's launcher or Slurm (`launcher`, `slurm`, `supervise`, `rank`)."""
