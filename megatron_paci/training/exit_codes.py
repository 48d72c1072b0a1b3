"""Exit codes that a launcher acts on.

``scripts/slurm/pretrain_gpt.sbatch`` requeues the job when the training step ends
with ``EXIT_REQUEUE``: the trainer saved a checkpoint and stopped early on purpose
(preemption, or the job's time limit close), so the same job id runs on and resumes.
75 is ``EX_TEMPFAIL`` of sysexits.h: "try again later".
"""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2  # config, layout or input file: printed as ``error:`` lines
EXIT_REQUEUE = 75
