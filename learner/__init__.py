"""The learner room: DeepSpeed SFT and DualGRPO steps, the frozen reference, checkpoints and
full-weight export. Imports ``personadual`` and third-party libraries only, never Ray."""
