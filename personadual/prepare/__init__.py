"""Turning what a user downloaded into what a run reads.

- ``python -m personadual.prepare model --base PATH --out PATH``: a base model with the two
  mode tokens (``personadual/prepare/model.py``);
- ``python -m personadual.prepare data --recipe R``: the SFT, RL and evaluation files and their
  manifests (``personadual/prepare/data.py``);
- ``python -m personadual.prepare tiny-models --out models``: a tiny base and a tiny teacher
  that knows a tiny recipe's rows, to run the whole recipe on a CPU
  (``personadual/prepare/tiny_models.py``).
"""
