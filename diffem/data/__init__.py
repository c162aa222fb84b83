"""Data loaders, corruption models and observation datasets for the diffem experiments."""
