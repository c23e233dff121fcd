"""A volunteer's session in a run: the trainer (this process) and the network process, and what they share."""
