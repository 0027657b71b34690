"""Training stages of the LLM2Vec recipe on the fused kernels: MNTP, unsupervised SimCSE, supervised contrastive.

One module per stage (mntp.py, simcse.py, supervised.py); what they share lives in config.py (hyper-parameters),
data.py (reading files), contrastive.py (the InfoNCE loss, GradCache, gathering across ranks), model.py (LoRA and
loading) and loop.py (optimisation, checkpoints, resume, logging).
"""
