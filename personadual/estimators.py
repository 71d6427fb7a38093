"""The names ``algo.advantage`` and ``algo.scale`` accept, without importing torch.

Config validation reads these (a config error must not wait for torch to load); the
implementations register under the same names in ``personadual/advantage.py``, which
refuses a name not declared here and fails at import when a declared name has no
implementation. A new estimator: one line here, one decorated function there.
"""

from __future__ import annotations

# name -> what it computes, per response i of prompt group g (r: reward, m: its mode).
ADVANTAGE_ESTIMATORS: dict[str, str] = {
    "dual": "DualGRPO: r_i - mean of g's other mode (intra + inter), r_i - mean of its own mode "
            "when g holds one mode",
    "grpo": "GRPO: r_i - mean of g (the w/o-DualAdv ablation)",
    "dual_released": "the authors' released variant: group-std-normalised GRPO advantages, then "
                     "intra + inter on those",
}
ADVANTAGE_SCALES: dict[str, str] = {
    "none": "advantages as estimated (the paper)",
    "group_std": "divided by the std of g's rewards",
}
# The mode of a (free-mode) response that declared no valid mode.
NO_MODE = -1
