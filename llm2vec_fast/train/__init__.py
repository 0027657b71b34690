"""Training stages of the LLM2Vec recipe on the fused kernels: MNTP, unsupervised SimCSE, supervised contrastive.

One module per stage (mntp.py, simcse.py, supervised.py); what they share lives in config.py (hyper-parameters),
reference_config.py (the llm2vec reference's training configs mapped onto them), data.py (reading files), contrastive.py (the InfoNCE loss, GradCache, gathering across ranks), model.py (LoRA and
loading) and loop.py (optimisation, checkpoints, resume, logging).
"""
