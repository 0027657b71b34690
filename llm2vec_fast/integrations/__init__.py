"""Integrations with data engines (optional extras): ray.py, Ray Data (`pip install 'llm2vec-fast[ray]'`)."""
