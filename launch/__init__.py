"""Launchers: ``alum-launch slurm`` (restartable sbatch jobs for DGX-2 clusters, native or fairseq engine) and
``alum-launch local`` (the same run via ``torchrun --standalone``).  SLURM lives only here: the engines read
torchrun's environment.  See :mod:`launch.spec` (config, resources, batch split, engine
commands), :mod:`launch.slurm` (the script) and :mod:`launch.cli`."""
