"""Turning what a user downloaded into what a run reads.

- ``python -m personadual.prepare model --base PATH --out PATH``: a base model with the two
  mode tokens (``personadual/prepare/model.py``).
"""
