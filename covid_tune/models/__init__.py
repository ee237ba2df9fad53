"""Engine side: the backbone registry, freeze levels and the frozen-prefix split, pretrained weights."""
