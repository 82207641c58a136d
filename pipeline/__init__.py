"""Pure core: slide IO, tiling, segmentation, morphometrics, outputs. No Ray here."""
