"""Engine side: image folders, the decoded-image cache, augmentation on tensors, loaders, synthetic data."""
