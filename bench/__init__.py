"""``make bench``: prefopt vs TRL's DPOTrainer vs a bare PyTorch loop on one CPU machine (``python -m bench``)."""
