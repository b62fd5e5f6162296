"""Running a plan: Ray workers per engine, placement on the cluster, modes, progress."""
