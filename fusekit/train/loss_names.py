"""The names of the fusion losses and their β defaults, without torch (the config and the CLI read them)."""

LOSSES = ("ce", "kl", "reverse_kl", "jsd", "uld", "gold")  # ce: FuseLLM's; the others: divergence.py
BETA_LOSSES = ("jsd", "gold")  # the losses jsd_beta applies to
GOLD_DEFAULT_BETA = 0.5  # TRL GOLDConfig's default β, used by gold when jsd_beta is unset
