from dcslurm.cli import main

main()
