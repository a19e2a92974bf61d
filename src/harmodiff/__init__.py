"""harmodiff: patch-level anatomy- and style-guided 3D diffusion harmonization of T1 MRI.

Method: Hache et al., "Patch-level Anatomy- and Style-Guided 3D Diffusion for Multi-site T1
MRI Harmonization" (MIDL 2026, under review). Each stage is a module with a pure-function API
and a CLI (`python -m harmodiff.<stage> --help`).
"""

__version__ = "0.1.0"
