"""Stage 5, segmentation: the segmenter protocol (``protocol``) and registry
(``registry``), the classical haematoxylin baseline (``classical``), the attention
segmenter (``attention``), the default self-trained student (``student``), and the shared
instance post-processing (``instances``).

May use: ``common``, ``color``, ``networks``.
"""
