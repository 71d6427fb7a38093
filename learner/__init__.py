"""The learner room: DeepSpeed SFT and DualGRPO steps, the frozen reference, checkpoints and
the weight sender. Imports ``personadual`` and third-party libraries only, never Ray."""
