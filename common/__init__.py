"""What every confide package may import and that is not about a task: crash-safe files,
configuration reading, the error tree, how the command-line tools write and refuse, Flower's
process environment and derived seeds. It imports nothing else of confide."""
