"""Image generation from decoded embeddings: reconstructors wrapping diffusers pipelines."""
