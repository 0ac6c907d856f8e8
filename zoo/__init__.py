"""The testbed: a word-level vocabulary, task and backdoor generators, training, and the shipped models."""
