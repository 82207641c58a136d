"""Stage 3, colour: Ruifrok-Johnston colour deconvolution into stain optical densities
(``stain``), Reinhard stain normalisation, HED jitter and ImageNet normalisation
(``normalize``).

May use: ``common``.
"""
