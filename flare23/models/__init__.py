"""The fine models' parts: networks, losses, patch sampling, transforms, and what a trained model carries."""
