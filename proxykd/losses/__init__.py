"""Losses over vocabulary-sized distributions: chunked NLL and distillation (chunked.py), the
preference losses of DPO (preference.py) and the divergence family of distillation (divergences.py).
"""
from proxykd.losses.chunked import (batch_shards, distill, nll, target_stats,  # noqa: F401
                                    token_logprobs, topk_logprobs)
from proxykd.losses.divergences import (DIVERGENCES, divergence, forward_kl, jsd,  # noqa: F401
                                        reverse_kl, skew_kl, tvd)
from proxykd.losses.preference import (PREFERENCE_LOSSES, hinge_preference,  # noqa: F401
                                       ipo_preference, preference_loss, sigmoid_preference)
